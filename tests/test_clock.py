"""Time is injected: the flash tier's schedules, its expiry stamps, rate limits and the audit
log's flushes follow a manual clock, so their timing is tested exactly and without sleeping.

Real parts throughout: a real store and region, real segment files and fsyncs (in worker
threads, so the tests wait for *them* with a real-time bound, never for a timer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from memkv.config import NamespacePolicy, default_namespaces
from memkv.engine.clock import ManualClock
from memkv.engine.store import Store
from memkv.flash.compaction import compact_loop
from memkv.flash.tier import SNAPSHOT_CHECK_S, FlashTier
from memkv.server.audit import AuditLog
from memkv.server.tenants import TokenBucket

MiB = 1 << 20


def _store(tmp_path: Path, clock: ManualClock) -> Store:
    namespaces = {**default_namespaces(), "ctx": NamespacePolicy("ctx", pool="session", durability="durable",
                                                                 overwrite=True)}
    return Store(memory=8 * MiB, namespaces=namespaces, shm_dir=str(tmp_path), clock=clock, quarantine_s=0)


def _tier(tmp_path: Path, store: Store, **kw: object) -> FlashTier:
    return FlashTier(store, str(tmp_path / "data"), disk=64 * MiB, **kw)  # type: ignore[arg-type]


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for work done in worker threads (fsyncs, snapshot files), with a real-time bound."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.005)
        return
    pytest.fail(f"timed out waiting for {what}")


async def _parked(clock: ManualClock, n: int) -> None:
    """Until ``n`` tasks sleep on the manual clock (and everything else is blocked)."""
    await _until(lambda: clock.sleepers >= n, f"{n} sleeper(s) on the clock")
    await trio.testing.wait_all_tasks_blocked()


async def test_the_snapshot_schedule_follows_the_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    store = _store(tmp_path, clock)
    tier = _tier(tmp_path, store, snapshot_every=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        nursery.start_soon(tier._snapshot_loop)
        for i in range(3):
            store.put(b"k%d" % i, b"v" * 100, namespace="ctx")
        await tier.log.wait(tier.log.seq)
        await _parked(clock, 1)
        assert tier.snapshots == 0  # three records are due, but the loop looks only when the clock says
        clock.advance(SNAPSHOT_CHECK_S / 2)
        await _parked(clock, 1)
        assert tier.snapshots == 0
        clock.advance(SNAPSHOT_CHECK_S / 2)
        await _until(lambda: tier.snapshots == 1, "the snapshot")
        nursery.cancel_scope.cancel()
    tier.close()
    store.close()


async def test_compaction_waits_for_its_interval_and_its_copy_rate(tmp_path: Path) -> None:
    """The compactor looks at the segments every ``compaction_interval`` and copies live records at
    ``compaction_rate`` bytes/s: both on the tier's clock, so the copy moves exactly as time does."""
    clock = ManualClock()
    store = _store(tmp_path, clock)
    tier = _tier(tmp_path, store, segment_size=8192, compaction_rate=1000, compaction_threshold=0.3,
                 compaction_interval=0.5)
    value = os.urandom(900)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        for i in range(8):  # the first segment fills up and is sealed
            store.put(b"k%d" % i, value, namespace="ctx")
        for i in range(4):  # half of it becomes dead
            store.put(b"k%d" % i, os.urandom(900), namespace="ctx")
        await tier.log.wait(tier.log.seq)
        first = min(tier.log.segments)
        nursery.start_soon(compact_loop, tier)
        await _parked(clock, 1)
        assert tier.compactions == 0 and tier.compaction_copied == 0
        clock.advance(0.5)  # its interval: it picks the sealed segment and copies its first live record
        await _until(lambda: tier.compaction_copied > 0, "the first copy")
        await _parked(clock, 1)
        copied = tier.compaction_copied
        assert tier.compactions == 0 and first in tier.log.segments  # throttled: waits for the clock
        clock.advance(copied / 1000 - 1e-6)
        await _parked(clock, 1)
        assert tier.compaction_copied == copied  # not a microsecond early
        steps = 0
        while tier.compactions == 0:  # the rest of the copy: one record per second of the clock
            clock.advance(1.0)
            steps += 1
            await _parked(clock, 1)
        assert steps >= 3  # the live records left (about 900 bytes each) took a clock second each
        assert first not in tier.log.segments and tier.reclaimed > 0
        nursery.cancel_scope.cancel()
    for i in range(8):
        e = store.get(b"k%d" % i, namespace="ctx")
        assert e is not None and store.verify(e)
    tier.close()
    store.close()


def test_expiry_is_stamped_in_wall_time_and_survives_a_restart(tmp_path: Path) -> None:
    """A durable value's TTL is written as wall time: after a restart it has what is left of it,
    or it is gone -- whatever the monotonic clock of the new process reads."""
    clock = ManualClock(monotonic=1000.0, wall=1_700_000_000.0)
    store = _store(tmp_path, clock)
    tier = _tier(tmp_path, store)
    store.put(b"t", b"expiring", namespace="ctx", ttl=100.0)
    store.put(b"p", b"forever", namespace="ctx")
    tier.close()
    store.close()

    def reopen(monotonic: float, wall: float) -> tuple[Store, FlashTier]:
        clock = ManualClock(monotonic=monotonic, wall=wall)
        store = _store(tmp_path, clock)
        return store, _tier(tmp_path, store)

    store, tier = reopen(5.0, 1_700_000_000.0 + 40.0)  # 40 s later, another process
    assert store.ttl_left(b"t", namespace="ctx") == pytest.approx(60.0)
    assert store.ttl_left(b"p", namespace="ctx") == math.inf
    tier.close()
    store.close()
    store, tier = reopen(7.0, 1_700_000_000.0 + 101.0)
    assert store.ttl_left(b"t", namespace="ctx") is None
    assert store.ttl_left(b"p", namespace="ctx") == math.inf
    tier.close()
    store.close()


def test_the_rate_limit_refills_with_the_clock() -> None:
    clock = ManualClock()
    bucket = TokenBucket(2.0, 2.0, clock)
    assert bucket.take() and bucket.take()
    assert not bucket.take()
    clock.advance(0.499)
    assert not bucket.take()
    clock.advance(0.001)
    assert bucket.take()
    assert not bucket.take()


async def test_the_audit_log_flushes_on_its_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    log = AuditLog(str(tmp_path / "audit"), "n1", flush_interval=0.2, clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        await _parked(clock, 1)
        rec = log.append("put", tenant="alice", k="6b")
        assert rec["t"] == clock.wall()
        await _parked(clock, 1)
        assert log.flushes == 0 and not os.path.exists(log.path)
        clock.advance(0.2)
        await _until(lambda: log.flushes == 1, "the flush")
        nursery.cancel_scope.cancel()
    assert [r["seq"] for r in log.iter_all()] == [1]
