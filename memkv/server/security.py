"""Security and governance of a node: tenants at runtime, rate limits, audit, purge, no-store, TLS.

``install(node)`` (called at the end of ``Node.__init__``) wires everything:

* **Tenants** (``TenantRegistry``): the config file's ``[tenants.*]`` plus, for a
  standalone node, ``<data dir>/tenants.json`` (tenants added/revoked at runtime
  with the ADMIN op, persisted atomically; revocations of config tenants are
  kept there too). A cluster node (``--etcd``) reads ``/memkv/<cluster>/tenants/``
  from etcd at start and watches it. The registry mutates the same dict the
  AUTH handler reads, so a new tenant can log in at once; a revoked or
  re-provisioned tenant's open sessions are refused at their next request.
* **Per-request guard** (only once tenants exist): revocation check and a
  per-tenant token bucket (``rate`` requests/s, ``burst``) -> ``RateLimited``.
  Quotas (bytes, per pool) are the store's ``tenant_quotas``.
* **Audit**: put/put_many/delete/pin/unpin/purge records (``memkv.server.audit``).
* **no_store**: a write flagged ``nostore`` (or any write of a tenant with
  ``no_store = true``) stays in DRAM only: it is never written to the flash
  tier even in a durable namespace (so it is in no segment or snapshot), its
  TTL is capped to ``[security] no_store_ttl`` (default 300 s), and the audit
  log records only the key's sha256, never the key.
* **ADMIN op** (``Op.ADMIN``, sub-command in ``meta["cmd"]``): tenant.add,
  tenant.list, tenant.revoke, audit, audit.verify, purge. Needs an
  ``admin`` grant on ``"*"`` once tenants exist.
* **TLS**: ``node.connection_class`` becomes a ``TLSConnection`` when
  ``[tls]`` is configured (``memkv.server.tls``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import trio

from memkv.config import TenantConfig
from memkv.errors import AuthError, InvalidArgument, MemKVError, RateLimited
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.server.handlers import Reply

if TYPE_CHECKING:
    from memkv.server.node import Node
    from memkv.server.session import Session

log = logging.getLogger("memkv.security")

TENANTS_FILE = "tenants.json"
LEVELS = ("r", "rw", "w", "admin")
DEFAULT_NO_STORE_TTL = 300.0


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        t = self.tokens + (now - self.stamp) * self.rate
        if t > self.burst:
            t = self.burst
        self.stamp = now
        if t < n:
            self.tokens = t
            return False
        self.tokens = t - n
        return True


def tenant_to_json(t: TenantConfig, *, with_token: bool) -> dict[str, Any]:
    d = asdict(t)
    if not with_token:
        d.pop("token", None)
    return d


def tenant_from_json(name: str, d: dict[str, Any]) -> TenantConfig:
    from memkv.protocol.auth import is_reserved_tenant
    from memkv.sizes import parse_size

    if is_reserved_tenant(name):
        raise InvalidArgument(f"tenant name {name!r} is reserved (names starting with '__' are cluster-internal)")
    if not isinstance(d, dict) or not isinstance(d.get("token"), str) or not d["token"]:
        raise InvalidArgument(f"tenant {name}: a non-empty token is required")
    grants = d.get("grants") or {}
    if not isinstance(grants, dict) or not all(isinstance(k, str) and v in LEVELS for k, v in grants.items()):
        raise InvalidArgument(f"tenant {name}: grants must map namespace -> one of {LEVELS}")
    quota = d.get("quota")
    rate, burst = d.get("rate"), d.get("burst")
    for label, v in (("rate", rate), ("burst", burst)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise InvalidArgument(f"tenant {name}: {label} must be a positive number")
    return TenantConfig(name, d["token"], dict(grants),
                        parse_size(quota) if quota is not None else None,
                        float(rate) if rate is not None else None,
                        float(burst) if burst is not None else None,
                        bool(d.get("no_store", False)))


class Security:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config
        self.tenants: dict[str, TenantConfig] = cfg.tenants  # the dict Handlers.auth reads
        self.buckets: dict[str, TokenBucket] = {}
        self.revoked: set[str] = set()
        self.runtime: dict[str, TenantConfig] = {}  # added at runtime (persisted)
        self.path = os.path.join(cfg.data_dir, TENANTS_FILE) if cfg.data_dir else None
        self.clustered = bool(cfg.etcd)
        sec = cfg.extra.get("security") or {}
        from memkv.sizes import parse_duration

        self.no_store_ttl = parse_duration(sec.get("no_store_ttl", DEFAULT_NO_STORE_TTL)) or DEFAULT_NO_STORE_TTL
        self._no_store_active = False
        self._guards_installed = False
        self.audit = None
        self.rate_limited = 0
        self.revoked_refusals = 0

    # -- tenants -------------------------------------------------------------------------
    def load(self) -> None:
        if self.clustered:
            self._load_etcd_once()
        elif self.path and os.path.exists(self.path):
            try:
                raw = json.loads(open(self.path, "rb").read())
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"cannot read {self.path}: {exc}") from None
            self.revoked = set(raw.get("revoked", []))
            for name in self.revoked:
                self.tenants.pop(name, None)
            for name, d in raw.get("tenants", {}).items():
                t = tenant_from_json(name, d)
                self.runtime[name] = t
                self.tenants[name] = t
        self._refresh()

    def _refresh(self) -> None:
        """Quotas and buckets from the tenant table (after any change)."""
        store = self.node.store
        quotas = {n: t.quota for n, t in self.tenants.items() if t.quota is not None}
        store.tenant_quotas.clear()
        store.tenant_quotas.update(quotas)
        buckets = {}
        for n, t in self.tenants.items():
            if t.rate is not None:
                old = self.buckets.get(n)
                if old is not None and old.rate == t.rate and old.burst == (t.burst or max(t.rate, 1.0)):
                    buckets[n] = old
                else:
                    buckets[n] = TokenBucket(t.rate, t.burst)
        self.buckets = buckets
        if self.tenants:
            self.install_guards()

    def _persist_sync(self) -> None:
        if not self.path:
            return
        data = {"tenants": {n: tenant_to_json(t, with_token=True) for n, t in self.runtime.items()},
                "revoked": sorted(self.revoked)}
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def set_tenant(self, t: TenantConfig) -> None:
        self.tenants[t.name] = t
        self._refresh()

    def drop_tenant(self, name: str) -> bool:
        found = self.tenants.pop(name, None) is not None
        self._refresh()
        return found

    # -- cluster: tenants in etcd ----------------------------------------------------------
    def _etcd_prefix(self) -> str:
        return f"/memkv/{self.node.config.cluster or 'default'}/tenants/"

    def _apply_etcd(self, name: str, value: bytes | None) -> None:
        if value is None:
            self.drop_tenant(name)
            return
        try:
            self.set_tenant(tenant_from_json(name, json.loads(value)))
        except (ValueError, MemKVError) as exc:
            log.error("etcd tenant %s is malformed (%s); ignored", name, exc)

    def _load_etcd_once(self) -> None:
        from memkv.client.etcd import Etcd, EtcdUnavailable

        etcd = Etcd(self.node.config.etcd)
        try:
            kvs, self._etcd_rev = etcd.get_prefix(self._etcd_prefix())
        except EtcdUnavailable as exc:
            log.warning("tenants: etcd unavailable at start (%s); will retry", exc)
            self._etcd_rev = 0
            return
        finally:
            etcd.close()
        for kv in kvs:
            self._apply_etcd(kv.key[len(self._etcd_prefix()):], kv.value)

    async def watch_etcd(self) -> None:
        """Keep the tenant table equal to etcd's (list, then watch; re-list after a broken watch)."""
        from memkv.client.etcd import Etcd, EtcdUnavailable

        prefix = self._etcd_prefix()
        token = trio.lowlevel.current_trio_token()
        while True:
            etcd = Etcd(self.node.config.etcd)
            send, recv = trio.open_memory_channel[Any](10_000)

            def callback(ev: Any, send: Any = send) -> None:
                with contextlib.suppress(trio.RunFinishedError, trio.WouldBlock, trio.ClosedResourceError):
                    token.run_sync_soon(lambda: _try_send(send, ev))

            wid = None
            try:
                kvs, rev = await trio.to_thread.run_sync(etcd.get_prefix, prefix)
                names = {kv.key[len(prefix):] for kv in kvs}
                for name in [n for n in self.tenants if n not in names]:
                    self.drop_tenant(name)
                for kv in kvs:
                    self._apply_etcd(kv.key[len(prefix):], kv.value)
                wid = await trio.to_thread.run_sync(etcd.watch_prefix, prefix, rev + 1, callback)
                async for ev in recv:
                    if isinstance(ev, Exception):
                        break
                    for e in ev:
                        self._apply_etcd(e.key[len(prefix):], e.value)
            except EtcdUnavailable as exc:
                log.warning("tenants: etcd unavailable (%s)", exc)
            finally:
                if wid is not None:
                    with contextlib.suppress(Exception):
                        await trio.to_thread.run_sync(etcd.cancel_watch, wid)
                with contextlib.suppress(Exception):
                    await trio.to_thread.run_sync(etcd.close)
            await trio.sleep(1.0)

    # -- the request path ------------------------------------------------------------------
    def guard(self, session: Session) -> None:
        if session.internal:
            return  # the cluster identity (node-to-node): not a tenant, no rate limit, no revocation
        if not session.auth_required:
            if self.tenants:  # tenants were added after this connection was opened
                session.auth_required = True
            return
        if not session.authenticated:
            return  # the handler refuses it
        t = self.tenants.get(session.tenant)
        if t is None or t is not getattr(session, "tenant_cfg", t):
            session.authenticated = False
            session.grants = {}
            self.revoked_refusals += 1
            raise AuthError(f"tenant {session.tenant!r} was revoked or re-provisioned; authenticate again")
        b = self.buckets.get(session.tenant)
        if b is not None and not b.take():
            self.rate_limited += 1
            raise RateLimited(f"tenant {session.tenant!r} is over its rate of {b.rate:g} requests/s")

    def install_guards(self) -> None:
        if self._guards_installed:
            return
        self._guards_installed = True
        handlers = self.node.handlers
        guard = self.guard
        for op, fn in list(handlers.simple.items()):
            if op in (Op.HELLO, Op.AUTH):
                continue
            handlers.simple[op] = _guarded(guard, fn)
        for op, fn in list(self.node.extra_handlers.items()):
            if op != Op.ADMIN:
                self.node.extra_handlers[op] = _guarded(guard, fn)
        orig_begin = handlers.begin_put

        def begin_put(session: Session, op: int, meta: dict[str, Any], payload_len: int) -> Any:
            guard(session)
            return orig_begin(session, op, meta, payload_len)

        handlers.begin_put = begin_put
        orig_auth = handlers.simple[Op.AUTH]

        def auth(session: Session, meta: dict[str, Any]) -> Reply:
            reply = orig_auth(session, meta)
            session.tenant_cfg = self.tenants.get(session.tenant)  # type: ignore[attr-defined]
            return reply

        handlers.simple[Op.AUTH] = auth

    # -- no_store + audit on the write path --------------------------------------------------
    def install_write_hooks(self) -> None:
        handlers = self.node.handlers
        orig_begin, orig_finish = handlers.begin_put, handlers.finish_put

        def begin_put(session: Session, op: int, meta: dict[str, Any], payload_len: int) -> Any:
            who = self.node.handlers.owner(session, meta)  # a migrated value: its own tenant's settings
            t = self.tenants.get(who) if who else None
            no_store = c.get_bool(meta, "nostore") or (t is not None and t.no_store)
            model = meta.get("model")
            if model is not None:
                model = c.get_str(meta, "model", None, 256)
            if no_store:
                ttl = c.get_opt_float(meta, "ttl")
                meta["ttl"] = self.no_store_ttl if ttl is None or ttl <= 0 else min(ttl, self.no_store_ttl)
            plan = orig_begin(session, op, meta, payload_len)
            plan.sec = (no_store, model)
            return plan

        def finish_put(op: int, plan: Any) -> Reply:
            no_store, model = getattr(plan, "sec", (False, None))
            reservations = list(plan.reservations)
            if no_store:
                self._no_store_active = True
                try:
                    reply = orig_finish(op, plan)
                finally:
                    self._no_store_active = False
            else:
                reply = orig_finish(op, plan)
            audit = self.audit
            if audit is not None:
                errs = reply.meta.get("errs")
                gens = reply.meta.get("gens") or [reply.meta.get("gen")]
                for i, res in enumerate(reservations):
                    if res is None or (errs is not None and errs[i] is not None):
                        continue
                    audit.append("put", tenant=res.tenant, ns=res.namespace, **_key_fields(res.key, no_store),
                                 len=res.length, cs=res.checksum, gen=gens[i] if i < len(gens) else None,
                                 model=model, nostore=True if no_store else None)
            return reply

        handlers.begin_put = begin_put
        handlers.finish_put = finish_put
        tier = getattr(self.node, "flash", None)
        if tier is not None:
            orig_committed = tier.committed

            def committed(e: Any) -> None:
                if self._no_store_active:
                    return  # DRAM only: no flash record, so no segment or snapshot holds it
                orig_committed(e)

            tier.committed = committed
        if self.audit is None:
            return
        audit = self.audit

        def audited(op: int, name: str, many: bool) -> None:
            fn = handlers.simple[op]

            def handler(session: Session, meta: dict[str, Any]) -> Reply:
                reply = fn(session, meta)
                ns = meta.get("ns", "shared")
                if many:
                    for k in meta.get("ks", []):
                        audit.append(name, tenant=session.tenant, ns=ns, **_key_fields(k, False),
                                     ttl=meta.get("ttl"))
                elif reply.meta.get("d", True):
                    audit.append(name, tenant=session.tenant, ns=ns, **_key_fields(meta["k"], False))
                return reply

            handlers.simple[op] = handler

        audited(Op.DELETE, "delete", False)
        audited(Op.PIN, "pin", True)
        audited(Op.UNPIN, "unpin", True)

    # -- the same hooks for other front ends (RESP: memkv/server/resp.py) -----------------------
    def no_store_for(self, session: Session) -> bool:
        """Writes of this session are DRAM-only (tenant ``no_store``)."""
        t = self.tenants.get(session.tenant) if session.tenant else None
        return t is not None and t.no_store

    def cap_ttl(self, ttl: float | None) -> float:
        return self.no_store_ttl if ttl is None or ttl <= 0 else min(ttl, self.no_store_ttl)

    @contextlib.contextmanager
    def storing(self, no_store: bool) -> Iterator[None]:
        """Around a store write: with ``no_store`` the flash tier never sees it."""
        if not no_store:
            yield
            return
        self._no_store_active = True
        try:
            yield
        finally:
            self._no_store_active = False

    def audit_write(self, op: str, session: Session, ns: str, key: bytes, *, no_store: bool = False,
                    **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(op, tenant=session.tenant, ns=ns, **_key_fields(key, no_store),
                              nostore=True if no_store else None, **fields)

    # -- cluster-internal ops (memkv/cluster/migration.py) ----------------------------------------
    def require_internal(self, session: Session, what: str) -> None:
        """Once the node has tenants, only the cluster identity may run ``what`` (PermissionDenied)."""
        session.require_internal(what, auth_enabled=bool(self.tenants))

    # -- ADMIN ---------------------------------------------------------------------------------
    def _require_admin(self, session: Session) -> None:
        if not self.tenants and not session.auth_required:
            return  # an open node (no tenants yet): bootstrap
        session.auth_required = True
        session.require("*", "admin")

    async def admin(self, session: Session, meta: dict[str, Any]) -> Reply:
        cmd = c.get_str(meta, "cmd", None, 64)
        self._require_admin(session)
        if cmd == "tenant.list":
            return Reply({"tenants": [tenant_to_json(t, with_token=False) for t in self.tenants.values()],
                          "revoked": sorted(self.revoked), "source": "etcd" if self.clustered else "node"})
        if cmd in ("tenant.add", "tenant.revoke"):
            if self.clustered:
                raise InvalidArgument("this node takes its tenants from etcd: use memkv tenant ... etcd://...")
            name = c.get_str(meta, "name", None, 128)
            if not name or "/" in name:
                raise InvalidArgument("bad tenant name")
            if cmd == "tenant.add":
                t = tenant_from_json(name, meta.get("tenant"))
                if not self.tenants and t.grants.get("*") != "admin":
                    raise InvalidArgument("the first tenant of a node must be an admin (grant '*' = 'admin'), "
                                          "or nobody could manage tenants afterwards")
                self.runtime[name] = t
                self.revoked.discard(name)
                self.set_tenant(t)
                found = True
            else:
                found = self.drop_tenant(name)
                self.runtime.pop(name, None)
                self.revoked.add(name)
            await trio.to_thread.run_sync(self._persist_sync)
            if self.audit is not None:
                self.audit.append(cmd, tenant=session.tenant or None, name=name)
            return Reply({"ok": True, "found": found})
        if cmd == "audit":
            if self.audit is None:
                raise InvalidArgument("this node keeps no audit log (no data dir)")
            key = c.get_opt_bytes(meta, "k")
            tenant = meta.get("tenant")
            if tenant is not None:
                tenant = c.get_str(meta, "tenant", None, 128)
            limit = c.get_int(meta, "limit", 1000, minimum=1)
            recs = await trio.to_thread.run_sync(lambda: self.audit.history(key=key, tenant=tenant, limit=limit))
            return Reply({"node": self.node.node_id, "records": recs})
        if cmd == "audit.verify":
            if self.audit is None:
                raise InvalidArgument("this node keeps no audit log (no data dir)")
            from memkv.server.audit import verify_chain

            await self.audit.flush()
            n, problems = await trio.to_thread.run_sync(lambda: verify_chain(self.audit.iter_all()))
            return Reply({"node": self.node.node_id, "records": n, "problems": problems[:100]})
        if cmd == "purge":
            from memkv.server.purge import purge_tenant

            tenant = c.get_str(meta, "tenant", None, 128)
            out = await purge_tenant(self.node, tenant)
            if self.audit is not None:
                self.audit.append("purge", tenant=tenant, by=session.tenant or None, values=out["values"],
                                  bytes=out["bytes"])
                await self.audit.flush()
            return Reply(out)
        raise InvalidArgument(f"unknown admin command {cmd!r}")

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tenants": len(self.tenants), "rate_limited": self.rate_limited,
                               "revoked_refusals": self.revoked_refusals,
                               "tls": self.node.connection_class.__name__ != "Connection"}
        if self.audit is not None:
            out["audit"] = self.audit.stats()
        return out


def _try_send(send: Any, ev: Any) -> None:
    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
        send.send_nowait(ev)


def _key_fields(key: bytes, no_store: bool) -> dict[str, str]:
    from memkv.server.audit import key_hash

    if not isinstance(key, bytes):
        return {}
    return {"kh": key_hash(key)} if no_store else {"k": key.hex()}


def _guarded(guard: Callable[[Any], None], fn: Callable[..., Any]) -> Callable[..., Any]:
    def handler(session: Any, meta: dict[str, Any]) -> Any:
        guard(session)
        return fn(session, meta)

    return handler


def install(node: Node) -> Security:
    sec = Security(node)
    node.security = sec
    cfg = node.config
    # TLS
    from memkv.server.tls import connection_class, context_from_config

    ctx = context_from_config(cfg)
    if ctx is not None:
        node.connection_class = connection_class(ctx)
    # audit log (needs a data dir; [audit] enabled = false turns it off)
    acfg = cfg.extra.get("audit") or {}
    if cfg.data_dir and acfg.get("enabled", True):
        from memkv.server.audit import AuditLog
        from memkv.sizes import parse_size

        sec.audit = AuditLog(os.path.join(cfg.data_dir, "audit"), node.node_id,
                             max_bytes=parse_size(acfg.get("max_size", "64MiB")), keep=int(acfg.get("keep", 8)),
                             flush_interval=float(acfg.get("flush_interval", 0.2)))
        node.background.append(sec.audit.run)
    sec.install_write_hooks()
    sec.load()
    if sec.clustered:
        node.background.append(sec.watch_etcd)
    node.extra_handlers[Op.ADMIN] = sec.admin
    previous = node.handlers.stats_extra

    def stats_extra() -> dict[str, Any]:
        out = dict(previous()) if previous is not None else {}
        out["security"] = sec.stats()
        return out

    node.handlers.stats_extra = stats_extra
    return sec


def iter_tenants(sec: Security) -> Iterator[TenantConfig]:
    return iter(sec.tenants.values())
