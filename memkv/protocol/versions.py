"""Write versions: one hybrid logical clock per process, shared by clients and nodes.

Every stored value carries the version of the write that made it (an int, microseconds
since the epoch, made unique and increasing by the clock below). Replicas of a key are
written independently by the client; one that was down, fenced or unreachable during an
overwrite keeps the older value. Versions make that visible and decidable: a node keeps
the newer of two writes whatever order they arrive in (``Store.commit``), a cluster read
of an overwritable namespace compares the replicas' versions and returns (and repairs
onto the others) the newest (``client/core/repair.py``), and a slot copy never replaces a newer
value (``cluster/migration.py``). Versions are persisted with each flash record, so a
node that restarts from disk still knows how old its values are.

The clock is a hybrid: ``max(wall clock, last + 1, newest version seen + 1)``. Two writes
of one process are always ordered; a write made after reading a value is newer than that
value even when the reader's wall clock lags the writer's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# A version further ahead of this node's wall clock than this is refused (a client with a
# broken clock, or a forged value, must not make keys un-overwritable for everyone else).
MAX_AHEAD_US = 300 * 1_000_000


class VersionClock:
    """Strictly increasing versions (thread-safe: clients write from many threads)."""

    __slots__ = ("_last", "_lock", "_now_us")

    def __init__(self, now_us: Callable[[], int] | None = None) -> None:
        self._last = 0
        self._lock = threading.Lock()
        # the wall clock in microseconds; injected by tests that drive time by hand
        self._now_us = now_us or _wall_us

    def next(self) -> int:
        now = self._now_us()
        with self._lock:
            v = now if now > self._last else self._last + 1
            self._last = v
            return v

    def observe(self, version: int) -> None:
        """Move past a version seen elsewhere (no lock: a lost race only costs a smaller bump)."""
        if version > self._last:
            self._last = version

    def plausible(self, version: int) -> bool:
        return 0 < version <= self._now_us() + MAX_AHEAD_US


def _wall_us() -> int:
    return time.time_ns() // 1000


CLOCK = VersionClock()


def newer(a_version: int, a_checksum: int, b_version: int, b_checksum: int) -> bool:
    """Whether write a wins over write b: the higher version, ties broken by checksum so
    that every replica picks the same winner."""
    return (a_version, a_checksum) > (b_version, b_checksum)
