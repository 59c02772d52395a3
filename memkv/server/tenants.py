"""The tenants of a node: who may log in, with which grants, quota, rate and no-store setting.

The table starts with the config file's ``[tenants.*]``. A standalone node adds
``<data dir>/tenants.json``: tenants added or revoked at runtime with the ADMIN
operation (memkv/server/admin.py), persisted atomically; revocations of config
tenants are kept there too. A cluster node takes its tenants from a
:class:`~memkv.server.extension.TenantSource` instead (etcd, watched), given to
the node by the command-line layer.

The request path asks this table, through the pipeline's stages, whether a
session's tenant still exists as it logged in (a revoked or re-provisioned
tenant's open sessions are refused at their next request) and whether its
token bucket has a token (``rate`` requests/s, ``burst``). Logins -- the binary
protocol's HMAC challenge-response and RESP's ``AUTH [tenant] token`` -- are
checked here, in one place. The cluster-internal identity (``__cluster__``,
token derived from the cluster secret) is set with :meth:`set_internal`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import asdict
from typing import Any

from memkv.config import GRANT_LEVELS, TenantConfig, tenant_from_table
from memkv.engine.clock import SYSTEM, Clock
from memkv.engine.store import Store
from memkv.errors import AuthError, InvalidArgument, MemKVError
from memkv.protocol import auth
from memkv.server.requests import Auth, Hello, Login
from memkv.server.session import Session

log = logging.getLogger("memkv.security")

TENANTS_FILE = "tenants.json"
LEVELS = GRANT_LEVELS


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp", "now")

    def __init__(self, rate: float, burst: float | None = None, clock: Clock = SYSTEM) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        self.tokens = self.burst
        self.now = clock.monotonic
        self.stamp = self.now()

    def take(self, n: float = 1.0) -> bool:
        now = self.now()
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


def tenant_from_json(name: str, d: Any) -> TenantConfig:
    """A tenant of ``tenants.json`` or of a tenant source (the config file's reader: one set of checks)."""
    return tenant_from_table(name, d, f"tenant {name}")


class TenantRegistry:
    def __init__(self, configured: dict[str, TenantConfig], store: Store, *, data_dir: str = "",
                 source: str = "node", clock: Clock = SYSTEM) -> None:
        self.tenants: dict[str, TenantConfig] = dict(configured)
        self.store = store
        self.clock = clock
        self.source = source  # "node" (config + tenants.json) or the name of a TenantSource ("etcd")
        self.buckets: dict[str, TokenBucket] = {}
        self.revoked: set[str] = set()
        self.runtime: dict[str, TenantConfig] = {}  # added at runtime on a standalone node (persisted)
        self.path = os.path.join(data_dir, TENANTS_FILE) if data_dir and source == "node" else None
        # the cluster-internal identity, once the cluster secret is known; nobody can log in as it before
        self.internal: TenantConfig | None = None
        self.rate_limited = 0
        self.revoked_refusals = 0

    # -- the table
    def __bool__(self) -> bool:
        return bool(self.tenants)

    def __len__(self) -> int:
        return len(self.tenants)

    def get(self, name: str) -> TenantConfig | None:
        return self.tenants.get(name)

    def names(self) -> list[str]:
        return list(self.tenants)

    def load_file(self) -> None:
        """A standalone node's runtime tenants and revocations (``tenants.json``).

        Whatever the file holds, the node starts or refuses with a typed error naming the file --
        the file is edited by hand and survives crashes (tests/test_fuzz_tenants.py).
        """
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path, "rb") as f:
                    raw = json.loads(f.read())
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"cannot read {self.path}: {exc}") from None
            revoked = raw.get("revoked", []) if isinstance(raw, dict) else None
            tenants = raw.get("tenants", {}) if isinstance(raw, dict) else None
            if not isinstance(revoked, list) or not all(isinstance(n, str) for n in revoked) \
                    or not isinstance(tenants, dict):
                raise InvalidArgument(f"{self.path}: want {{\"tenants\": {{NAME: {{...}}}}, \"revoked\": [NAME, ...]}}")
            for name, d in tenants.items():
                try:
                    t = tenant_from_json(name, d)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{self.path}: {exc.message}") from None
                self.runtime[name] = t
            self.revoked = set(revoked)
            for name in self.revoked:
                self.tenants.pop(name, None)
            self.tenants.update(self.runtime)
        self._refresh()

    def set(self, t: TenantConfig) -> None:
        self.tenants[t.name] = t
        self._refresh()

    def drop(self, name: str) -> bool:
        found = self.tenants.pop(name, None) is not None
        self._refresh()
        return found

    def apply_json(self, name: str, value: bytes | None) -> None:
        """A tenant record from a tenant source (None: it was removed); a malformed one is ignored."""
        if value is None:
            self.drop(name)
            return
        try:
            self.set(tenant_from_json(name, json.loads(value)))
        except (ValueError, MemKVError) as exc:
            log.error("tenant %s from %s is malformed (%s); ignored", name, self.source, exc)

    def set_internal(self, token: str) -> None:
        """Accept the cluster identity with this token (derived from the cluster secret)."""
        self.internal = TenantConfig(auth.INTERNAL_TENANT, token, {"*": "rw"})

    def _refresh(self) -> None:
        """Quotas and buckets from the table (after any change)."""
        self.store.set_tenant_quotas({n: t.quota for n, t in self.tenants.items() if t.quota is not None})
        buckets = {}
        for n, t in self.tenants.items():
            if t.rate is not None:
                old = self.buckets.get(n)
                if old is not None and old.rate == t.rate and old.burst == (t.burst or max(t.rate, 1.0)):
                    buckets[n] = old
                else:
                    buckets[n] = TokenBucket(t.rate, t.burst, self.clock)
        self.buckets = buckets

    # -- runtime changes of a standalone node (ADMIN)
    def add_runtime(self, t: TenantConfig) -> None:
        self.runtime[t.name] = t
        self.revoked.discard(t.name)
        self.set(t)

    def revoke_runtime(self, name: str) -> bool:
        found = self.drop(name)
        self.runtime.pop(name, None)
        self.revoked.add(name)
        return found

    def persist_sync(self) -> None:
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

    # -- logins (the HELLO / AUTH / LOGIN operations)
    def hello(self, session: Session, req: Hello) -> bytes:
        session.server_nonce = auth.new_nonce()
        return session.server_nonce

    def authenticate(self, session: Session, req: Auth) -> bytes:
        """Binary login: verify the client's proof over both nonces; returns the server's proof."""
        snonce, session.server_nonce = session.server_nonce, None  # one try per nonce
        internal = req.tenant == auth.INTERNAL_TENANT
        tenant = self.internal if internal else self.tenants.get(req.tenant or "")
        if snonce is None:
            raise AuthError("send HELLO first")
        if tenant is None or not auth.verify(auth.client_proof(tenant.token, req.tenant, snonce, req.cnonce),
                                             req.proof):
            raise AuthError("authentication failed")
        session.login(tenant, internal=internal)
        return auth.server_proof(tenant.token, req.tenant, snonce, req.cnonce)

    def login(self, session: Session, req: Login) -> None:
        """RESP login: ``AUTH tenant token``, or ``AUTH token`` (the tenant whose token it is)."""
        if not self.tenants:
            raise InvalidArgument("AUTH <password> called without any password configured for the default "
                                  "user. Are you sure your configuration is correct?")
        found = None
        if req.tenant is not None and req.tenant != "default":
            t = self.tenants.get(req.tenant)
            if t is not None and hmac.compare_digest(t.token.encode(), req.token):
                found = t
        else:
            for t in self.tenants.values():
                if hmac.compare_digest(t.token.encode(), req.token):
                    found = t
        if found is None:
            raise AuthError("invalid username-password pair or user is disabled.")
        session.login(found)

    # -- the request path (called by the stages)
    def check_current(self, session: Session) -> None:
        """Refuse a session whose tenant was revoked or re-provisioned since it logged in."""
        t = self.tenants.get(session.tenant)
        if t is None or t is not session.tenant_cfg:
            session.logout()
            self.revoked_refusals += 1
            raise AuthError(f"tenant {session.tenant!r} was revoked or re-provisioned; authenticate again")

    def take(self, tenant: str) -> TokenBucket | None:
        """A token from ``tenant``'s bucket; the bucket when it is empty, else None."""
        b = self.buckets.get(tenant)
        if b is not None and not b.take():
            self.rate_limited += 1
            return b
        return None

    def stats(self) -> dict[str, Any]:
        return {"tenants": len(self.tenants), "rate_limited": self.rate_limited,
                "revoked_refusals": self.revoked_refusals}
