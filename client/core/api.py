"""``ClientCore``: the client API (README "Using it") as operations, written once for both executors.

``Client`` (trio) and ``SyncClient`` (blocking) are thin: each public method
asks the core for an operation and runs it with its executor's one driver
loop (``client/executors/``). Everything a method means — validation,
one-sided or TCP, routing, failover, repair, restarts after ``MOVED`` —
is decided here and below, without I/O, so both clients behave the same by
construction and the decisions can be tested by feeding replies to an
operation (``tests/test_client_core.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from memkv.client.core import ops
from memkv.client.core.calls import Call, SimpleCall
from memkv.client.core.dispatch import call_node, restarting
from memkv.client.core.onesided import OneSidedReads
from memkv.client.core.requests import Blocking, Op
from memkv.client.core.routing import ClusterRouter, Router, StandaloneRouter, WorkersRouter, worker_layout
from memkv.client.url import NodeAddress, ParsedURL
from memkv.errors import InvalidArgument
from memkv.protocol.opcodes import Op as Opcode

TRANSPORTS = ("auto", "tcp", "shm", "rdma")


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"transport must be one of {TRANSPORTS}")


def security_meta(model: str | None, no_store: bool) -> dict[str, Any] | None:
    """``model``: provenance recorded in the node's audit log; ``no_store``: DRAM only, short TTL,
    never on flash, key hashed in the audit log (docs/security.md)."""
    if model is None and not no_store:
        return None
    meta: dict[str, Any] = {}
    if model is not None:
        meta["model"] = str(model)
    if no_store:
        meta["nostore"] = True
    return meta


class ClientCore:
    """Everything a client does, as operations over one router (and one-sided transports)."""

    def __init__(self, router: Router, *, transport: str = "tcp") -> None:
        check_transport(transport)
        self.router = router
        # one-sided reads (shared memory / RDMA) for transport auto|shm|rdma (client/core/onesided.py)
        self.onesided = OneSidedReads(transport) if transport != "tcp" else None

    @classmethod
    def connect(cls, parsed: ParsedURL, *, transport: str) -> Op:
        """The operation that connects: a ``ClientCore`` for ``memkv://`` (one node, or the workers its
        HELLO names; asked now so that a wrong address or token fails here rather than at the first
        put) or ``etcd://`` (the slot map read and watched)."""
        check_transport(transport)
        if parsed.scheme == "memkv":
            node = parsed.nodes[0]
            one = cls(StandaloneRouter(node), transport=transport)
            yield from one.ping()
            if parsed.direct:
                return one
            # a worker of ``memkv serve --workers N`` names all N in its HELLO reply: keys are then
            # routed to them by slot. Only the node asked is asked: one worker being down must not
            # keep clients of the others from connecting.
            hello = yield from call_node(one.router, node, SimpleCall(Opcode.HELLO, {}))
            workers = worker_layout(node, hello.get("workers") or [])
            return cls(WorkersRouter(workers), transport=transport) if len(workers) > 1 else one
        router = yield Blocking(ClusterRouter.open, parsed)
        return cls(router, transport=transport)

    def close(self) -> Op:
        """Release the transports and the router (a cluster router's watcher thread)."""
        if self.onesided is not None:
            yield from self.onesided.close(self.router)
        if self.router.clustered:
            yield Blocking(self.router.close)

    def _op(self, fn: Callable[..., Op], *args: Any, **kwargs: Any) -> Op:
        """``fn(router, ...)``; in a cluster run again from the start after MOVED (``dispatch.restarting``)."""
        if self.router.clustered:
            return restarting(self.router, fn, self.router, *args, **kwargs)
        return fn(self.router, *args, **kwargs)

    # -- the API (README "Using it"); the executors give the defaults
    def put(self, key: bytes | str, value: Any, *, namespace: str, ttl: float | None, pin: bool,
            parent: bytes | None = None, model: str | None = None, no_store: bool = False) -> Op:
        return self._op(ops.put, key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent,
                        extra=security_meta(model, no_store))

    def get(self, key: bytes | str, *, namespace: str) -> Op:
        if self.onesided is not None:
            return self._op(self.onesided.read, [key], namespace, single=True)
        return self._op(ops.get, key, namespace=namespace)

    def get_into(self, key: bytes | str, buffer: Any, *, namespace: str) -> Op:
        if self.onesided is not None:
            return self._op(self.onesided.read, [key], namespace, single=True, into=buffer)
        return self._op(ops.get, key, namespace=namespace, into=buffer)

    def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str,
                 ttl: float | None = None, pin: bool = False, parents: list[bytes | None] | None = None,
                 model: str | None = None, no_store: bool = False) -> Op:
        pairs = list(items.items()) if isinstance(items, dict) else list(items)
        extra = security_meta(model, no_store)
        return in_batches(len(pairs), lambda s: self._op(
            ops.put_many, pairs[s], namespace=namespace, ttl=ttl, pin=pin,
            parents=parents[s] if parents else None, extra=extra))

    def get_many(self, keys: Iterable[bytes | str], *, namespace: str) -> Op:
        ks = list(keys)
        if self.onesided is not None:
            return in_batches(len(ks), lambda s: self._op(self.onesided.read, ks[s], namespace))
        return in_batches(len(ks), lambda s: self._op(ops.get_many, ks[s], namespace=namespace))

    def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *, namespace: str) -> Op:
        ks = list(keys)
        if len(buffers) != len(ks):
            raise InvalidArgument("get_many_into needs one buffer per key")
        if self.onesided is not None:
            return in_batches(len(ks), lambda s: self._op(self.onesided.read, ks[s], namespace, intos=buffers[s]))
        return in_batches(len(ks), lambda s: self._op(ops.get_many, ks[s], namespace=namespace, intos=buffers[s]))

    def exists_many(self, keys: Iterable[bytes | str], *, namespace: str) -> Op:
        ks = list(keys)
        return in_batches(len(ks), lambda s: self._op(ops.keyed_batch, Opcode.EXISTS_MANY, ks[s],
                                                       namespace=namespace, field_name="ex"))

    def delete(self, key: bytes | str, *, namespace: str) -> Op:
        return self._op(ops.delete, key, namespace=namespace)

    def pin(self, keys: Iterable[bytes | str], *, ttl: float | None, namespace: str) -> Op:
        ks = list(keys)
        return in_batches(len(ks), lambda s: self._op(ops.keyed_batch, Opcode.PIN, ks[s], namespace=namespace,
                                                       field_name="n", is_write=True,
                                                       extra={"ttl": ttl} if ttl is not None else None), sum)

    def unpin(self, keys: Iterable[bytes | str], *, namespace: str) -> Op:
        ks = list(keys)
        return in_batches(len(ks), lambda s: self._op(ops.keyed_batch, Opcode.UNPIN, ks[s], namespace=namespace,
                                                       field_name="n", is_write=True), sum)

    def lookup_prefix(self, keys: Iterable[bytes | str], *, lease: float, namespace: str) -> Op:
        return self._op(ops.lookup_prefix, keys, namespace=namespace, lease=lease)

    def stats(self) -> Op:
        return ops.stats(self.router)

    def ping(self) -> Op:
        return ops.ping(self.router)

    def call(self, node: NodeAddress, call: Call) -> Op:
        """One raw ``call`` on ``node`` (tools and tests: a request the API has no method for)."""
        return call_node(self.router, node, call)


class ClientBase:
    """What ``Client`` and ``SyncClient`` share: a core, an executor that runs its operations, and
    views of both (``router``: where keys go; ``onesided``: transports and counters; ``pool``: the
    executor's connections)."""

    def __init__(self, core: ClientCore, executor: Any) -> None:
        self.core = core
        self._executor = executor

    @property
    def router(self) -> Router:
        return self.core.router

    @property
    def onesided(self) -> OneSidedReads | None:
        return self.core.onesided

    @property
    def pool(self) -> Any:
        return self._executor.pool


def in_batches(n: int, part: Callable[[slice], Op], combine: Callable[[list[Any]], Any] | None = None) -> Op:
    """The operation ``part(slice)`` over ``n`` keys in slices of at most ``ops.BATCH_KEYS`` (what a
    node takes in one request), one after another, each restarted on its own after ``MOVED``;
    results are concatenated (lists) or ``combine``d. Up to ``ops.BATCH_KEYS`` keys it is ``part``
    itself, so the common case adds no generator."""
    if n <= ops.BATCH_KEYS:
        return part(slice(0, n))
    return _in_batches(n, part, combine)


def _in_batches(n: int, part: Callable[[slice], Op], combine: Callable[[list[Any]], Any] | None) -> Op:
    results = []
    for start in range(0, n, ops.BATCH_KEYS):
        results.append((yield from part(slice(start, start + ops.BATCH_KEYS))))
    if combine is not None:
        return combine(results)
    return [r for res in results for r in res]
