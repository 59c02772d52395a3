"""The blocking client: the same methods as ``Client``, usable from plain threads.

The data path runs on blocking sockets in the caller's thread (see
sync_connection.py); there is no event-loop hop per request. A cluster client
also keeps its slot map fresh, which the cluster router does on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memkv.client import ops
from memkv.client.client import FAILOVER_ERRORS, TRANSPORTS
from memkv.client.ops import Send, StandaloneRouter
from memkv.client.pool import BlockingPool
from memkv.client.url import NodeAddress, parse_url
from memkv.errors import InvalidArgument, MemKVError, NodeUnavailable
from memkv.protocol.opcodes import Op


class SyncClient:
    def __init__(self, router: Any, pool: BlockingPool, *, timeout: float, transport: str) -> None:
        self.router = router
        self.pool = pool
        self.timeout = timeout
        self.transport = transport
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def connect(cls, url: str, *, tenant: str | None = None, token: str | None = None,
                transport: str = "auto", timeout: float = 5.0) -> SyncClient:
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {TRANSPORTS}")
        parsed = parse_url(url)
        pool = BlockingPool(tenant=tenant, token=token, timeout=timeout, connect_timeout=min(timeout, 2.0))
        if parsed.scheme == "memkv":
            client = cls(StandaloneRouter(parsed.nodes[0]), pool, timeout=timeout, transport=transport)
            try:
                client.ping()
            except BaseException:
                client.close()
                raise
            return client
        from memkv.client.cluster_router import open_sync_cluster_router

        return cls(open_sync_cluster_router(parsed), pool, timeout=timeout, transport=transport)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        close = getattr(self.router, "close", None)
        if close is not None:
            close()

    # -- the driver
    def _call_node(self, node: NodeAddress, send: Send) -> Any:
        self.router.stamp(send.call.meta)
        return self.pool.call(node, send.call)

    def _exec(self, send: Send) -> Any:
        nodes = [send.node] if send.node is not None else self.router.replicas(send.key)
        last: MemKVError | None = None
        for node in nodes:
            try:
                return self._call_node(node, send)
            except FAILOVER_ERRORS as exc:
                last = exc
                if send.write:
                    raise
        raise last if last is not None else NodeUnavailable("no replica for key")

    def _exec_many(self, sends: list[Send]) -> list[Any]:
        if len(sends) == 1:
            return [self._exec(sends[0])]
        # Parts of a batch owned by different nodes run in parallel.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="memkv-batch")
        futures = [self._executor.submit(self._exec, s) for s in sends]
        return [f.result() for f in futures]

    def _drive(self, gen: ops.Op_) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                req = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = self._exec_many(req) if isinstance(req, list) else self._exec(req)
            except MemKVError as exc:
                error = exc

    # -- the API (DESIGN.md §9)
    def put(self, key: bytes | str, value: Any, *, namespace: str = "shared", ttl: float | None = None,
            pin: bool = False, parent: bytes | None = None) -> None:
        self._drive(ops.put(key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent))

    def get(self, key: bytes | str, *, namespace: str = "shared") -> bytes | None:
        return self._drive(ops.get(key, namespace=namespace))

    def get_into(self, key: bytes | str, buffer: Any, *, namespace: str = "shared") -> int | None:
        return self._drive(ops.get(key, namespace=namespace, into=buffer))

    def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str = "shared",
                 ttl: float | None = None, pin: bool = False, parents: list[bytes | None] | None = None) -> None:
        self._drive(ops.put_many(self.router, items, namespace=namespace, ttl=ttl, pin=pin, parents=parents))

    def get_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bytes | None]:
        return self._drive(ops.get_many(self.router, keys, namespace=namespace))

    def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *,
                      namespace: str = "shared") -> list[int | None]:
        return self._drive(ops.get_many(self.router, keys, namespace=namespace, intos=buffers))

    def exists_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bool]:
        return self._drive(ops.keyed_batch(self.router, Op.EXISTS_MANY, keys, namespace=namespace,
                                           field_name="ex"))

    def delete(self, key: bytes | str, *, namespace: str = "shared") -> bool:
        return self._drive(ops.delete(key, namespace=namespace))

    def pin(self, keys: Iterable[bytes | str], *, ttl: float | None = None, namespace: str = "shared") -> int:
        return self._drive(ops.keyed_batch(self.router, Op.PIN, keys, namespace=namespace, field_name="n",
                                           write=True, extra={"ttl": ttl} if ttl is not None else None))

    def unpin(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> int:
        return self._drive(ops.keyed_batch(self.router, Op.UNPIN, keys, namespace=namespace, field_name="n",
                                           write=True))

    def lookup_prefix(self, keys: Iterable[bytes | str], *, lease: float = 5.0, namespace: str = "shared") -> int:
        return self._drive(ops.lookup_prefix(self.router, keys, namespace=namespace, lease=lease))

    def stats(self) -> dict[str, Any]:
        return self._drive(ops.stats(self.router))

    def ping(self) -> list[Any]:
        return self._drive(ops.ping(self.router))
