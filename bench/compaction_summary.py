"""Memory of compaction's per-segment summaries (``Summary`` in memkv/flash/compaction.py).

    python -m bench.compaction_summary [--keys N] [--json FILE]

A real store and flash tier on a manual clock: N durable puts of distinct keys (64-byte
values), then 2 % of them freed (a slot handed off: unversioned tombstones, which only matter
while an older put of their key is in some segment) into a segment of their own, sealed by
dead filler, then an index snapshot. ``pick`` looks at that segment: its tombstones are older
than the snapshot, so it reads every older segment's summary to see whether a put they hide is
still there -- one entry per key and segment, kept on the segment for the next passes.
Reported: the bytes tracemalloc sees retained after ``pick`` (the summaries) and its peak,
per key.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import tracemalloc

import trio

from memkv.config import NamespacePolicy, default_namespaces
from memkv.engine.clock import ManualClock
from memkv.engine.store import Store
from memkv.flash.compaction import pick
from memkv.flash.tier import FlashTier

MiB = 1 << 20
NAMESPACES = {**default_namespaces(), "ctx": NamespacePolicy("ctx", pool="session", durability="durable",
                                                             overwrite=True)}


def filler(store: Store, tier: FlashTier) -> None:
    """Overwrites of one key, more than a segment's worth: dead bytes that seal the active segment."""
    for _ in range(40):
        store.put(b"filler", os.urandom(MiB), namespace="ctx")
        tier.log.flush_sync()


def measure(keys: int, work: str) -> dict[str, float]:
    store = Store(memory=max(64 * MiB, keys * 256), namespaces=NAMESPACES, shm_dir=work, clock=ManualClock(),
                  tombstone_retention=600.0)
    tier = FlashTier(store, os.path.join(work, "data"), disk=1 << 40, segment_size=32 * MiB,
                     compaction_threshold=0.3)
    value = os.urandom(64)
    t0 = time.perf_counter()
    for i in range(keys):
        store.put(b"key/%09d" % i, value, namespace="ctx")
        if i % 20_000 == 0:
            tier.log.flush_sync()
    filler(store, tier)  # the tombstones go to a segment of their own
    for i in range(0, keys, 50):
        assert store.drop(store.get(b"key/%09d" % i, namespace="ctx"), "free")
    tier.log.flush_sync()
    filler(store, tier)  # sealed

    async def look() -> object:
        await tier.snapshot()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        seg = await pick(tier)
        for _ in range(4):  # trio keeps a worker thread's last result until its next job: not the summaries'
            await trio.to_thread.run_sync(int)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return seg, after - before, peak - before

    written = time.perf_counter() - t0
    t1 = time.perf_counter()
    seg, retained, peak = trio.run(look)
    looked = time.perf_counter() - t1
    summaries = [s.summary for s in tier.log.segments.values() if s.summary is not None]
    entries = sum(len(s.puts) + len(getattr(s, "hashes", ())) for s in summaries)
    out = {"keys": keys, "segments": len(tier.log.segments), "summaries": len(summaries),
           "summary_entries": entries, "picked": seg is not None,
           "retained_bytes": retained, "peak_bytes": peak, "retained_bytes_per_key": round(retained / keys, 1),
           "write_s": round(written, 1), "pick_s": round(looked, 1)}
    tier.close()
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memkv-summary-") as work:
        out = measure(args.keys, work)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
