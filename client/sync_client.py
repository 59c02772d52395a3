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
from memkv.client.client import FAILOVER_ERRORS, MOVED_RETRIES, TRANSPORTS, _security_meta, replicated_outcome
from memkv.client.onesided import OneSided
from memkv.client.ops import Send, StandaloneRouter
from memkv.client.pool import BlockingPool
from memkv.client.url import NodeAddress, parse_url
from memkv.errors import InvalidArgument, MemKVError, Moved, NodeUnavailable
from memkv.protocol.opcodes import Op


class SyncClient:
    def __init__(self, router: Any, pool: BlockingPool, *, timeout: float, transport: str) -> None:
        self.router = router
        self.pool = pool
        self.timeout = timeout
        self.transport = transport
        # one-sided reads (shared memory / RDMA) for transport auto|shm|rdma (client/onesided.py)
        self.onesided = OneSided(transport) if transport != "tcp" else None
        self._executor: ThreadPoolExecutor | None = None
        self._repl_executor: ThreadPoolExecutor | None = None  # cluster writes: one task per extra replica

    @classmethod
    def connect(cls, url: str, *, tenant: str | None = None, token: str | None = None,
                transport: str = "auto", timeout: float = 5.0, tls: Any = None) -> SyncClient:
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {TRANSPORTS}")
        from memkv.client.tls import client_context

        parsed = parse_url(url)
        ctx = client_context(tls if tls is not None else parsed.tls)  # memkvs:// or tls=...
        pool = BlockingPool(tenant=tenant, token=token, timeout=timeout, connect_timeout=min(timeout, 2.0), tls=ctx)
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
        if getattr(self, "onesided", None) is not None:
            self.onesided.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._repl_executor is not None:
            self._repl_executor.shutdown(wait=True)
            self._repl_executor = None
        close = getattr(self.router, "close", None)
        if close is not None:
            close()

    # -- the driver
    def _call_node(self, node: NodeAddress, send: Send) -> Any:
        self.router.stamp(send.call.meta)
        return self.pool.call(node, send.call)

    def _exec(self, send: Send) -> Any:
        if send.write and send.node is None and getattr(self.router, "clustered", False):
            return self._exec_replicated(send)
        nodes = [send.node] if send.node is not None else self.router.replicas(send.key)
        last: MemKVError | None = None
        for node in nodes:
            try:
                result = self._call_node(node, send)
                send.extra["served_by"] = node  # read fallback / repair (ops.get) skips it
                return result
            except FAILOVER_ERRORS as exc:
                last = exc
                if send.write:
                    raise
        raise last if last is not None else NodeUnavailable("no replica for key")

    def _exec_replicated(self, send: Send) -> Any:
        """Cluster write to every live replica in parallel (see Client._exec_replicated).
        The primary runs in this thread, the others in a pool of their own (never
        the batch pool, whose workers may be waiting here)."""
        nodes, pending = self.router.write_replicas(send.key)
        if not nodes:
            raise NodeUnavailable("no live replica for this key's slot")

        def one(node: NodeAddress) -> tuple[bool, Any]:
            try:
                return True, self._call_node(node, send)
            except MemKVError as exc:
                return False, exc

        if len(nodes) > 1 and self._repl_executor is None:
            self._repl_executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="memkv-repl")
        futures = [self._repl_executor.submit(one, n) for n in nodes[1:]] if len(nodes) > 1 else []
        outcomes = [one(nodes[0])] + [f.result() for f in futures]
        return replicated_outcome(outcomes, pending)

    def _exec_many(self, sends: list[Send]) -> list[Any]:
        if len(sends) == 1:
            return [self._exec_tolerant(sends[0]) if sends[0].tolerant else self._exec(sends[0])]
        # Parts of a batch owned by different nodes run in parallel: the first on this thread
        # (no hand-off for the request the caller waits on anyway), the others in the pool.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="memkv-batch")
        futures = [self._executor.submit(self._exec_tolerant if s.tolerant else self._exec, s) for s in sends[1:]]
        first = self._exec_tolerant(sends[0]) if sends[0].tolerant else self._exec(sends[0])
        return [first] + [f.result() for f in futures]

    def _exec_tolerant(self, send: Send) -> Any:
        try:
            return self._exec(send)
        except MemKVError as exc:
            return exc

    def _drive(self, gen: ops.Op_) -> Any:
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
                refresh(exc.epoch)
                gen = gen.restart()
                value, error = None, None
                continue
            value, error = None, None
            try:
                value = self._exec_many(req) if isinstance(req, list) else self._exec(req)
            except MemKVError as exc:
                error = exc

    # -- the API (DESIGN.md §9)
    def put(self, key: bytes | str, value: Any, *, namespace: str = "shared", ttl: float | None = None,
            pin: bool = False, parent: bytes | None = None, model: str | None = None, no_store: bool = False) -> None:
        self._drive(ops.put(key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent,
                            extra=_security_meta(model, no_store)))

    def get(self, key: bytes | str, *, namespace: str = "shared") -> bytes | None:
        if self.onesided is not None:
            return self.onesided.sread(self, [key], namespace, single=True)
        return self._drive(ops.get(key, namespace=namespace, router=self.router))

    def get_into(self, key: bytes | str, buffer: Any, *, namespace: str = "shared") -> int | None:
        if self.onesided is not None:
            return self.onesided.sread(self, [key], namespace, single=True, into=buffer)
        return self._drive(ops.get(key, namespace=namespace, into=buffer, router=self.router))

    def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str = "shared",
                 ttl: float | None = None, pin: bool = False, parents: list[bytes | None] | None = None,
                 model: str | None = None, no_store: bool = False) -> None:
        self._drive(ops.put_many(self.router, items, namespace=namespace, ttl=ttl, pin=pin, parents=parents,
                                 extra=_security_meta(model, no_store)))

    def get_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bytes | None]:
        if self.onesided is not None:
            return self.onesided.sread(self, list(keys), namespace)
        return self._drive(ops.get_many(self.router, keys, namespace=namespace))

    def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *,
                      namespace: str = "shared") -> list[int | None]:
        if self.onesided is not None:
            return self.onesided.sread(self, list(keys), namespace, intos=buffers)
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
