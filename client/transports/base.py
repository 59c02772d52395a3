"""The interface between the client core and a one-sided transport."""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

from memkv.protocol.index_format import ReaderSlot

# (offset in the node's region, length, where the bytes go, whether to return their xxh3 checksum)
ReadRequest = tuple[int, int, memoryview, bool]


class OneSidedTransport(Protocol):
    """Reads of one node's region, set up once per (client, node).

    ``read`` copies the bytes of each request into its destination, **in
    order**: a request's bytes are read from the region after those of the
    requests before it (the index protocol re-reads an entry after its value;
    RDMA READs of one queue pair are carried out in order, and x86 keeps loads
    in order). It is a generator so that one code serves the trio and the
    blocking executors: it yields (``None``) whenever it must wait for the
    hardware -- an RDMA completion -- and returns, per request, the xxh3
    checksum of the bytes it copied (0 where none was asked). It raises on any
    failure, after which the core stops using the transport for that node (and
    reads over TCP, in the same call).
    """

    kind: str  # "shm" | "rdma"
    waits: bool  # False: ``read`` never yields, and ``copy(reqs)`` does the same without a generator
    region_id: str  # the node region it reads (a restarted node has a new one)
    broken: bool

    def read(self, reqs: list[ReadRequest]) -> Generator[None, None, list[int]]: ...

    def copy(self, reqs: list[ReadRequest]) -> list[int]:
        """``read`` without the generator; only where ``waits`` is False (shared memory)."""

    def announcer(self, base: int) -> ReaderSlot | None:
        """Where this reader announces its reads to the node (shared memory), or None where it cannot
        (RDMA: the node then keeps freed extents for the whole quarantine bound)."""

    def close(self) -> None: ...
