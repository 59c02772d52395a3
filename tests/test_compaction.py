"""Compaction must converge: tombstones it has to keep are copied once, not over and over.

An unversioned tombstone (the record of a value freed for good) is kept while some other segment
is older than it, since that segment may hold a put it hides. A long-lived value keeps such an
old segment around, so compaction copied these tombstones to the head of the log, where they
counted as dead bytes: once that segment was sealed it was the best candidate, and its tombstones
were copied again -- for ever. The 60-minute soak found a node doing exactly that while idle
(88 % of a core, a new 64 MiB segment every two minutes, 557 750 tombstone records for 36 181
keys). Real store, real segment files; the compactor's functions are called directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from memkv.config import NamespacePolicy, default_namespaces
from memkv.engine.clock import ManualClock
from memkv.engine.store import Store
from memkv.flash import record as r
from memkv.flash.compaction import compact_segment, pick, scan_headers
from memkv.flash.tier import FlashTier

MiB = 1 << 20


def _tombstones(tier: FlashTier) -> int:
    return sum(1 for seg in tier.log.segments.values()
               for rec in scan_headers(seg.path) if rec.kind == r.DELETE)


async def test_kept_tombstones_are_copied_once_and_deduplicated(tmp_path: Path) -> None:
    clock = ManualClock()
    namespaces = {**default_namespaces(), "ctx": NamespacePolicy("ctx", pool="session", durability="durable",
                                                                 overwrite=True)}
    store = Store(memory=8 * MiB, namespaces=namespaces, shm_dir=str(tmp_path), clock=clock, quarantine_s=0)
    tier = FlashTier(store, str(tmp_path / "data"), disk=64 * MiB, segment_size=8192,
                     compaction_threshold=0.5, compaction_rate=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.log.run)
        store.put(b"old", os.urandom(3000), namespace="ctx")  # lives for ever: its segment stays oldest
        for _ in range(4):  # each key freed four times (a slot handed off: "free"), four tombstones of it
            for i in range(20):
                store.put(b"k%d" % i, b"v", namespace="ctx")
                e = store.get(b"k%d" % i, namespace="ctx")
                assert e is not None and store.drop(e, "free")

        async def seal_and_compact() -> int:
            """Roll the active segment (overwritten filler: dead bytes), then compact every
            candidate; returns the number of compactions."""
            for _ in range(4):
                store.put(b"filler", os.urandom(3000), namespace="ctx")
            await tier.log.wait(tier.log.seq)
            done = 0
            while (seg := pick(tier)) is not None:
                await compact_segment(tier, seg)
                done += 1
                assert done < 50, "compaction does not converge"
            return done

        await seal_and_compact()
        after_first = _tombstones(tier)
        assert after_first <= 20 + 20  # duplicates of a key within a segment went: at most one per key and segment
        for _ in range(4):
            await seal_and_compact()
            # the carried tombstones are not copied again while the old segment keeps them needed
            assert _tombstones(tier) == after_first
        nursery.cancel_scope.cancel()
    for i in range(20):
        assert store.get(b"k%d" % i, namespace="ctx") is None
    e = store.get(b"old", namespace="ctx")
    assert e is not None and store.verify(e)
    tier.close()
    store.close()

    # the tombstones still hide their puts after a restart
    store = Store(memory=8 * MiB, namespaces=namespaces, shm_dir=str(tmp_path), clock=clock, quarantine_s=0)
    tier = FlashTier(store, str(tmp_path / "data"), disk=64 * MiB, segment_size=8192)
    for i in range(20):
        assert store.get(b"k%d" % i, namespace="ctx") is None
    assert store.get(b"old", namespace="ctx") is not None
    tier.close()
    store.close()
