"""The ADMIN operation of a node (``Op.ADMIN``, sub-command in ``meta["cmd"]``).

``tenant.list``, ``tenant.add``, ``tenant.revoke`` (standalone nodes; a cluster's
tenants live in etcd), ``audit`` (records about a key and/or tenant),
``audit.verify`` (the hash chain), ``purge`` (every value of a tenant, memory and
flash: memkv/server/purge.py). The pipeline's grants stage requires an ``admin``
grant on ``"*"`` once the node has tenants (an open node accepts it, so that the
first tenant can be added); the first tenant of a node must be an admin.
"""

from __future__ import annotations

import trio

from memkv.engine.store import Store
from memkv.errors import InvalidArgument
from memkv.flash.tier import FlashTier
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.server.audit import AuditLog, verify_chain
from memkv.server.binary import Reply
from memkv.server.extension import Extension, Operation
from memkv.server.purge import purge_tenant
from memkv.server.requests import Access, Call
from memkv.server.session import Session
from memkv.server.tenants import TenantRegistry, tenant_from_json, tenant_to_json

ADMIN = Access(admin=True, rate_limited=False)


class Admin:
    def __init__(self, node_id: str, store: Store, tier: FlashTier | None, tenants: TenantRegistry,
                 audit: AuditLog | None) -> None:
        self.node_id = node_id
        self.store = store
        self.tier = tier
        self.tenants = tenants
        self.audit = audit

    def extension(self) -> Extension:
        return Extension("admin", operations=(Operation("ADMIN", ADMIN, self.run, opcode=int(Op.ADMIN)),))

    async def run(self, session: Session, req: Call) -> Reply:
        meta = req.meta
        cmd = c.get_str(meta, "cmd", None, 64)
        tenants, audit = self.tenants, self.audit
        if cmd == "tenant.list":
            return Reply({"tenants": [tenant_to_json(t, with_token=False) for t in tenants.tenants.values()],
                          "revoked": sorted(tenants.revoked), "source": tenants.source})
        if cmd in ("tenant.add", "tenant.revoke"):
            if tenants.source != "node":
                raise InvalidArgument(f"this node takes its tenants from {tenants.source}: "
                                      "use memkv tenant ... etcd://...")
            name = c.get_str(meta, "name", None, 128)
            if not name or "/" in name:
                raise InvalidArgument("bad tenant name")
            if cmd == "tenant.add":
                t = tenant_from_json(name, meta.get("tenant"))
                if not tenants and t.grants.get("*") != "admin":
                    raise InvalidArgument("the first tenant of a node must be an admin (grant '*' = 'admin'), "
                                          "or nobody could manage tenants afterwards")
                tenants.add_runtime(t)
                found = True
            else:
                found = tenants.revoke_runtime(name)
            await trio.to_thread.run_sync(tenants.persist_sync)
            if audit is not None:
                audit.append(cmd, tenant=session.tenant or None, name=name)
            return Reply({"ok": True, "found": found})
        if cmd == "audit":
            log = self._audit()
            key = c.get_opt_bytes(meta, "k")
            tenant = meta.get("tenant")
            if tenant is not None:
                tenant = c.get_str(meta, "tenant", None, 128)
            limit = c.get_int(meta, "limit", 1000, minimum=1)
            recs = await trio.to_thread.run_sync(lambda: log.history(key=key, tenant=tenant, limit=limit))
            return Reply({"node": self.node_id, "records": recs})
        if cmd == "audit.verify":
            log = self._audit()
            await log.flush()
            n, problems = await trio.to_thread.run_sync(lambda: verify_chain(log.iter_all()))
            return Reply({"node": self.node_id, "records": n, "problems": problems[:100]})
        if cmd == "purge":
            tenant = c.get_str(meta, "tenant", None, 128)
            out = await purge_tenant(self.store, self.tier, self.node_id, tenant)
            if audit is not None:
                audit.append("purge", tenant=tenant, by=session.tenant or None, values=out["values"],
                             bytes=out["bytes"])
                await audit.flush()
            return Reply(out)
        raise InvalidArgument(f"unknown admin command {cmd!r}")

    def _audit(self) -> AuditLog:
        if self.audit is None:
            raise InvalidArgument("this node keeps no audit log (no data dir)")
        return self.audit
