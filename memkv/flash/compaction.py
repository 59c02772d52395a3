"""Compaction: copy a segment's live records to the head of the log, then delete it.

A sealed segment whose dead fraction (overwritten, deleted, expired records,
torn bytes, tombstones nothing needs) reaches the threshold is scanned; each
record the index still points at is copied (lsn kept; the writer restamps its header) through the normal
log writer; of its tombstones, each key's newest is copied if the index still
keeps it (a versioned delete within its retention) or if it still hides a put:
another segment holds a put of the key older than it (``_hides_put``), or the
index snapshot on disk is older than it (recovery takes the snapshot's entries
and replays only the log after it: the snapshot may name a put the tombstone
deleted, in a segment gone since, which recovery would report lost). Once
every copy (and every record written before the decision, e.g. the tombstones
that made records dead) is durable, the segment is unlinked. Copy I/O is
throttled to ``rate`` bytes/s so that serving traffic keeps the device. The
schedule (the check interval, the throttle) runs on the tier's injected clock.

Why the tombstone rule is sound. Recovery replays every segment and the newest
record (lsn) of a key wins, so a tombstone matters only against a put of its
key with a lower lsn that is still in some file; a put written after it has a
higher lsn, and compaction copies only puts the index still holds (newer than
every tombstone of their key), so the set of puts a tombstone hides only
shrinks. A copy keeps its lsn, so while a crash leaves both the original and
the copy, either one hides the same puts. Older tombstones of the key do not
count: they hide only puts older than this one, which would make it needed.
What a pass would copy is also what ``pick`` counts as live (``_copied_bytes``),
computed from the files themselves, so nothing about it is lost at a restart:
the first ``pick`` after it counts the same bytes, and a segment whose
tombstones are all still needed is not compacted again.
"""

from __future__ import annotations

import logging
import mmap
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
import xxhash

from memkv.errors import MemKVError
from memkv.flash import record as r
from memkv.flash.segment import Segment

if TYPE_CHECKING:
    from memkv.flash.tier import FlashTier

log = logging.getLogger("memkv.flash")
NEVER = 1 << 63


def records(path: str, start: int = 0, end: int | None = None) -> Iterator[r.Record]:
    """The records of a segment file from ``start`` up to ``end`` (None: its end), one at a time
    (the file stays open until they have all been taken)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            stop = len(mm) if end is None else min(end, len(mm))
            items = r.scan(mm, start, stop, verify=False)
            x = None
            try:
                for x in items:
                    if x.__class__ is r.Record:
                        yield x
            finally:
                # the mapping closes only without views of it: the scan's own, and the traceback
                # frames of a Damage's error
                items.close()
                del x


def scan_headers(path: str, start: int = 0, end: int | None = None) -> list[r.Record]:
    """The records of a segment file from ``start`` up to ``end`` (None: its end)."""
    return list(records(path, start, end))


def _ikey(tier: FlashTier, rec: r.Record) -> tuple[str, str, bytes] | None:
    """The index key recovery files ``rec`` under (None: a namespace recovery skips)."""
    scope = tier.scope(rec.namespace, rec.tenant)
    return None if scope is None else (rec.namespace, scope, rec.key)


class Summary:
    """What compaction needs to know of one segment file: the lowest put lsn of each index key (by
    hash: a collision only keeps a tombstone longer) and each key's newest tombstone (a newer delete
    hides every put an older one hides). Built by reading the file, never persisted; extended as the
    active segment grows (bytes below its durable size are never rewritten), read to the end of the
    file once it is sealed (recovery would replay whatever is there); a purge's scrub only zeroes
    puts, which keeps a tombstone longer.

    Every segment's summary is kept (the next passes need them), one put entry per key and
    segment: once a segment's summary is complete its puts are two sorted arrays (16 bytes a key;
    a dict took about 120: bench/compaction_summary.py), looked up by bisection."""

    __slots__ = ("upto", "complete", "puts", "hashes", "lsns", "tombs")

    def __init__(self) -> None:
        self.upto = 0
        self.complete = False
        self.puts: dict[int, int] = {}  # key hash -> lowest put lsn, while the summary grows
        self.hashes = array("q")  # the same once complete: hashes sorted, their lsns alongside
        self.lsns = array("Q")
        self.tombs: dict[tuple[str, str, bytes], r.Record] = {}

    def add(self, puts: dict[int, int], tombs: dict[tuple[str, str, bytes], r.Record]) -> None:
        """Take in what ``read_summary`` found in a stretch of the file (read twice changes nothing)."""
        mine = self.puts
        if not mine:
            self.puts = mine = puts
        else:
            for h, lsn in puts.items():
                if lsn < mine.get(h, NEVER):
                    mine[h] = lsn
        for ik, rec in tombs.items():
            cur = self.tombs.get(ik)
            if cur is None or cur.lsn < rec.lsn:
                self.tombs[ik] = rec

    def finish(self) -> None:
        """The file will not grow: the puts become the compact sorted arrays."""
        self.complete = True
        order = sorted(self.puts)
        self.hashes = array("q", order)
        self.lsns = array("Q", map(self.puts.__getitem__, order))
        self.puts = {}

    def lowest_put(self, h: int) -> int:
        """The lowest lsn of a put of the key with hash ``h`` in the segment (NEVER: none)."""
        if not self.complete:
            return self.puts.get(h, NEVER)
        i = bisect_left(self.hashes, h)
        return self.lsns[i] if i < len(self.hashes) and self.hashes[i] == h else NEVER


def read_summary(tier: FlashTier, path: str, start: int, end: int | None) -> tuple[dict, dict]:
    """Worker thread: the lowest put lsn per index-key hash and the newest tombstone per index key
    of the records in the file from ``start`` to ``end`` (None: its end), one record at a time."""
    puts: dict[int, int] = {}
    tombs: dict[tuple[str, str, bytes], r.Record] = {}
    for rec in records(path, start, end):
        ik = _ikey(tier, rec)
        if ik is None:
            continue
        if rec.kind == r.DELETE:
            cur = tombs.get(ik)
            if cur is None or cur.lsn < rec.lsn:
                tombs[ik] = rec
        else:
            h = hash(ik)
            if rec.lsn < puts.get(h, NEVER):
                puts[h] = rec.lsn
    return puts, tombs


async def _summary(tier: FlashTier, seg: Segment) -> Summary | None:
    """``seg``'s summary, read up to what it holds now; None: the segment is gone. The active
    segment is read up to its durable size, a sealed one to the end of its file, and that is final
    only once every write assigned to it has settled (the last batch may still be in flight when
    the next segment opens; a failed batch may have left records recovery would replay)."""
    got = seg.summary
    if got is None:
        got = seg.summary = Summary()
    if got.complete:
        return got
    sealed = seg.sealed
    settled = sealed and seg.durable >= seg.size
    end = None if sealed else seg.durable
    if end is None or end > got.upto:
        try:
            found = await trio.to_thread.run_sync(read_summary, tier, seg.path, got.upto, end)
        except FileNotFoundError:
            return None
        got.add(*found)
        del found
        if end is not None:
            got.upto = end
        if settled:
            got.finish()
    return got


async def _hides_put(tier: FlashTier, seg: Segment, tombs: list[r.Record]) -> list[r.Record]:
    """The tombstones of ``tombs`` (from ``seg``) that another segment holds an older put for."""
    top = max((t.lsn for t in tombs), default=0)
    older = [s for s in list(tier.log.segments.values()) if s is not seg and s.min_lsn < top]
    summaries = []
    for s in older:
        got = await _summary(tier, s)
        if got is not None:
            summaries.append((s.min_lsn, got))
    out = []
    for t in tombs:
        h = hash(_ikey(tier, t))
        if any(lo < t.lsn and got.lowest_put(h) < t.lsn for lo, got in summaries):
            out.append(t)
    return out


def _kept(tier: FlashTier, rec: r.Record) -> bool:
    """Whether the index still keeps this tombstone (a versioned delete within its retention)."""
    ik = _ikey(tier, rec)
    return bool(rec.version) and ik is not None and tier.store.tombstone_of(ik) == rec.version


async def _copied_tombstones(tier: FlashTier, seg: Segment) -> list[r.Record]:
    """The tombstones a pass over ``seg`` copies now: each key's newest in it, if the index keeps it
    or it hides a put. One kept by neither never is again (see the module's docstring): it leaves
    the segment's cached list, so that later ``pick`` calls look at fewer."""
    got = await _summary(tier, seg)
    if got is None:
        return []
    tombs = list(got.tombs.values())
    kept = [t for t in tombs if _kept(tier, t)]
    unsnapped = [t for t in tombs if not _kept(tier, t) and t.lsn > tier.snapshot_on_disk]
    needed = unsnapped + await _hides_put(
        tier, seg, [t for t in tombs if not _kept(tier, t) and t.lsn <= tier.snapshot_on_disk])
    if got.complete and len(kept) + len(needed) < len(tombs):
        copied = {id(t) for t in kept + needed}
        for t in tombs:
            ik = _ikey(tier, t)
            if id(t) not in copied and got.tombs.get(ik) is t:
                del got.tombs[ik]
    return kept + needed


async def _copied_bytes(tier: FlashTier, seg: Segment) -> int:
    """Bytes of tombstones a pass over ``seg`` would copy (``seg.live`` counts only puts). Cached
    until a segment is removed, a kept tombstone's purge time passes or a snapshot is written: a
    tombstone stops being needed only then (a put of its key older than it is never written again;
    one whose key was written again since is dropped by the next pass after any of these)."""
    stamp = (tier.log.removals, tier.tombstones_expired, tier.snapshot_on_disk)
    if seg.tomb_estimate is None or seg.tomb_estimate[0] != stamp:
        seg.tomb_estimate = (stamp, sum(t.size for t in await _copied_tombstones(tier, seg)))
    return seg.tomb_estimate[1]


async def pick(tier: FlashTier) -> Segment | None:
    """The sealed segment with the largest dead fraction at or over the threshold, if any."""
    flog = tier.log
    best, best_dead = None, -1.0
    for seg in list(flog.segments.values()):
        if seg is flog.active or not seg.sealed or seg.doomed:
            continue
        dead = 1.0 if seg.size == 0 else 1.0 - seg.live / seg.size
        if dead < tier.compaction_threshold or dead <= best_dead:
            continue
        # tombstones still needed are live too (counting them dead made a segment of them a
        # candidate for ever: a node copying the same tombstones in a loop, idle, found by the
        # 60-minute soak); only worth the look when the segment is a candidate without them
        if seg.size:
            dead = 1.0 - min(seg.size, seg.live + await _copied_bytes(tier, seg)) / seg.size
        if dead >= tier.compaction_threshold and dead > best_dead and not seg.doomed:
            best, best_dead = seg, dead
    return best


async def compact_loop(tier: FlashTier) -> None:
    while True:
        await tier.clock.sleep(tier.compaction_interval)
        tier.expire_tombstones()
        try:
            seg = await pick(tier)
            if seg is not None:
                await compact_segment(tier, seg)
        except MemKVError as exc:
            log.warning("flash: compaction stopped: %s", exc)
        except OSError as exc:
            log.warning("flash: compaction failed: %s", exc)


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
        # decided on the files as they are now, after the writes above settled (not on pick's estimate)
        tombs = {t.offset for t in await _copied_tombstones(tier, seg)}
        for rec in recs:
            if rec.kind == r.DELETE:
                if rec.offset not in tombs:
                    continue
                data = await trio.to_thread.run_sync(os.pread, seg.fd, rec.size, rec.offset)
                p = flog.append([data], len(data), rec.lsn)
                p.seg.tombstones += 1
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
                head = rec.value_off - rec.offset
                p = flog.append([data[:head], memoryview(data)[head:]], len(data), rec.lsn)
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


def _revert(tier: FlashTier, e, old: tuple, new: tuple):
    def done(ok: bool) -> None:
        if not ok and e.flash == new:
            e.flash = old
            seg = tier.log.segments.get(old[0])
            if seg is not None:
                seg.live += old[2]

    return done
