"""HMAC-SHA256 challenge-response: the token never crosses the wire.

Both sides contribute a fresh random nonce per connection, so a captured
exchange cannot be replayed on another connection. The node also proves it
knows the token (mutual authentication).
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_SIZE = 32


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def client_proof(token: str, tenant: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    msg = b"memkv-client\0" + tenant.encode() + b"\0" + server_nonce + client_nonce
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def server_proof(token: str, tenant: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    msg = b"memkv-server\0" + tenant.encode() + b"\0" + client_nonce + server_nonce
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def tenant_salt(token: str, tenant: str) -> bytes:
    """A per-tenant secret salt for chain hashing (``PrefixHasher(salt=...)``, ``KVCacheConnector(salt=...)``).

    Derived from the tenant's token, so identical prompts of different tenants
    never share block keys, and nobody without the token can compute (and so
    probe for) another tenant's keys.
    """
    return hmac.new(token.encode(), b"memkv-chain-salt\0" + tenant.encode(), hashlib.sha256).digest()[:16]


# -- the cluster-internal identity (memkv/cluster... node-to-node calls) ------------------------------
#: The reserved tenant name of cluster-internal calls (rebalancer -> node, node -> node). No configured
#: or etcd tenant may take this name; a node accepts it only with the token derived from the cluster secret.
INTERNAL_TENANT = "__cluster__"


def internal_token(secret: str, cluster: str) -> str:
    """The token of :data:`INTERNAL_TENANT` in cluster ``cluster``, derived from the cluster secret."""
    msg = b"memkv-cluster-internal\0" + cluster.encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def is_reserved_tenant(name: str) -> bool:
    return name.startswith("__")
