"""Request handlers: meta in, meta and payload buffers out.

Handlers are synchronous and touch only the store; the connection code owns
the socket and the payload transfer. PUT-like requests are split in two steps
(``begin_put`` reserves region extents, the connection receives payload bytes
straight into them, ``finish_put`` commits) so a value's bytes are written
exactly once, from the socket into the region.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memkv.engine.store import Store
from memkv.errors import InvalidArgument, MemKVError, ProtocolError
from memkv.protocol import auth
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.protocol.versions import CLOCK, newer
from memkv.server.session import Session

Buffer = memoryview | bytes


@dataclass
class Reply:
    meta: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)
    payload_len: int = 0


@dataclass
class PutPlan:
    """Where each value of a PUT/PUT_MANY goes: a reservation, or None (discard)."""

    lengths: list[int]
    reservations: list[Any]
    errors: list[MemKVError | None]
    # "nx" (read repairs of values without a version, client/ops.py): store only keys that do
    # not exist, checked again at commit. (Versioned copies and repairs rely on Store.commit.)
    nx: bool = False


def write_versions(meta: dict[str, Any], n: int) -> list[int]:
    """The writer's version per value: ``vers`` (one per key: read repairs, slot copies keep the
    versions they copy), else ``ver`` for all, else 0 (the store assigns one). A version far in
    the future is refused: it would make the key un-overwritable (memkv/protocol/versions.py)."""
    if "vers" in meta:
        vers = c.get_ints(meta, "vers", n)
    elif "ver" in meta:
        vers = [c.get_int(meta, "ver")] * n
    else:
        return [0] * n
    for v in vers:
        if v and not CLOCK.plausible(v):  # 0: none (the store assigns one)
            raise InvalidArgument(f"write version {v} is too far in the future (node clock + 5 min)")
    return vers


class Handlers:
    def __init__(self, store: Store, tenants: dict[str, Any], limits: c.Limits,
                 stats_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store = store
        self.tenants = tenants
        self.limits = limits
        self.stats_extra = stats_extra
        # The cluster-internal identity (a TenantConfig named auth.INTERNAL_TENANT whose token is derived
        # from the cluster secret; set by memkv.cluster.identity), or None: nobody can log in as it.
        self.internal: Any = None
        # Hooks for the cluster layer: called with (session, meta, keys, write) before
        # any work; they raise Moved/Fenced to refuse the request.
        self.route_checks: list[Callable[[Session, dict[str, Any], list[bytes], bool], None]] = []
        self.simple: dict[int, Callable[[Session, dict[str, Any]], Reply]] = {
            Op.PING: self.ping,
            Op.HELLO: self.hello,
            Op.AUTH: self.auth,
            Op.GET: self.get,
            Op.GET_MANY: self.get_many,
            Op.EXISTS_MANY: self.exists_many,
            Op.DELETE: self.delete,
            Op.PIN: self.pin,
            Op.UNPIN: self.unpin,
            Op.LOOKUP_PREFIX: self.lookup_prefix,
            Op.STATS: self.stats,
            Op.REPORT_CORRUPT: self.report_corrupt,
        }

    # -- helpers
    def _ns(self, session: Session, meta: dict[str, Any], level: str) -> str:
        ns = c.get_str(meta, "ns", "shared", 128)
        session.require(ns, level)
        return ns

    def _route(self, session: Session, meta: dict[str, Any], keys: list[bytes], write: bool) -> None:
        for check in self.route_checks:
            check(session, meta, keys, write)

    # -- session
    def ping(self, session: Session, meta: dict[str, Any]) -> Reply:
        session.require_login()
        return Reply({"t": time.time()})

    def hello(self, session: Session, meta: dict[str, Any]) -> Reply:
        session.server_nonce = auth.new_nonce()
        return Reply({"nonce": session.server_nonce, "auth": session.auth_required})

    def auth(self, session: Session, meta: dict[str, Any]) -> Reply:
        from memkv.errors import AuthError

        tenant_name = c.get_str(meta, "tenant", None, 128)
        cnonce = c.get_key(meta, "cnonce")
        proof = c.get_key(meta, "proof")
        snonce, session.server_nonce = session.server_nonce, None  # one try per nonce
        internal = tenant_name == auth.INTERNAL_TENANT
        tenant = self.internal if internal else self.tenants.get(tenant_name)
        if snonce is None:
            raise AuthError("send HELLO first")
        if tenant is None or not auth.verify(
                auth.client_proof(tenant.token, tenant_name, snonce, cnonce), proof):
            raise AuthError("authentication failed")
        session.login(tenant, internal=internal)
        return Reply({"proof": auth.server_proof(tenant.token, tenant_name, snonce, cnonce)})

    # -- writes
    def owner(self, session: Session, meta: dict[str, Any]) -> str:
        """The tenant a write is stored for: the session's, or ``meta["owner"]`` (a migrated value keeps its
        tenant, and so its scope in tenant-scoped namespaces), which only the cluster identity may set."""
        if "owner" not in meta:
            return session.tenant
        owner = c.get_str(meta, "owner", None, 128)
        if owner != session.tenant and not session.internal and (session.auth_required or self.tenants):
            from memkv.errors import PermissionDenied

            raise PermissionDenied("only the cluster identity may write on behalf of another tenant")
        return owner

    def begin_put(self, session: Session, op: int, meta: dict[str, Any], payload_len: int) -> PutPlan:
        ns = self._ns(session, meta, "rw")
        tenant = self.owner(session, meta)
        ttl = c.get_opt_float(meta, "ttl")
        pin = c.get_bool(meta, "pin")
        if op == Op.PUT:
            keys = [c.get_key(meta, "k", self.limits)]
            lengths = [payload_len]
            sums = [c.get_int(meta, "cs")]
            parents = [c.get_opt_bytes(meta, "parent", self.limits)]
        else:
            keys = c.get_keys(meta, "ks", self.limits)
            lengths = c.get_ints(meta, "ls", len(keys))
            sums = c.get_ints(meta, "cs", len(keys))
            raw_parents = meta.get("parents")
            if raw_parents is None:
                parents = [None] * len(keys)
            elif isinstance(raw_parents, list) and len(raw_parents) == len(keys):
                parents = [None if p is None else c.get_key({"p": p}, "p", self.limits) for p in raw_parents]
            else:
                raise ProtocolError("field 'parents' must be a list as long as 'ks'")
            if sum(lengths) != payload_len:
                raise ProtocolError("value lengths do not add up to the payload length")
        self._route(session, meta, keys, True)
        vers = write_versions(meta, len(keys))
        plan = PutPlan(lengths, [], [], bool(meta.get("nx")))
        copies = "vers" in meta  # slot copies and read repairs: per-key versions of existing writes
        try:
            for key, length, cs, parent, ver in zip(keys, lengths, sums, parents, vers, strict=True):
                if plan.nx or copies:
                    cur = self.store.peek(key, namespace=ns, tenant=tenant)
                    # already there (nx), or a copy no newer than what the node holds: Store.commit
                    # would drop it, so take no room for it -- a copy onto a node whose flash is full
                    # must not fail on values it already has. (A client's retried write still goes
                    # through commit: its reply waits until the value it repeats is on disk.)
                    if cur is not None and (plan.nx or not newer(ver, cs, cur.version, cur.checksum)):
                        plan.reservations.append(None)
                        plan.errors.append(None)
                        continue
                try:
                    res = self.store.reserve(key, length, namespace=ns, tenant=tenant, checksum=cs,
                                             ttl=ttl, pin=pin, parent=parent, version=ver)
                except MemKVError as exc:
                    if op == Op.PUT:
                        raise
                    plan.reservations.append(None)
                    plan.errors.append(exc)
                else:
                    plan.reservations.append(res)
                    plan.errors.append(None)
        except BaseException:
            self.abort_put(plan)
            raise
        return plan

    def abort_put(self, plan: PutPlan) -> None:
        for res in plan.reservations:
            if res is not None:
                self.store.abort(res)
        plan.reservations = [None] * len(plan.reservations)

    def finish_put(self, op: int, plan: PutPlan) -> Reply:
        """Commit; the reply has per value the generation and the version now stored (newer than
        the write's own when the write was superseded: ``Store.commit``)."""
        gens: list[int] = []
        vers: list[int] = []
        errs: list[list[Any] | None] = []
        for i, res in enumerate(plan.reservations):
            err = plan.errors[i]
            if res is not None:
                plan.reservations[i] = None
                if plan.nx and self.store.peek(res.key, namespace=res.namespace, tenant=res.tenant) is not None:
                    self.store.abort(res)  # a client write landed while the copy's payload was arriving
                    gens.append(0)
                    vers.append(0)
                    errs.append(None)
                    continue
                try:
                    entry = self.store.commit(res)
                except MemKVError as exc:
                    err = exc
                else:
                    gens.append(entry.generation)
                    vers.append(entry.version)
                    errs.append(None)
                    continue
            if op == Op.PUT and err is not None:
                raise err
            gens.append(0)
            vers.append(0)
            errs.append([err.code, err.message] if err is not None else None)
        if op == Op.PUT:
            return Reply({"gen": gens[0], "ver": vers[0]})
        return Reply({"gens": gens, "vers": vers, "errs": errs})

    # -- reads
    def get(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "r")
        key = c.get_key(meta, "k", self.limits)
        self._route(session, meta, [key], False)
        entry = self.store.get(key, namespace=ns, tenant=session.tenant)
        if entry is None:
            return Reply({"f": False})
        view = self.store.view(entry)
        m = {"f": True, "cs": entry.checksum, "gen": entry.generation, "ver": entry.version}
        if self.store.namespaces[ns].overwrite:
            m["ow"] = True  # replicas may disagree: cluster clients compare versions (client/ops.py)
        return Reply(m, [view], entry.length)

    def get_many(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "r")
        keys = c.get_keys(meta, "ks", self.limits)
        self._route(session, meta, keys, False)
        lens: list[int] = []
        sums: list[int] = []
        gens: list[int] = []
        vers: list[int] = []
        views: list[Buffer] = []
        total = 0
        get = self.store.get
        for key in keys:
            entry = get(key, namespace=ns, tenant=session.tenant)
            if entry is None:
                lens.append(-1)
                sums.append(0)
                gens.append(0)
                vers.append(0)
                continue
            lens.append(entry.length)
            sums.append(entry.checksum)
            gens.append(entry.generation)
            vers.append(entry.version)
            views.append(self.store.view(entry))
            total += entry.length
        m = {"ls": lens, "cs": sums, "gens": gens, "vers": vers}
        if self.store.namespaces[ns].overwrite:
            m["ow"] = True
        return Reply(m, views, total)

    def exists_many(self, session: Session, meta: dict[str, Any]) -> Reply:
        """Which keys exist; with ``v``, the version of each instead (0: absent), so that a cluster
        client can compare replicas without moving their values (client/ops.py)."""
        ns = self._ns(session, meta, "r")
        keys = c.get_keys(meta, "ks", self.limits)
        self._route(session, meta, keys, False)
        if c.get_bool(meta, "v"):
            peek = self.store.peek
            out = []
            for k in keys:
                e = peek(k, namespace=ns, tenant=session.tenant)
                out.append(0 if e is None else e.version)
            return Reply({"vers": out})
        return Reply({"ex": [self.store.exists(k, namespace=ns, tenant=session.tenant) for k in keys]})

    def delete(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "rw")
        key = c.get_key(meta, "k", self.limits)
        self._route(session, meta, [key], True)
        return Reply({"d": self.store.delete(key, namespace=ns, tenant=session.tenant)})

    def pin(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "rw")
        keys = c.get_keys(meta, "ks", self.limits)
        self._route(session, meta, keys, True)
        ttl = c.get_opt_float(meta, "ttl")
        return Reply({"n": self.store.pin(keys, namespace=ns, tenant=session.tenant, ttl=ttl)})

    def unpin(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "rw")
        keys = c.get_keys(meta, "ks", self.limits)
        self._route(session, meta, keys, True)
        return Reply({"n": self.store.unpin(keys, namespace=ns, tenant=session.tenant)})

    def lookup_prefix(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "r")
        keys = c.get_keys(meta, "ks", self.limits)
        self._route(session, meta, keys, False)
        lease = c.get_opt_float(meta, "lease")
        if lease is not None and lease > 3600:
            raise InvalidArgument("lease longer than an hour")
        n = self.store.lookup_prefix(keys, namespace=ns, tenant=session.tenant,
                                     lease_s=5.0 if lease is None else lease)
        return Reply({"n": n})

    def report_corrupt(self, session: Session, meta: dict[str, Any]) -> Reply:
        ns = self._ns(session, meta, "r")
        key = c.get_key(meta, "k", self.limits)
        gen = c.get_int(meta, "gen")
        entry = self.store.get(key, namespace=ns, tenant=session.tenant)
        dropped = False
        if entry is not None and entry.generation == gen:
            # Re-verify on the node: a reader's report alone must not let one
            # client delete another's data.
            from memkv.engine.checksum import checksum

            if checksum(self.store.view(entry)) != entry.checksum:
                self.store.report_corrupt(entry)
                dropped = True
        return Reply({"dropped": dropped})

    def stats(self, session: Session, meta: dict[str, Any]) -> Reply:
        session.require_login()
        st = self.store.stats()
        if self.stats_extra is not None:
            st.update(self.stats_extra())
        return Reply({"stats": st})
