"""Forwarding for a node's RESP front end: keys another node of the cluster serves.

A RESP client is not cluster-aware: it cannot follow ``Moved``. The node's
route stage (memkv/server/stages.py) marks the keys of its requests that this
node does not serve, and the pipeline runs those through the node's forwarder
(memkv/server/extension.py ``Forwarder``), which is this: a ``memkv.client``
``Client`` connected to the cluster (``etcd://ETCD/CLUSTER``), one per tenant,
authenticated with that tenant's own token, so grants and tenant-scoped
namespaces behave exactly as if the Redis client had talked to the owner.
It is one of the extensions ``memkv serve --etcd ... --resp-port ...`` builds
the node with (memkv/tools/cli.py).

The keys of one command are sent concurrently: a write or delete waits for every live
replica, and one that hangs (paused, cut off) costs the client timeout -- once per
command, not once per key (a ``DEL`` of 100 keys with a replica paused would otherwise
take 100 timeouts, long enough for the pause to outlive the lease).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from memkv.client import Client
from memkv.config import NodeConfig
from memkv.server.extension import Extension, NodeContext, Remote
from memkv.server.requests import Delete, Get, Peek, Put
from memkv.server.session import Session

T = TypeVar("T")
CONCURRENT_KEYS = 64  # calls of one command in flight at once


async def each(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` concurrently (at most ``CONCURRENT_KEYS`` at a time); their results in order.
    Every call runs to its end; then the first failure in call order is raised (as a key-by-key
    loop would have reported it, with the later keys attempted all the same)."""
    out: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)
    limit = trio.CapacityLimiter(CONCURRENT_KEYS)

    async def one(i: int, call: Callable[[], Awaitable[T]]) -> None:
        async with limit:
            try:
                out[i] = await call()
            except Exception as exc:  # noqa: BLE001 -- reported below, in call order
                errors[i] = exc

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    for exc in errors:
        if exc is not None:
            raise exc
    return out


class ClientForwarder:
    """The node's ``Forwarder`` over ``memkv.client.Client`` (etcd:// routing)."""

    def __init__(self, config: NodeConfig, tls: Callable[[], Any] = lambda: None, url: str | None = None) -> None:
        self.url = url or f"etcd://{config.etcd}/{config.cluster}"
        self.tls = tls  # the cluster's client TLS context, once known (memkv/cluster/identity.py)
        self.node: NodeContext | None = None  # the node this forwarder serves (``extend``)
        self._clients: dict[tuple[str, str | None], Client] = {}
        self._lock = trio.Lock()

    def extend(self, node: NodeContext) -> Extension:
        self.node = node
        return Extension("forwarding", forwarder=self)

    async def _client(self, session: Session) -> Client:
        tenant = session.tenant
        token = self.node.token_of(tenant) if tenant and self.node is not None else None
        key = (tenant, token)  # a re-provisioned tenant (new token) gets a new client
        client = self._clients.get(key)
        if client is not None:
            return client
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                for k in [k for k in self._clients if k[0] == tenant]:
                    await self._clients.pop(k).aclose()
                client = await Client.connect(self.url, tenant=tenant or None, token=token, tls=self.tls())
                self._clients[key] = client
        return client

    async def get(self, session: Session, req: Get) -> list[bytes | None]:
        c = await self._client(session)
        return list(await c.get_many(req.keys, namespace=req.ns))

    async def peek(self, session: Session, req: Peek) -> list[Remote | None]:
        c = await self._client(session)
        if req.lengths:  # the wire protocol has no length query: read the values
            return [None if v is None else Remote(len(v)) for v in await c.get_many(req.keys, namespace=req.ns)]
        return [Remote(0) if found else None for found in await c.exists_many(req.keys, namespace=req.ns)]

    async def put(self, session: Session, req: Put, values: list[Any]) -> None:
        c = await self._client(session)
        ttl = req.effective_ttl()
        await each([lambda k=key, v=value: c.put(k, v, namespace=req.ns, ttl=ttl)
                    for key, value in zip(req.keys, values, strict=True)])

    async def delete(self, session: Session, req: Delete) -> list[bool]:
        """Versioned deletes (``Client.delete`` stamps each with a version, as every memkv client
        does), so a RESP DEL leaves the same tombstones as a native one."""
        c = await self._client(session)
        return [bool(d) for d in await each([lambda k=key: c.delete(k, namespace=req.ns) for key in req.keys])]

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.aclose()
