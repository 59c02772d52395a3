"""The cluster-internal identity: credentials and TLS of node-to-node and rebalancer-to-node calls.

In a cluster with tenants, every connection must authenticate; the calls the
cluster makes to itself (``SLOT_SIZES`` / ``MIGRATE_PUSH`` / ``DROP_SLOTS`` from
the rebalancer, the ``PUT_MANY`` copies of a push, RESP forwarding's map
lookups) log in as the reserved tenant ``__cluster__``
(:data:`memkv.protocol.auth.INTERNAL_TENANT`) with a token derived from the
**cluster secret** (:func:`memkv.protocol.auth.internal_token`, HMAC-SHA256 of
the cluster name). Nodes accept that tenant only with that token; no
configured or etcd tenant may use the name (names starting with ``__`` are
reserved), and only this identity may run the migration ops or write values on
behalf of another tenant (``PUT_MANY`` ``owner``: a migrated value keeps its
tenant and its tenant-scoped namespace).

Where the secret comes from, first match wins:

1. ``[cluster] secret = "..."`` or ``[cluster] secret_file = "PATH"`` in the node
   config (``memkv rebalancer --secret-file PATH``), or ``MEMKV_CLUSTER_SECRET``;
2. etcd ``/memkv/<cluster>/secret``: created (random, 256 bits) by whichever
   node or rebalancer comes first, read by everyone else. Whoever can read etcd
   can then act as the cluster (as with the tenant tokens under ``tenants/``):
   etcd must be access-controlled (client TLS / etcd auth, private network).

TLS: when a node serves TLS (``[tls] cert/key``), its node-to-node calls use
TLS too, verifying peers with ``[cluster] tls_ca`` (default ``[tls] ca``, else
the system trust store); when the node requires client certificates
(``[tls] ca``), it presents ``[cluster] tls_cert/tls_key`` (default its own
``[tls] cert/key``). Peer certificates must name the address the peer
advertises (``[cluster] tls_check_hostname = false`` turns that check off).
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from typing import Any

from memkv.errors import InvalidArgument
from memkv.protocol.auth import INTERNAL_TENANT, internal_token

log = logging.getLogger("memkv.cluster")

ENV_SECRET = "MEMKV_CLUSTER_SECRET"


def secret_key(cluster: str) -> str:
    return f"/memkv/{cluster}/secret"


@dataclass(frozen=True)
class Credentials:
    """What a pool needs to talk to cluster nodes as the cluster: tenant, token and TLS context."""

    tenant: str | None = None
    token: str | None = None
    tls: ssl.SSLContext | None = None

    def pool_kwargs(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "token": self.token, "tls": self.tls}


def credentials(secret: str | None, cluster: str, tls: ssl.SSLContext | None = None) -> Credentials:
    if not secret:
        return Credentials(tls=tls)
    return Credentials(INTERNAL_TENANT, internal_token(secret, cluster), tls)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the cluster secret file {path}: {exc}") from None
    if not secret:
        raise InvalidArgument(f"the cluster secret file {path} is empty")
    return secret


def configured_secret(opts: dict[str, Any], *, secret_file: str | None = None) -> str | None:
    """The secret from ``[cluster] secret`` / ``secret_file`` (or ``secret_file`` given), else the environment."""
    if secret_file:
        return _read_file(secret_file)
    if opts.get("secret"):
        return str(opts["secret"])
    if opts.get("secret_file"):
        return _read_file(str(opts["secret_file"]))
    return os.environ.get(ENV_SECRET) or None


def etcd_secret(etcd: Any, cluster: str) -> str:
    """The cluster secret kept in etcd, created (first formation) when there is none (blocking)."""
    key = secret_key(cluster)
    kv, _ = etcd.get(key)
    if kv is None:
        if etcd.create(key, secrets.token_hex(32)):
            log.info("cluster %s: generated the cluster secret (%s)", cluster, key)
        kv, _ = etcd.get(key)
    if kv is None or not kv.value:
        raise InvalidArgument(f"cluster secret {key} is empty in etcd")
    return kv.value.decode()


def client_tls(tls_cfg: dict[str, Any], opts: dict[str, Any]) -> ssl.SSLContext | None:
    """The client-side TLS context of node-to-node calls, or None when the node serves plain TCP."""
    if not tls_cfg.get("cert") and not opts.get("tls_ca"):
        return None
    ca = opts.get("tls_ca") or tls_cfg.get("ca")
    try:
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
        if str(opts.get("tls_check_hostname", True)).lower() in ("false", "0", "no", "off"):
            ctx.check_hostname = False
        cert = opts.get("tls_cert") or (tls_cfg.get("cert") if tls_cfg.get("ca") else None)
        key = opts.get("tls_key") or (tls_cfg.get("key") if tls_cfg.get("ca") else None)
        if cert and key:  # the peers require client certificates (mutual TLS)
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cluster TLS: cannot load CA/certificate ({ca}): {exc}") from None
    return ctx


def node_tls(cfg: Any) -> ssl.SSLContext | None:
    return client_tls(cfg.extra.get("tls") or {}, dict(cfg.extra.get("cluster") or {}))


def install_secret(tenants: Any, secret: str, cluster: str, cfg: Any) -> Credentials:
    """Let the node's tenant table accept the cluster identity; returns the credentials its own calls use."""
    token = internal_token(secret, cluster)
    tenants.set_internal(token)
    return Credentials(INTERNAL_TENANT, token, node_tls(cfg))
