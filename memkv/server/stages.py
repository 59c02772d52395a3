"""The stages of the node's request path, one class per check, in the order the pipeline runs them.

Each stage looks at a request through its kind's :class:`~memkv.server.requests.Access`
(declared once per kind) and either lets it pass, refuses it with a typed error,
or -- the promotion stage -- does the asynchronous work the operation needs first.
A stage has up to three hooks, called by memkv/server/pipeline.py:

* ``check(session, request)`` before the operation runs (returns None, or an
  awaitable the pipeline waits for before going on);
* ``done(session, request, result)`` after it succeeded (the audit log);
* ``release(session, request)`` after it ran, whatever the outcome (bytes in flight).

``applies(kind, access)`` says, once per kind when the pipeline is built, whether
the stage has anything to do for that kind: a GET never visits the audit stage,
a node without a cluster has no routing stage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from memkv.errors import AuthError, Moved, PermissionDenied, RateLimited
from memkv.flash.tier import FlashTier
from memkv.server.audit import AuditLog, key_hash
from memkv.server.extension import Forwarder, Routing
from memkv.server.limits import Hardening
from memkv.server.requests import Access, Delete, Get, Put, Request
from memkv.server.session import Session
from memkv.server.tenants import TenantRegistry

DEFAULT_NO_STORE_TTL = 300.0


class Stage:
    name = ""
    check: Any = None  # (session, request) -> None | Awaitable[None]
    done: Any = None  # (session, request, result) -> None
    release: Any = None  # (session, request) -> None

    def applies(self, kind: str, access: Access) -> bool:
        return True


class Authenticate(Stage):
    """A logged-in session where the node has tenants; a revoked or re-provisioned tenant is refused
    at its next request (its session logs out)."""

    name = "authenticate"

    def __init__(self, tenants: TenantRegistry) -> None:
        self.tenants = tenants
        self.table = tenants.tenants  # the live table (changed in place, never replaced)

    def check(self, session: Session, req: Request) -> None:
        if session.internal:
            return  # the cluster identity (node-to-node): not a tenant, never revoked
        if not session.auth_required:
            if not self.table:
                return  # an open node
            session.auth_required = True  # tenants were added after this connection was opened
        if not req.access.login:
            return  # logging in (HELLO / AUTH), or an open operation
        if session.authenticated:
            self.tenants.check_current(session)
        else:
            raise AuthError("authentication required")


class RateLimit(Stage):
    """The tenant's token bucket (``rate`` requests/s, ``burst``)."""

    name = "rate limit"

    def __init__(self, tenants: TenantRegistry) -> None:
        self.tenants = tenants

    def applies(self, kind: str, access: Access) -> bool:
        return access.rate_limited

    def check(self, session: Session, req: Request) -> None:
        if session.internal or not session.authenticated:
            return
        empty = self.tenants.take(session.tenant)
        if empty is not None:
            raise RateLimited(f"tenant {session.tenant!r} is over its rate of {empty.rate:g} requests/s")


class Route(Stage):
    """The cluster: a fenced node refuses writes; keys must be this node's at the client's slot-map
    epoch (``Moved``). A session that cannot follow ``Moved`` (RESP) has the keys another node
    serves marked for forwarding instead: reads where this node is not a replica, writes unless
    it is the only one (the forwarder writes every replica). Reads of an overwritable namespace
    with more than one replica are forwarded too, even where this node is one: the forwarder
    reads as every memkv client does (the replicas' versions compared, the newest value or
    tombstone wins), whereas this node's own copy may be one that missed an overwrite or a
    delete (it was down, paused or cut off), which a RESP client would otherwise be served."""

    name = "route"

    def __init__(self, routing: Routing, node_id: str, forwarder: Forwarder | None,
                 overwritable: Callable[[str], bool] = lambda ns: False) -> None:
        self.routing = routing
        self.node_id = node_id
        self.forwarder = forwarder
        self.overwritable = overwritable

    def applies(self, kind: str, access: Access) -> bool:
        return access.routed or access.write

    def check(self, session: Session, req: Request) -> None:
        access = req.access
        write = access.write
        if not session.forwarded or not access.routed:
            self.routing.check(req.keys if access.routed else [], write, req.epoch)
            return
        self.routing.check([], write, None)  # fencing; ownership is decided here
        me, owners = self.node_id, self.routing.owners
        # (only what the forwarder reads: a TTL query is still answered by a replica here)
        newest = req.kind in ("GET", "PEEK") and self.forwarder is not None and self.overwritable(req.ns)
        remote = []
        for i, key in enumerate(req.keys):
            row = owners(key)
            if row is None:
                continue  # no slot map yet: nothing to forward to
            if (tuple(row) != (me,)) if write else (me not in row or (newest and len(row) > 1)):
                remote.append(i)
        if remote:
            if self.forwarder is None:
                raise Moved("key is owned by another node", 0)
            req.remote = remote


class Grants(Stage):
    """The session's grant on the request's namespace; administration needs ``admin`` on ``*``;
    cluster-internal operations need the cluster identity; only the cluster identity writes on
    behalf of another tenant (slot copies keep their tenant)."""

    name = "grants"

    def __init__(self, tenants: TenantRegistry) -> None:
        self.tenants = tenants

    def applies(self, kind: str, access: Access) -> bool:
        return bool(access.level or access.admin or access.internal)

    def check(self, session: Session, req: Request) -> None:
        if not session.auth_required:
            return  # an open node (once it has tenants, the authenticate stage made every session log in)
        access = req.access
        if access.level:
            session.require(req.ns, access.level)
        if access.admin:
            session.require("*", "admin")
        if access.internal:
            session.require_internal(req.kind)
        if (type(req) is Put or type(req) is Delete) and req.owner is not None and req.owner != session.tenant \
                and not session.internal:
            raise PermissionDenied("only the cluster identity may write on behalf of another tenant")


class NoStore(Stage):
    """A write flagged no-store (or any write of a tenant with ``no_store = true``) stays in DRAM:
    never a flash record, so in no segment or snapshot; its TTL is capped (``[security]
    no_store_ttl``) and the audit log keeps only its key's hash."""

    name = "no-store"

    def __init__(self, tenants: TenantRegistry, ttl_cap: float) -> None:
        self.tenants = tenants
        self.ttl_cap = ttl_cap

    def applies(self, kind: str, access: Access) -> bool:
        return kind == Put.kind

    def check(self, session: Session, req: Put) -> None:
        owner = session.tenant if req.owner is None else req.owner  # a copied value: its tenant's setting
        t = self.tenants.get(owner) if owner else None
        if req.nostore or (t is not None and t.no_store):
            req.nostore = req.dram_only = True
            req.max_ttl = self.ttl_cap


class InFlight(Stage):
    """Bytes in flight: a write's payload must fit the per-connection limit, and the tenant's writes
    being received (all its connections) stay within its share ([limits], memkv/server/limits.py).
    Memory quotas are the store's (``Store.reserve``)."""

    name = "in flight"

    def __init__(self, hard: Hardening) -> None:
        self.hard = hard

    def applies(self, kind: str, access: Access) -> bool:
        return kind == Put.kind

    def check(self, session: Session, req: Put) -> None:
        n = req.payload_len()
        self.hard.check_put(n)
        self.hard.reserve_tenant(session.tenant, n)

    def release(self, session: Session, req: Put) -> None:
        self.hard.release_tenant(session.tenant, req.payload_len())


class Audit(Stage):
    """Who wrote, deleted, pinned or unpinned which key (memkv/server/audit.py), after it happened."""

    name = "audit"
    KINDS = ("PUT", "DELETE", "PIN", "UNPIN", "FLUSH")

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def applies(self, kind: str, access: Access) -> bool:
        return kind in self.KINDS

    def done(self, session: Session, req: Any, result: Any) -> None:
        append = self.log.append
        via = "resp" if session.front == "resp" else None
        kind = req.kind
        if kind == "PUT":
            nostore = req.nostore
            for i, (entry, err, _old) in enumerate(result):
                if entry is None or err is not None:
                    continue
                cs = req.checksums[i]
                append("put", tenant=entry.tenant, ns=req.ns, **key_fields(req.keys[i], nostore),
                       len=req.lengths[i], cs=entry.checksum if cs is None else cs, gen=entry.generation,
                       model=req.model, nostore=True if nostore else None, via=via)
        elif kind == "DELETE":
            tenant = session.tenant if req.owner is None else req.owner
            for key, deleted in zip(req.keys, result, strict=True):
                if deleted:
                    append("delete", tenant=tenant, ns=req.ns, **key_fields(key, False), via=via)
        elif kind == "FLUSH":
            for key in result:
                append("delete", tenant=session.tenant, ns=req.ns, **key_fields(key, False), via=via)
        else:  # PIN / UNPIN: every key asked for
            ttl = getattr(req, "ttl", None)
            for key in req.keys:
                append(kind.lower(), tenant=session.tenant, ns=req.ns, **key_fields(key, False), ttl=ttl, via=via)


def key_fields(key: bytes, no_store: bool) -> dict[str, str]:
    """How the audit log names a key: its hex, or only its sha256 for a no-store write."""
    return {"kh": key_hash(key)} if no_store else {"k": key.hex()}


class Promote(Stage):
    """A read of a value that is only on flash first brings it back into the region
    (memkv/flash/tier.py); the read then serves it like any other."""

    name = "flash promotion"

    def __init__(self, tier: FlashTier) -> None:
        self.tier = tier
        self.store = tier.store
        self.durable = tier.durable_ns

    def applies(self, kind: str, access: Access) -> bool:
        return kind == Get.kind

    def check(self, session: Session, req: Get) -> Awaitable[None] | None:
        if req.ns not in self.durable:
            return None
        peek, ns, tenant = self.store.peek, req.ns, session.tenant
        entries = [peek(k, namespace=ns, tenant=tenant) for k in req.keys]
        if not self.tier.cold(entries):
            return None
        return self._promote(req, entries)

    async def _promote(self, req: Get, entries: list[Any]) -> None:
        req.private = await self.tier.promote_for_read(entries) or None
