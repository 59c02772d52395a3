"""The trio client: ``Client.connect(url)`` -> put/get/... (DESIGN.md §9)."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

import trio

from memkv.client import ops
from memkv.client.onesided import OneSided
from memkv.client.ops import Send, StandaloneRouter
from memkv.client.pool import TrioPool
from memkv.client.url import NodeAddress, parse_url
from memkv.errors import (
    ConnectionLost,
    Fenced,
    InvalidArgument,
    MemKVError,
    Moved,
    NodeUnavailable,
    TimeoutError,
)
from memkv.protocol.opcodes import Op

# Errors after which the same request may be retried on another replica.
FAILOVER_ERRORS = (ConnectionLost, NodeUnavailable, TimeoutError)
TRANSPORTS = ("auto", "tcp", "shm", "rdma")
# Cluster: how often one operation is run again after MOVED (slot map changed) before giving up.
MOVED_RETRIES = 5


def replicated_outcome(outcomes: list[tuple[bool, Any]], pending: int = 0) -> Any:
    """Combine the replies of one write sent to every replica (primary first; the last
    ``pending`` are destinations of a slot being moved, ``ClusterRouter.write_replicas``).

    MOVED from any replica wins (the operation is run again on a fresh map).
    Owners that are dead (failover errors) or fenced did not store it and are
    not live: they are skipped, but at least one owner must have stored it (a write only a
    destination has is lost if the move is abandoned). A destination may not be skipped: it
    owns the slot once the move flips, so a write it lacks would be lost when the old owners
    free the slot. Any other error (e.g. KeyExists) is raised. Otherwise the first
    replica's result is returned."""
    errors = [r for ok, r in outcomes if not ok]
    moved = [e for e in errors if isinstance(e, Moved)]
    if moved:
        raise max(moved, key=lambda e: e.epoch)
    for e in errors:
        if not isinstance(e, (*FAILOVER_ERRORS, Fenced)):
            raise e
    owners = len(outcomes) - pending
    for ok, r in outcomes[owners:]:
        if not ok:
            raise r
    for ok, r in outcomes[:owners]:
        if ok:
            return r
    raise errors[0] if errors else NodeUnavailable("no owner of this key's slot is live")


def _security_meta(model: str | None, no_store: bool) -> dict[str, Any] | None:
    """``model``: provenance recorded in the node's audit log; ``no_store``: DRAM only, short TTL,
    never on flash, key hashed in the audit log (README "Security")."""
    if model is None and not no_store:
        return None
    meta: dict[str, Any] = {}
    if model is not None:
        meta["model"] = str(model)
    if no_store:
        meta["nostore"] = True
    return meta


class _Connecting:
    """``await Client.connect(...)`` or ``async with Client.connect(...) as c``."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._factory().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._factory()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()


class Client:
    """A trio client. Every method is a coroutine; many tasks may share one client."""

    def __init__(self, router: Any, pool: TrioPool, *, timeout: float, transport: str) -> None:
        self.router = router
        self.pool = pool
        self.timeout = timeout
        self.transport = transport
        # one-sided reads (shared memory / RDMA) for transport auto|shm|rdma (client/onesided.py)
        self.onesided = OneSided(transport) if transport != "tcp" else None

    @classmethod
    def connect(cls, url: str, *, tenant: str | None = None, token: str | None = None,
                transport: str = "auto", timeout: float = 5.0, pool_size: int = 2, tls: Any = None) -> _Connecting:
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {TRANSPORTS}")

        async def factory() -> Client:
            from memkv.client.tls import client_context

            parsed = parse_url(url)
            ctx = client_context(tls if tls is not None else parsed.tls)  # memkvs:// or tls=...
            pool = TrioPool(size=pool_size, tenant=tenant, token=token, connect_timeout=min(timeout, 2.0), tls=ctx)
            if parsed.scheme == "memkv":
                client = cls(StandaloneRouter(parsed.nodes[0]), pool, timeout=timeout, transport=transport)
                # Fail fast on a wrong address or token rather than at the first put.
                await client.ping()
                return client
            from memkv.client.cluster_router import open_cluster_router  # cluster mode

            router = await open_cluster_router(parsed)
            return cls(router, pool, timeout=timeout, transport=transport)

        return _Connecting(factory)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.pool.close()
        if getattr(self, "onesided", None) is not None:
            self.onesided.close()
        close = getattr(self.router, "aclose", None)
        if close is not None:
            await close()

    async def close(self) -> None:
        await self.aclose()

    # -- the driver
    async def _call_node(self, node: NodeAddress, send: Send) -> Any:
        meta = send.call.meta
        self.router.stamp(meta)
        with trio.move_on_after(self.timeout) as scope:
            conn = await self.pool.get(node)
            return await conn.call(send.call)
        if scope.cancelled_caught:
            self.pool.drop(node)
            raise TimeoutError(f"{node} did not answer within {self.timeout}s")
        raise AssertionError("unreachable")

    async def _exec(self, send: Send) -> Any:
        if send.write and send.node is None and getattr(self.router, "clustered", False):
            return await self._exec_replicated(send)
        nodes = [send.node] if send.node is not None else self.router.replicas(send.key)
        last: MemKVError | None = None
        for node in nodes:
            try:
                result = await self._call_node(node, send)
                send.extra["served_by"] = node  # read fallback / repair (ops.get) skips it
                return result
            except FAILOVER_ERRORS as exc:
                last = exc
                if send.write:
                    raise
        raise last if last is not None else NodeUnavailable("no replica for key")

    async def _exec_replicated(self, send: Send) -> Any:
        """Cluster write: sent to every live replica in parallel; acknowledged when
        all replicas that are alive stored it (a dead or fenced owner is skipped,
        at least one owner and every destination of a moving slot must succeed:
        ``replicated_outcome``). MOVED from any replica restarts the operation."""
        nodes, pending = self.router.write_replicas(send.key)
        if not nodes:
            raise NodeUnavailable("no live replica for this key's slot")
        outcomes: list[Any] = [None] * len(nodes)

        async def one(i: int, node: NodeAddress) -> None:
            try:
                outcomes[i] = (True, await self._call_node(node, send))
            except MemKVError as exc:
                outcomes[i] = (False, exc)

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(nodes):
                nursery.start_soon(one, i, node)
        return replicated_outcome(outcomes, pending)

    async def _exec_many(self, sends: list[Send]) -> list[Any]:
        if len(sends) == 1 and not sends[0].tolerant:
            return [await self._exec(sends[0])]
        results: list[Any] = [None] * len(sends)
        errors: list[BaseException] = []

        async def one(i: int, s: Send) -> None:
            try:
                results[i] = await self._exec(s)
            except MemKVError as exc:
                if s.tolerant:
                    results[i] = exc
                else:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i, s in enumerate(sends):
                nursery.start_soon(one, i, s)
        if errors:
            raise errors[0]
        return results

    async def _drive(self, gen: ops.Op_) -> Any:
        value: Any = None
        error: BaseException | None = None
        moved = 0
        while True:
            try:
                req = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value
            except Moved as exc:  # cluster: the slot map changed under us; refresh, run the op again
                moved += 1
                refresh = getattr(self.router, "refresh", None)
                if refresh is None or not hasattr(gen, "restart") or moved > MOVED_RETRIES:
                    raise
                await refresh(exc.epoch)
                gen = gen.restart()
                value, error = None, None
                continue
            value, error = None, None
            try:
                value = await (self._exec_many(req) if isinstance(req, list) else self._exec(req))
            except MemKVError as exc:
                error = exc

    # -- the API (DESIGN.md §9)
    async def put(self, key: bytes | str, value: Any, *, namespace: str = "shared", ttl: float | None = None,
                  pin: bool = False, parent: bytes | None = None, model: str | None = None,
                  no_store: bool = False) -> None:
        await self._drive(ops.put(key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent,
                                  extra=_security_meta(model, no_store)))

    async def get(self, key: bytes | str, *, namespace: str = "shared") -> bytes | None:
        if self.onesided is not None:
            return await self.onesided.aread(self, [key], namespace, single=True)
        return await self._drive(ops.get(key, namespace=namespace, router=self.router))

    async def get_into(self, key: bytes | str, buffer: Any, *, namespace: str = "shared") -> int | None:
        if self.onesided is not None:
            return await self.onesided.aread(self, [key], namespace, single=True, into=buffer)
        return await self._drive(ops.get(key, namespace=namespace, into=buffer, router=self.router))

    async def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *,
                       namespace: str = "shared", ttl: float | None = None, pin: bool = False,
                       parents: list[bytes | None] | None = None, model: str | None = None,
                       no_store: bool = False) -> None:
        await self._drive(ops.put_many(self.router, items, namespace=namespace, ttl=ttl, pin=pin,
                                       parents=parents, extra=_security_meta(model, no_store)))

    async def get_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bytes | None]:
        if self.onesided is not None:
            return await self.onesided.aread(self, list(keys), namespace)
        return await self._drive(ops.get_many(self.router, keys, namespace=namespace))

    async def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *,
                            namespace: str = "shared") -> list[int | None]:
        if self.onesided is not None:
            return await self.onesided.aread(self, list(keys), namespace, intos=buffers)
        return await self._drive(ops.get_many(self.router, keys, namespace=namespace, intos=buffers))

    async def exists_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bool]:
        return await self._drive(ops.keyed_batch(self.router, Op.EXISTS_MANY, keys, namespace=namespace,
                                                 field_name="ex"))

    async def delete(self, key: bytes | str, *, namespace: str = "shared") -> bool:
        return await self._drive(ops.delete(key, namespace=namespace))

    async def pin(self, keys: Iterable[bytes | str], *, ttl: float | None = None,
                  namespace: str = "shared") -> int:
        return await self._drive(ops.keyed_batch(self.router, Op.PIN, keys, namespace=namespace,
                                                 field_name="n", write=True,
                                                 extra={"ttl": ttl} if ttl is not None else None))

    async def unpin(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> int:
        return await self._drive(ops.keyed_batch(self.router, Op.UNPIN, keys, namespace=namespace,
                                                 field_name="n", write=True))

    async def lookup_prefix(self, keys: Iterable[bytes | str], *, lease: float = 5.0,
                            namespace: str = "shared") -> int:
        return await self._drive(ops.lookup_prefix(self.router, keys, namespace=namespace, lease=lease))

    async def stats(self) -> dict[str, Any]:
        return await self._drive(ops.stats(self.router))

    async def ping(self) -> list[Any]:
        return await self._drive(ops.ping(self.router))
