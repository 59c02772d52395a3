"""The interface between the client core and a one-sided transport."""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

# (offset in the node's region, length, where the bytes go)
ReadRequest = tuple[int, int, memoryview]


class OneSidedTransport(Protocol):
    """Reads of one node's region, set up once per (client, node).

    ``read`` is a generator so that one code serves the trio and the blocking
    executors: it yields (``None``) whenever it must wait for the hardware —
    an RDMA completion — and returns the xxh3 checksum of each value it
    copied, which the core compares with the node's descriptor. It raises
    on any failure, after which the core stops using the transport for that
    node (and reads over TCP, in the same call).
    """

    kind: str  # "shm" | "rdma"
    region_id: str  # the node region it reads (a restarted node has a new one)
    broken: bool

    def read(self, reqs: list[ReadRequest]) -> Generator[None, None, list[int]]: ...

    def close(self) -> None: ...
