"""Per-connection state: who is on the other end and what they may do."""

from __future__ import annotations

from dataclasses import dataclass, field

from memkv.config import TenantConfig
from memkv.errors import AuthError, PermissionDenied

_LEVEL = {"r": 1, "rw": 2, "w": 2, "admin": 3}


@dataclass
class Session:
    auth_required: bool
    tenant: str = ""
    authenticated: bool = False
    server_nonce: bytes | None = None
    grants: dict[str, str] = field(default_factory=dict)
    peer: str = ""
    # the cluster-internal identity (memkv.protocol.auth.INTERNAL_TENANT): rebalancer and node-to-node calls
    internal: bool = False

    def login(self, tenant: TenantConfig, *, internal: bool = False) -> None:
        self.tenant = tenant.name
        self.grants = dict(tenant.grants)
        self.authenticated = True
        self.internal = internal

    def require_login(self) -> None:
        if self.auth_required and not self.authenticated:
            raise AuthError("authentication required")

    def require_internal(self, what: str, *, auth_enabled: bool) -> None:
        """Cluster-internal ops (slot migration): only the cluster identity, once the node has tenants."""
        if self.internal or not (auth_enabled or self.auth_required):
            return
        if not self.authenticated:
            raise AuthError("authentication required")
        raise PermissionDenied(f"{what} is a cluster-internal operation: tenant {self.tenant!r} may not use it")

    def require(self, namespace: str, level: str) -> None:
        """Raise unless this session may ``level`` ("r", "rw", "admin") ``namespace``."""
        if not self.auth_required:
            return
        if not self.authenticated:
            raise AuthError("authentication required")
        have = _LEVEL.get(self.grants.get(namespace, self.grants.get("*", "")), 0)
        if have < _LEVEL[level]:
            raise PermissionDenied(f"tenant {self.tenant!r} has no {level!r} grant on {namespace!r}")
