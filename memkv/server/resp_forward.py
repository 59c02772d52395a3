"""Cluster forwarding for the RESP front end: keys owned by another node.

Imported only when the node runs in a cluster (``--etcd``): it is the one
place where the node side uses ``memkv.client`` (lazily, inside functions), so
a standalone node never imports the client or cluster packages.

A RESP request for a key another node owns is served with a ``memkv.client``
``Client`` connected to the cluster (``etcd://ETCD/CLUSTER``), one per tenant,
authenticated with that tenant's own token, so grants and tenant-scoped
namespaces behave exactly as if the Redis client had talked to the owner.
The RESP client needs no cluster awareness. Ownership comes from
``RespServer.is_local`` (by default: the node's route checks raise ``Moved``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from memkv.server.resp import Buffer, RespServer
    from memkv.server.session import Session


class ClientForwarder:
    """``RemoteBackend`` over ``memkv.client.Client`` (etcd:// routing)."""

    def __init__(self, server: RespServer, url: str | None = None) -> None:
        cfg = server.node.config
        self.server = server
        self.url = url or f"etcd://{cfg.etcd}/{cfg.cluster}"
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = trio.Lock()

    async def _client(self, session: Session) -> Any:
        tenant = session.tenant
        token = None
        if tenant:
            t = self.server.node.config.tenants.get(tenant)
            token = t.token if t is not None else None
        key = (tenant, token)  # a re-provisioned tenant (new token) gets a new client
        client = self._clients.get(key)
        if client is not None:
            return client
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                from memkv.client import Client

                stale = [k for k in self._clients if k[0] == tenant]
                for k in stale:
                    await self._clients.pop(k).aclose()
                # over TLS with the cluster CA when the nodes serve TLS (memkv/cluster/identity.py)
                member = getattr(self.server.node, "cluster_member", None)
                creds = getattr(member, "credentials", None)
                tls = creds.tls if creds is not None else None
                client = await Client.connect(self.url, tenant=tenant or None, token=token, tls=tls)
                self._clients[key] = client
        return client

    async def get_many(self, session: Session, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        c = await self._client(session)
        return list(await c.get_many(keys, namespace=namespace))

    async def put(self, session: Session, namespace: str, key: bytes, value: Buffer, ttl: float | None) -> None:
        c = await self._client(session)
        await c.put(key, value, namespace=namespace, ttl=ttl)

    async def delete(self, session: Session, namespace: str, key: bytes) -> bool:
        c = await self._client(session)
        return bool(await c.delete(key, namespace=namespace))

    async def exists_many(self, session: Session, namespace: str, keys: list[bytes]) -> list[bool]:
        c = await self._client(session)
        return list(await c.exists_many(keys, namespace=namespace))

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.aclose()


def cluster_is_local(server: RespServer) -> Callable[[Session, bytes, bool], bool]:
    """Ownership from the node's slot map (``node.cluster_member``, set by ``attach_cluster``).

    Reads are served locally when this node is one of the key's replicas; writes only
    when it is the *only* replica (otherwise the memkv client writes every replica).
    The node's route checks still run first, so a fenced node refuses writes.
    """
    from memkv.client.cluster_map import key_slot

    node = server.node

    def is_local(session: Session, key: bytes, write: bool) -> bool:
        for check in node.handlers.route_checks:  # fencing (no "ep": ownership is decided here)
            check(session, {}, [key], write)
        member = getattr(node, "cluster_member", None)
        view = getattr(member, "view", None)
        sm = view.state.slotmap if view is not None else None
        if sm is None:
            return True  # no slot map yet: nothing to forward to
        owners = sm.table[key_slot(key, sm.slots)]
        if write:
            return tuple(owners) == (node.node_id,)
        return node.node_id in owners

    return is_local


def install_forwarding(server: RespServer, url: str | None = None) -> ClientForwarder:
    fwd = ClientForwarder(server, url)
    server.remote = fwd
    server.is_local = cluster_is_local(server)
    return fwd
