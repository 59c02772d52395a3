"""Prefix chains (docs/engines.md) as operations: what the engine integrations do, written once.

``save_chain`` stores the blocks of one prompt as a chain (parent of block
*i* is block *i-1*, so the node evicts tails before heads), skipping blocks
that exist; ``load_chain`` asks ``lookup_prefix`` how long the cached leading
run is (which leases it, so eviction cannot take it before the fetch) and
fetches it into the caller's buffers. Both run on any executor
(``client.execute(op)``); ``client/prefix.py`` and ``client/kvcache.py``
build on them.

They take ``store``: an object whose methods return operations — a client's
``ClientCore``, or ``DirectSurface`` over any other store with the client
surface (the Redis adapter of ``bench/``), whose operations do their work
without asking an executor for anything (``run_direct``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from memkv.client.core.requests import Op
from memkv.errors import KeyExists


def save_chain(store: Any, keys: Sequence[bytes], make_values: Callable[[list[int]], Sequence[Any]], *,
               namespace: str, ttl: float | None = None, skip_existing: bool = True) -> Op:
    """Store the blocks of ``keys`` as one chain; how many were written.

    ``make_values(todo)`` gives the values of the blocks at positions ``todo``
    (those not stored yet), so a caller builds only what is missing. A
    concurrent writer of the same block (``KeyExists``) is not an error: that
    block is stored."""
    if not keys:
        return 0
    todo = list(range(len(keys)))
    if skip_existing:
        present = yield from store.exists_many(list(keys), namespace=namespace)
        todo = [i for i in todo if not present[i]]
    if not todo:
        return 0
    values = make_values(todo)
    parents: list[bytes | None] = [keys[i - 1] if i > 0 else None for i in todo]
    try:
        yield from store.put_many(list(zip([keys[i] for i in todo], values, strict=True)), namespace=namespace,
                                  ttl=ttl, parents=parents)
    except KeyExists:
        pass  # a racing replica stored (a bitwise different recompute of) the same prefix first
    return len(todo)


def load_chain(store: Any, keys: Sequence[bytes], make_buffers: Callable[[int], Sequence[Any]], *,
               namespace: str, lease: float) -> Op:
    """``(n, got)``: ``n`` leading blocks of ``keys`` are cached (and leased); ``got`` is what
    ``get_many_into`` read of them into ``make_buffers(n)`` (a ``None`` where a block went
    missing since the lookup: a node failure, a checksum mismatch)."""
    if not keys:
        return 0, []
    n = int((yield from store.lookup_prefix(list(keys), lease=lease, namespace=namespace)))
    if n == 0:
        return 0, []
    got = yield from store.get_many_into(list(keys[:n]), list(make_buffers(n)), namespace=namespace)
    return n, got


def first_hole(got: Sequence[Any]) -> int:
    """Blocks are used only up to the first one that went missing, never past it."""
    for i, g in enumerate(got):
        if g is None:
            return i
    return len(got)


class DirectSurface:
    """Another store with the client surface (``exists_many``, ``put_many``, ``lookup_prefix``,
    ``get_many_into``, ``get``), seen as a store of operations that need no executor."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def exists_many(self, keys: list[bytes], *, namespace: str) -> Op:
        return _done(self.client.exists_many(keys, namespace=namespace))

    def put_many(self, items: list[tuple[bytes, Any]], *, namespace: str, ttl: float | None = None,
                 parents: list[bytes | None] | None = None) -> Op:
        return _done(self.client.put_many(items, namespace=namespace, ttl=ttl, parents=parents))

    def lookup_prefix(self, keys: list[bytes], *, lease: float, namespace: str) -> Op:
        return _done(self.client.lookup_prefix(keys, lease=lease, namespace=namespace))

    def get_many_into(self, keys: list[bytes], buffers: list[Any], *, namespace: str) -> Op:
        return _done(self.client.get_many_into(keys, buffers, namespace=namespace))

    def get(self, key: bytes, *, namespace: str) -> Op:
        return _done(self.client.get(key, namespace=namespace))


def _done(value: Any) -> Op:
    return value
    yield  # noqa: B901 - an operation that asks for nothing


def run_direct(op: Op) -> Any:
    """Run an operation over a ``DirectSurface``: it ends without asking for anything."""
    try:
        request = op.send(None)
    except StopIteration as stop:
        return stop.value
    op.close()
    raise TypeError(f"{request!r}: this store has no executor; only a memkv client runs client requests")
