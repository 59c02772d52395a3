"""Time, injected: the one place the engine, the flash tier and the node read the clock.

Everything that expires, leases, quarantines, schedules or stamps a time asks a
:class:`Clock` it was given, never ``time`` directly. ``SYSTEM`` is the real one;
:class:`ManualClock` stands still until a test moves it, so TTLs, leases, the
allocator's quarantine, the flash tier's snapshot and compaction schedule and
the retry after a full disk can be tested to the microsecond without sleeping.

``monotonic`` orders events inside one process (expiry, leases); ``wall`` is the
time of day, used only where a time leaves the process (flash records store
expiry as wall time, so that it survives a restart). ``sleep`` is how a
background loop waits: a manual clock's sleepers wake when ``advance`` passes
their deadline.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The process's clocks and trio's sleep."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


SYSTEM = SystemClock()


class ManualClock:
    """A clock that moves only when told to (``advance``): deterministic tests of timing."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._t = float(monotonic)
        self._wall_offset = float(wall) - float(monotonic)
        self._sleepers: list[tuple[float, trio.Event]] = []

    def monotonic(self) -> float:
        return self._t

    def wall(self) -> float:
        return self._t + self._wall_offset

    def __call__(self) -> float:  # as a plain ``() -> float`` clock (the allocator takes one)
        return self._t

    def advance(self, seconds: float) -> None:
        """Move time forward; wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._t += seconds
        due = [ev for at, ev in self._sleepers if at <= self._t]
        self._sleepers = [(at, ev) for at, ev in self._sleepers if at > self._t]
        for ev in due:
            ev.set()

    @property
    def sleepers(self) -> int:
        """Tasks parked in ``sleep`` (a test waits for its loops to park before advancing)."""
        return len(self._sleepers)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await trio.lowlevel.checkpoint()
            return
        ev = trio.Event()
        self._sleepers.append((self._t + seconds, ev))
        await ev.wait()
