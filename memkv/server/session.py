"""Per-connection state: who is on the other end and what they may do."""

from __future__ import annotations

from dataclasses import dataclass, field

from memkv.config import TenantConfig
from memkv.errors import AuthError, PermissionDenied

_LEVEL = {"r": 1, "rw": 2, "w": 2, "admin": 3}


@dataclass(eq=False)
class Session:
    auth_required: bool
    tenant: str = ""
    authenticated: bool = False
    server_nonce: bytes | None = None
    grants: dict[str, str] = field(default_factory=dict)
    peer: str = ""
    # the cluster-internal identity (memkv.protocol.auth.INTERNAL_TENANT): rebalancer and node-to-node calls
    internal: bool = False
    # the tenant record this session logged in with: a revoked or re-provisioned tenant is refused
    tenant_cfg: TenantConfig | None = None
    # the front end: "binary" clients follow MOVED replies themselves; a "resp" client cannot, so a
    # cluster node forwards its requests for keys another node serves (memkv/server/stages.py)
    front: str = "binary"

    @property
    def forwarded(self) -> bool:
        return self.front == "resp"

    @property
    def observes_all(self) -> bool:
        """Whether this session may observe the whole node (every tenant's figures, STATS, INFO): a
        node without tenants, the cluster identity and admins (grant ``*`` = ``admin``). Any other
        tenant sees only its own (``Node.stats``, the RESP INFO command)."""
        return not self.auth_required or self.internal or self.may("*", "admin")

    def login(self, tenant: TenantConfig, *, internal: bool = False) -> None:
        self.tenant = tenant.name
        self.grants = dict(tenant.grants)
        self.authenticated = True
        self.internal = internal
        self.tenant_cfg = tenant

    def logout(self) -> None:
        self.authenticated = False
        self.grants = {}
        self.tenant_cfg = None

    def require_login(self) -> None:
        if self.auth_required and not self.authenticated:
            raise AuthError("authentication required")

    def require_internal(self, what: str) -> None:
        """Cluster-internal ops (slot migration): only the cluster identity, once the node has tenants."""
        if self.internal or not self.auth_required:
            return
        if not self.authenticated:
            raise AuthError("authentication required")
        raise PermissionDenied(f"{what} is a cluster-internal operation: tenant {self.tenant!r} may not use it")

    def may(self, namespace: str, level: str) -> bool:
        """Whether this session may ``level`` ("r", "rw", "admin") ``namespace``."""
        if not self.auth_required:
            return True
        if not self.authenticated:
            return False
        return _LEVEL.get(self.grants.get(namespace, self.grants.get("*", "")), 0) >= _LEVEL[level]

    def require(self, namespace: str, level: str) -> None:
        """Raise unless this session may ``level`` ("r", "rw", "admin") ``namespace``."""
        if not self.auth_required:
            return
        if not self.authenticated:
            raise AuthError("authentication required")
        if not self.may(namespace, level):
            raise PermissionDenied(f"tenant {self.tenant!r} has no {level!r} grant on {namespace!r}")
