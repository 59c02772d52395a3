"""Compaction: copy a segment's live records to the head of the log, then delete it.

A sealed segment whose dead fraction (overwritten, deleted, expired records,
torn bytes) reaches the threshold is scanned; each record the index still
points at is copied (raw, lsn kept) through the normal log writer; tombstones
are kept while an older segment could still hold a put they hide, and while the
index still keeps them (a versioned delete within its retention). Once every
copy (and every record written before the decision, e.g. the tombstones that
made records dead) is durable, the segment is unlinked. Copy I/O is throttled
to ``rate`` bytes/s so that serving traffic keeps the device. The schedule (the
check interval, the throttle) runs on the tier's injected clock.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import os
from typing import TYPE_CHECKING

import trio
import xxhash

from memkv.errors import MemKVError
from memkv.flash import record as r
from memkv.flash.segment import Segment

if TYPE_CHECKING:
    from memkv.flash.tier import FlashTier

log = logging.getLogger("memkv.flash")


def scan_headers(path: str) -> list[r.Record]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return [x for x in r.scan(mm, 0, len(mm), verify=False) if isinstance(x, r.Record)]


def pick(tier: FlashTier) -> Segment | None:
    flog = tier.log
    best, best_dead = None, -1.0
    # the two oldest segments answer "oldest but this one" for every segment in one pass (this
    # runs every interval over all segments; a scan per segment would be quadratic)
    oldest = heapq.nsmallest(2, flog.segments.values(), key=lambda s: s.min_lsn)
    for seg in flog.segments.values():
        if seg is flog.active or not seg.sealed or seg.doomed:
            continue
        live = seg.live
        if seg.carried and next((s.min_lsn for s in oldest if s is not seg), 1 << 63) <= seg.carried_lsn:
            # the tombstones a compaction carried here would only be carried again: counting
            # them dead made a segment of them a candidate for ever (a node copying the same
            # tombstones in a loop, idle, found by the 60-minute soak)
            live += seg.carried
        dead = 1.0 if seg.size == 0 else 1.0 - live / seg.size
        if dead >= tier.compaction_threshold and dead > best_dead:
            best, best_dead = seg, dead
    return best


async def compact_loop(tier: FlashTier) -> None:
    while True:
        await tier.clock.sleep(tier.compaction_interval)
        tier.expire_tombstones()
        seg = pick(tier)
        if seg is not None:
            try:
                await compact_segment(tier, seg)
            except MemKVError as exc:
                log.warning("flash: compaction of segment %d stopped: %s", seg.id, exc)
            except OSError as exc:
                log.warning("flash: compaction of segment %d failed: %s", seg.id, exc)


async def compact_segment(tier: FlashTier, seg: Segment) -> int:
    """Compact one segment; returns the bytes reclaimed."""
    flog = tier.log
    store = tier.store
    rate = tier.compaction_rate
    try:
        await flog.wait(flog.seq)  # settle the writes already queued (seg's own included)
    except MemKVError:
        pass
    seg.readers += 1
    copied = 0
    try:
        recs = await trio.to_thread.run_sync(scan_headers, seg.path)
        newest_delete: dict[tuple[str, str, bytes], int] = {}
        for rec in recs:
            if rec.kind == r.DELETE:
                k = (rec.namespace, rec.tenant, rec.key)
                newest_delete[k] = max(newest_delete.get(k, 0), rec.lsn)
        for rec in recs:
            if rec.kind == r.DELETE:
                others = _oldest_other(flog, seg)
                ts = tier.scope(rec.namespace, rec.tenant)
                kept = rec.version and ts is not None and \
                    store.tombstone_of((rec.namespace, ts, rec.key)) == rec.version
                if others > rec.lsn and not kept:
                    continue  # no older put of this key can be left anywhere, and the index forgot it
                if not kept and newest_delete[(rec.namespace, rec.tenant, rec.key)] > rec.lsn:
                    continue  # a newer delete of the key in this segment hides every put this one hides
                data = await trio.to_thread.run_sync(os.pread, seg.fd, rec.size, rec.offset)
                p = flog.append([data], len(data), rec.lsn)
                p.seg.tombstones += 1
                if kept:
                    tier.tombstone_live(p.seg.id, len(data), rec.expires)
                else:
                    p.seg.carried += len(data)
                    p.seg.carried_lsn = max(p.seg.carried_lsn, rec.lsn)
                copied += len(data)
            else:
                ts = tier.scope(rec.namespace, rec.tenant)
                if ts is None:
                    continue
                ikey = (rec.namespace, ts, rec.key)
                e = store.lookup(ikey)
                if e is None or e.flash is None or e.flash[0] != seg.id or e.flash[1] != rec.value_off:
                    continue
                data = await trio.to_thread.run_sync(os.pread, seg.fd, rec.size, rec.offset)
                if len(data) != rec.size or xxhash.xxh3_64_intdigest(
                        memoryview(data)[rec.value_off - rec.offset:]) != rec.value_cs:
                    if store.current(e) and e.flash is not None and e.flash[0] == seg.id:
                        tier.report_flash_corrupt(e, "compaction found a damaged value")
                    continue
                if not store.current(e) or e.flash is None or e.flash[0] != seg.id \
                        or e.flash[1] != rec.value_off:
                    continue  # changed while we read
                old = e.flash
                p = flog.append([data], len(data), rec.lsn)
                new = (p.seg.id, p.offset + (rec.value_off - rec.offset), rec.size, rec.lsn, p.seq)
                e.flash = new
                p.seg.live += rec.size
                seg.live -= rec.size
                p.done = _revert(tier, e, old, new)
                copied += len(data)
            tier.compaction_copied += rec.size
            if rate > 0:
                await tier.clock.sleep(rec.size / rate)
        await flog.wait(flog.seq)
    finally:
        seg.readers -= 1
    seg.doomed = True
    while seg.readers:
        await tier.clock.sleep(0.01)
    size = seg.size
    await trio.to_thread.run_sync(flog.remove, seg)
    tier.compactions += 1
    tier.reclaimed += size - copied
    log.info("flash: compacted segment %d: %d bytes, %d copied", seg.id, size, copied)
    return size - copied


def _oldest_other(flog, seg: Segment) -> int:
    """The lowest lsn in any segment but ``seg``: a tombstone of ``seg`` older than it hides no put."""
    return min((s.min_lsn for s in flog.segments.values() if s is not seg), default=1 << 63)


def _revert(tier: FlashTier, e, old: tuple, new: tuple):
    def done(ok: bool) -> None:
        if not ok and e.flash == new:
            e.flash = old
            seg = tier.log.segments.get(old[0])
            if seg is not None:
                seg.live += old[2]

    return done
