"""Compaction must converge, keep what recovery needs, and drop the rest.

A tombstone matters only while a put of its key older than it is still in some segment file: that
put would come back at a restart without it. Three ways of getting this wrong, each found:
- copying tombstones to the head of the log and counting them dead there: their segment was the
  next candidate, the same tombstones were copied for ever (the 60-minute soak found an idle node
  doing it: 557 750 tombstone records for 36 181 keys, a new 64 MiB segment every two minutes);
- keeping a tombstone while *any* other segment was older than it: carried copies keep their lsns,
  so two segments of carried tombstones kept each other (and themselves) for ever, a slow leak;
- remembering what was carried only in memory: every restart repeated a pass.
Real store, real segment files, a seeded workload; the compactor's functions are called directly,
and a pass is also stepped record by record on a manual clock, with a copy of the data directory at
each step standing for a crash there.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import trio

from memkv.config import NamespacePolicy, default_namespaces
from memkv.engine.clock import ManualClock
from memkv.engine.store import Store
from memkv.flash import record as r
from memkv.flash.compaction import compact_segment, pick, scan_headers
from memkv.flash.tier import FlashTier

MiB = 1 << 20
SEGMENT = 8192
NAMESPACES = {**default_namespaces(), "ctx": NamespacePolicy("ctx", pool="session", durability="durable",
                                                             overwrite=True)}
RETENTION = 600.0


def _open(tmp_path: Path, data: Path, clock: ManualClock, rate: int = 0) -> tuple[Store, FlashTier]:
    shm = tmp_path / f"shm-{data.name}"
    shm.mkdir(exist_ok=True)
    store = Store(memory=8 * MiB, namespaces=NAMESPACES, shm_dir=str(shm), clock=clock,
                  tombstone_retention=RETENTION)
    return store, FlashTier(store, str(data), disk=64 * MiB, segment_size=SEGMENT, compaction_threshold=0.5,
                            compaction_rate=rate)


def _tombstones(tier: FlashTier) -> int:
    return sum(1 for seg in tier.log.segments.values()
               for rec in scan_headers(seg.path) if rec.kind == r.DELETE)


def _check(store: Store, model: dict[bytes, bytes | None]) -> None:
    """Every live key is served exactly; no deleted key comes back."""
    for key, want in model.items():
        e = store.get(key, namespace="ctx")
        if want is None:
            assert e is None, f"{key!r} was deleted and came back"
        else:
            assert e is not None, f"{key!r} lost"
            assert bytes(store.view(e)) == want, f"{key!r} has the wrong value"


def _churn(store: Store, rng: random.Random, model: dict[bytes, bytes | None], ops: int) -> None:
    """Puts, rewrites, versioned deletes and frees (a slot handed off: an unversioned tombstone) of 40
    keys, at random."""
    for _ in range(ops):
        key = b"k%d" % rng.randrange(40)
        op = rng.random()
        if op < 0.5:
            value = rng.randbytes(rng.randrange(100, 400))
            store.put(key, value, namespace="ctx")
            model[key] = value
        elif op < 0.75:
            store.delete(key, namespace="ctx")
            model[key] = None
        else:
            e = store.get(key, namespace="ctx")
            if e is not None:
                assert store.drop(e, "free")
            model[key] = None


async def _roll(store: Store, tier: FlashTier) -> None:
    """Seal the active segment (overwritten filler: dead bytes) and let the writes settle."""
    for _ in range(4):
        store.put(b"filler", os.urandom(3000), namespace="ctx")
    await tier.log.wait(tier.log.seq)


async def _quiesce(store: Store, tier: FlashTier, roll: bool = True) -> int:
    """Compact every candidate until none is left; the number of passes. Each pass reclaims what
    ``pick`` promised: at least the threshold's share of its segment (a pass that copies what it
    copied before -- tombstones still needed -- reclaims nothing)."""
    if roll:
        await _roll(store, tier)
    passes = 0
    while (seg := await pick(tier)) is not None:
        size = seg.size
        reclaimed = await compact_segment(tier, seg)
        assert reclaimed >= 0.5 * size, f"pass {passes} over segment {seg.id} reclaimed {reclaimed} of {size}"
        passes += 1
        assert passes < 60, "compaction does not converge"
    return passes


async def test_tombstones_converge_no_leak_and_no_pass_after_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    rng = random.Random(19)
    model: dict[bytes, bytes | None] = {}
    data = tmp_path / "data"
    store, tier = _open(tmp_path, data, clock)
    old = os.urandom(3000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        store.put(b"old", old, namespace="ctx")  # lives long: its segment holds the oldest lsns
        model[b"old"] = old
        for _ in range(12):
            _churn(store, rng, model, 60)
            await _quiesce(store, tier)
            # the tombstones a pass copied are not copied again while they still hide a put
            assert await pick(tier) is None
        nursery.cancel_scope.cancel()
    _check(store, model)
    tier.close()
    store.close()

    # a restart (with its snapshot, then without one: a crash) makes no pass that reclaims nothing: what
    # a pass would copy is worked out from the files, not remembered (the segment that was active is
    # sealed now and its overwritten filler dead, so passes there may be)
    for snapshot in (True, False):
        if not snapshot:
            os.unlink(data / "flash" / "index.snap")
        store, tier = _open(tmp_path, data, clock)
        _check(store, model)
        before = _tombstones(tier)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tier.log.run)
            await _quiesce(store, tier, roll=False)
            nursery.cancel_scope.cancel()
        assert _tombstones(tier) <= before
        tier.close()
        store.close()

    # the long-lived value goes, the versioned deletes' retention ends: every tombstone is unneeded now,
    # and compaction leaves a log of about the live data (before: segments of carried tombstones
    # whose copies kept each other needed stayed for ever)
    store, tier = _open(tmp_path, data, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        e = store.get(b"old", namespace="ctx")
        assert e is not None and store.drop(e, "free")
        model[b"old"] = None
        clock.advance(RETENTION + 1)
        tier.expire_tombstones()
        store.purge_tombstones()
        await tier.snapshot()  # tombstones newer than the snapshot on disk stay until the next one
        for _ in range(3):
            await _quiesce(store, tier)
        live = sum(len(v) + 64 for v in model.values() if v is not None)
        sealed = [s for s in tier.log.segments.values() if s is not tier.log.active]
        assert len(sealed) <= 2 and tier.log.used <= live + 3 * SEGMENT, (
            f"{len(tier.log.segments)} segments, {tier.log.used} bytes for {live} live bytes")
        assert _tombstones(tier) <= 40
        nursery.cancel_scope.cancel()
    _check(store, model)
    tier.close()
    store.close()


async def _stepped_pass(tier: FlashTier, clock: ManualClock, seg, images: Path, n: int, every: int) -> int:
    """Run one pass over ``seg``, copying the data directory at every ``every``-th record, where the
    pass is parked in its throttle with every write so far durable (a crash could stop it there),
    and after it."""

    async def durable_image() -> None:
        nonlocal n
        while tier.log.durable_seq < tier.log.seq:
            await trio.sleep(0.001)
        shutil.copytree(Path(tier.dir).parent, images / f"img{n:04d}", ignore=shutil.ignore_patterns("LOCK"))
        n += 1

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run() -> None:
            await compact_segment(tier, seg)
            done.set()

        nursery.start_soon(run)
        step = 0
        while not done.is_set():
            await trio.sleep(0.001)
            if clock.sleepers and not done.is_set():
                if step % every == 0:
                    await durable_image()
                step += 1
                clock.advance(1.0)
    await durable_image()
    return n


async def test_a_crash_anywhere_in_a_pass_serves_every_live_record_and_resurrects_nothing(
        tmp_path: Path) -> None:
    clock = ManualClock()
    rng = random.Random(7)
    model: dict[bytes, bytes | None] = {}
    data = tmp_path / "data"
    images = tmp_path / "images"
    images.mkdir()
    store, tier = _open(tmp_path, data, clock, rate=1000)  # a throttle sleep (< 1 s) after every record
    n = 0
    snapshots: dict[int, dict[bytes, bytes | None]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        store.put(b"old", b"o" * 3000, namespace="ctx")
        model[b"old"] = b"o" * 3000
        for round_ in range(8):
            _churn(store, rng, model, 40)
            if round_ == 2:
                await tier.snapshot()  # images after this recover from a snapshot + the log's tail
            if round_ == 5:
                e = store.get(b"old", namespace="ctx")
                assert e is not None and store.drop(e, "free")  # the oldest segment can go now
                model[b"old"] = None
            await _roll(store, tier)
            while (seg := await pick(tier)) is not None:
                first = n
                n = await _stepped_pass(tier, clock, seg, images, n, every=2)
                for i in range(first, n):
                    snapshots[i] = dict(model)
                assert n < 1000
        nursery.cancel_scope.cancel()
    tier.close()
    store.close()
    assert n >= 50, "the workload made too few passes to say anything"
    for i in range(n):
        for with_snapshot in (True, False):
            img = images / f"img{i:04d}"
            if not with_snapshot:
                snap = img / "flash" / "index.snap"
                if not snap.exists():
                    continue
                os.unlink(snap)
            store, tier = _open(tmp_path, img, clock)
            try:
                _check(store, snapshots[i])
                assert not tier.recovered.damaged, (i, tier.recovered.damaged)
            finally:
                tier.close()
                store.close()


def test_segment_reader_closes_a_file_that_ends_in_damage(tmp_path: Path) -> None:
    """``scan_headers`` (compaction, purge's scrub) reads a segment through a mapping; a file whose last
    stretch is damage (a scrubbed record: zeros) must still close it (a Damage's error keeps views of
    the mapping in its traceback; the full suite found the purge failing with BufferError)."""
    path = tmp_path / "seg-00000001.log"
    good = [r.encode(r.PUT, "ctx", "", b"k%d" % i, os.urandom(50), lsn=i + 1) for i in range(3)]
    path.write_bytes(b"".join(good) + bytes(500))
    assert [x.key for x in scan_headers(str(path))] == [b"k0", b"k1", b"k2"]
    path.write_bytes(b"".join(good) + good[0][:30])  # a cut record at the end
    assert len(scan_headers(str(path))) == 3
