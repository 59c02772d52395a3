"""Rebuild the durable index at startup: snapshot + replay of the log tail.

The newest record (highest lsn) of a key wins; a tombstone hides older puts;
a compaction copy has the same lsn as its original (either location is fine).
A versioned tombstone (a delete with a version: memkv/engine/store.py) whose
purge time has not passed is adopted as a tombstone of the index, so that a
restarted node keeps refusing older writes of the key; an unversioned one
(version 0: a purge, a freed slot, or a delete written before deletes had
versions) only hides older puts.
Records that do not check out are skipped, and each stretch of them is counted
either as a torn write (a crash cut records nobody was told were durable) or as
damage (logged, reported). A stretch may be torn only if it has the shape a crash
leaves -- it reaches the end of its file (a cut write), or ends in zeros (the
unwritten rest of a batch that a later batch in flight was written past: the log
writes two batches in parallel, ``FlashLog.parallel``) -- *and* no record says its
bytes were durable: every record carries the writer's durability stamp
(memkv/flash/record.py, memkv/flash/log.py), so a stretch is damage when a record of
its segment was queued after the segment was durable past the stretch's start, or a
record of the next segment id (stamp >= 2) was queued after the whole segment had
settled. (The part of a segment the index snapshot covers is not replayed at all.)
Records acknowledged before the crash were durable before anything queued after them,
so a hole in them is reported whenever later records, queued after, were written; only
the last batches of the log are judged by their shape alone. Stamp 0 (records older than the stamp) counts as
vouching for the previous segment, which keeps the old rule for old logs: a hole is
torn only at the end of the log.

Speed (1M entries must restart in seconds): the snapshot is loaded as columns
(``snapshot.read_snapshot``) and passed on as such; the log replay decodes each
record with one ``struct`` call and checks both checksums inline, falling back
to the careful ``record.scan`` only where a record does not check out; the
result is a set of parallel lists (``Recovered.cols``) that the store adopts in
bulk (``Store.adopt_columns``).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, NamedTuple

from memkv.engine.clock import SYSTEM
from memkv.flash import record as r
from memkv.flash.manifest import ManifestError, check, read_manifest
from memkv.flash.segment import Segment
from memkv.flash.snapshot import SnapshotError, read_snapshot

log = logging.getLogger("memkv.flash")

# the columns of a recovered index (parallel lists, one item per entry)
COLS = ("keys", "names_idx", "parents", "lengths", "checksums", "generations", "expires", "sids", "voffs",
        "rsizes", "lsns", "versions")
# a replayed put in the table (in COLS order): (key, name index, parent, length, checksum, generation, expires_wall,
#                                seg_id, value_off, rec_size, lsn, version)
LSN = 10


class TombRow(NamedTuple):
    """A tombstone in the replay table (its purge time in wall-clock seconds, 0: not kept)."""

    lsn: int
    version: int
    expires: float
    sid: int = -1  # where its record is (-1: in the snapshot)
    size: int = 0


def _lsn(row: tuple) -> int:
    return row[0] if row.__class__ is TombRow else row[LSN]


@dataclass
class Recovered:
    names: list[tuple[str, str]] = field(default_factory=list)  # (namespace, tenant) of names_idx
    cols: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in COLS})
    # tombstones still kept: (namespace, index-key scope, key, version, purge time in wall seconds, segment
    # of the record (-1: the snapshot's), record size)
    tombs: list[tuple[str, str, bytes, int, float, int, int]] = field(default_factory=list)
    max_lsn: int = 0
    snapshot_lsn: int = 0  # the lsn of the snapshot used (0: none)
    max_gen: int = 0
    snapshot_entries: int = 0
    replayed: int = 0
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (seg, offset, error)
    torn_tail: int = 0
    skipped_namespaces: int = 0
    expired: int = 0
    seconds: float = 0.0

    @property
    def entries(self) -> int:
        return len(self.cols["keys"])


class _Names:
    """(namespace, tenant) -> small index, with its index-key scope (None: not a durable namespace)."""

    def __init__(self, scope: Callable[[str, str], str | None], names: list[tuple[str, str]]) -> None:
        self.scope = scope
        self.names = names
        self.scoped: list[str | None] = [scope(ns, tn) for ns, tn in names]
        self.index = {nt: i for i, nt in enumerate(names)}
        self.raw: dict[bytes, tuple[int, int]] = {}  # namespace+tenant bytes -> (ns_len, name index)

    def of_raw(self, nt: bytes, nl: int) -> int:
        hit = self.raw.get(nt)
        if hit is not None and hit[0] == nl:
            return hit[1]
        i = self.of(nt[:nl].decode("utf-8", "replace"), nt[nl:].decode("utf-8", "replace"))
        self.raw[nt] = (nl, i)
        return i

    def of(self, ns: str, tn: str) -> int:
        i = self.index.get((ns, tn))
        if i is None:
            i = self.index[(ns, tn)] = len(self.names)
            self.names.append((ns, tn))
            self.scoped.append(self.scope(ns, tn))
        return i


def recover(directory: str, segments: dict[int, Segment], scope: Callable[[str, str], str | None],
            now_wall: float | None = None) -> Recovered:
    """``scope(ns, tenant)`` gives the tenant part of the index key, None for an unknown namespace."""
    t0 = time.perf_counter()
    out = Recovered()
    now_wall = SYSTEM.wall() if now_wall is None else now_wall
    try:
        snap = read_snapshot(directory)
    except SnapshotError as exc:
        log.warning("flash: ignoring the index snapshot (%s); replaying the whole log", exc)
        snap = None
    covered: dict[int, list] = {}
    names = _Names(scope, list(snap.names) if snap is not None else [])
    if snap is not None:
        covered = snap.segments
        out.max_lsn = out.snapshot_lsn = snap.lsn
        out.max_gen = snap.gen
    # the log tail (everything when there is no snapshot): ikey -> put row, or TombRow
    table: dict[tuple[str, str, bytes], tuple] = {}
    suspects: list[tuple[int, int, str]] = []  # stretches shaped like a torn write: (seg, offset, error)
    durable: dict[int, int] = {}  # seg -> bytes a stamp of it says were durable
    vouched: set[int] = set()  # segs that a stamp of the next segment id says settled whole
    for sid in sorted(segments):
        seg = segments[sid]
        cov = covered.get(sid)
        start = 0
        seg.min_lsn = 1 << 63
        if cov is not None:
            start = min(cov[0], seg.size)
            seg.min_lsn = cov[1]
        if seg.size <= start:
            continue
        with open(seg.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            own, prev = _replay(mm, seg, start, names, table, out, suspects)
        durable[sid] = own
        if prev:
            vouched.add(sid - 1)
    for sid, offset, error in suspects:
        if sid in vouched or offset < durable.get(sid, 0):
            out.damaged.append((sid, offset, error))
            log.warning("flash: damaged record in segment %d at offset %d (%s); skipped", sid, offset, error)
        else:
            out.torn_tail += 1
    cols = out.cols
    if snap is not None and len(snap):
        _take_snapshot(snap, segments, covered, names, table, now_wall, out)
    _check_manifest(directory, segments, out)
    if snap is not None and snap.tombs:
        _take_snapshot_tombs(snap, names, table, now_wall)
    rows = []
    tombs = out.tombs
    for ikey, row in table.items():
        if row.__class__ is TombRow:
            if row.version and row.expires > now_wall:
                tombs.append((ikey[0], ikey[1], ikey[2], row.version, row.expires, row.sid, row.size))
            continue
        exp = row[6]
        if exp and exp <= now_wall:
            out.expired += 1
            continue
        rows.append(row)
    if rows:
        for name, col in zip(COLS, zip(*rows, strict=True), strict=True):
            if cols[name]:
                cols[name].extend(col)
            else:
                cols[name] = list(col)
    out.names = names.names
    live: dict[int, int] = {}
    for sid, rsize in zip(cols["sids"], cols["rsizes"], strict=True):
        live[sid] = live.get(sid, 0) + rsize
    for sid, nbytes in live.items():
        segments[sid].live += nbytes
    out.seconds = time.perf_counter() - t0
    return out


def _take_snapshot(snap: Any, segments: dict[int, Segment], covered: dict[int, list], names: _Names,
                   table: dict, now_wall: float, out: Recovered) -> None:
    """Move the snapshot's columns into ``out.cols``, minus what the tail replaced or deleted."""
    sc = snap.cols
    keep: list[bool] | None = None
    n = len(snap)
    scoped = names.scoped
    gone = {sid for sid in set(sc["sids"]) if sid not in segments}  # rows into a segment file that is not there
    superseded: set[int] = set()
    if any(s is None for s in scoped) or gone or any(sid not in covered for sid in set(sc["sids"])):
        keep = [scoped[ni] is not None and sid in segments and sid in covered
                for ni, sid in zip(sc["names_idx"], sc["sids"], strict=True)]
        out.skipped_namespaces += sum(1 for ni in sc["names_idx"] if scoped[ni] is None)
    if any(sc["expires"]):
        exp_keep = [not (x and x <= now_wall) for x in sc["expires"]]
        out.expired += exp_keep.count(False)
        keep = exp_keep if keep is None else [a and b for a, b in zip(keep, exp_keep, strict=True)]
    if table:
        tail_keys = {ik[2] for ik in table}
        hit = [i for i, k in enumerate(snap.keys) if k in tail_keys]
        if hit:
            keep = [True] * n if keep is None else keep
            nidx = sc["names_idx"]
            lsns = sc["lsns"]
            for i in hit:
                ni = nidx[i]
                ikey = (names.names[ni][0], scoped[ni], snap.keys[i])
                cur = table.get(ikey)
                if cur is None:
                    continue
                if _lsn(cur) >= lsns[i]:
                    keep[i] = False  # the tail has a newer (or the same, moved) record
                    superseded.add(i)
                else:
                    del table[ikey]  # the snapshot's record is newer (a compaction copy of an older one)
    if gone:
        # A segment the snapshot indexes is missing (removed, or lost with its directory entry): its
        # rows that no newer tail record replaced (a compaction copy is one) are lost values --
        # reported as damaged, never dropped in silence (found by tests/test_fuzz_recovery.py).
        lost = [i for i, (ni, sid) in enumerate(zip(sc["names_idx"], sc["sids"], strict=True))
                if sid in gone and i not in superseded and scoped[ni] is not None
                and not (sc["expires"][i] and sc["expires"][i] <= now_wall)]
        out.damaged.extend((sc["sids"][i], sc["voffs"][i], "segment file missing") for i in lost)
        if lost:
            log.warning("flash: segment(s) %s of the index snapshot are missing; %d values lost",
                        sorted(gone), len(lost))
    cols = out.cols
    src = {"keys": snap.keys, "parents": snap.parents, **sc}
    for name in COLS:
        col = src[name]
        cols[name] = col if keep is None else list(compress(col, keep))
    out.snapshot_entries = len(cols["keys"])


def _check_manifest(directory: str, segments: dict[int, Segment], out: Recovered) -> None:
    """Report the segments the manifest lists that are missing or shorter than their durable bytes
    (a segment the snapshot's rows already reported missing is not reported twice)."""
    try:
        listed = read_manifest(directory)
    except ManifestError as exc:
        log.warning("flash: ignoring the segment manifest (%s)", exc)
        return
    if not listed:
        return
    seen = {sid for sid, _, why in out.damaged if why == "segment file missing"}
    for sid, offset, why in check(listed, {sid: seg.size for sid, seg in segments.items()}):
        if sid not in seen:
            out.damaged.append((sid, offset, why))
            log.warning("flash: segment %d: %s; its records there are lost", sid, why)


def _take_snapshot_tombs(snap: Any, names: _Names, table: dict, now_wall: float) -> None:
    """The snapshot's tombstones still kept go into ``table`` unless the tail has a newer record of
    the key (a tail record older than the tombstone -- a compaction copy -- is hidden by it)."""
    scoped = names.scoped
    for ni, key, version, exp, lsn in snap.tombs:
        sc = scoped[ni]
        if sc is None or exp <= now_wall:
            continue
        ikey = (names.names[ni][0], sc, key)
        cur = table.get(ikey)
        if cur is None or _lsn(cur) < lsn:
            table[ikey] = TombRow(lsn, version, exp)


def _replay(mm: mmap.mmap, seg: Segment, start: int, names: _Names, table: dict, out: Recovered,
            suspects: list[tuple[int, int, str]]) -> tuple[int, bool]:
    """Scan one segment from ``start`` into ``table`` (the newest record of a key wins); damage
    goes to ``out.damaged``, stretches shaped like a torn write to ``suspects``. Returns what the
    stamps say: the bytes of this segment that were durable, and whether the previous one settled."""
    end = len(mm)
    mv = memoryview(mm)
    unpack = r.HEADER.unpack_from
    xxh32 = r._xxh32
    xxh3 = r._xxh3
    magic_ok = r.MAGIC
    hsize = r.HEADER_SIZE
    put, delete = r.PUT, r.DELETE
    sid = seg.id
    scoped = names.scoped
    nsnames = names.names
    raw_names = names.raw
    get = table.get
    max_lsn, max_gen, min_lsn = out.max_lsn, out.max_gen, seg.min_lsn
    replayed = tombstones = skipped = 0
    own = 0  # the highest durable extent a stamp of this segment claims
    prev = False  # a stamp other than 1: the previous segment id had settled (0: an old record, assumed)
    pos = start
    try:
        while pos < end:
            ok = False
            if pos + hsize <= end:
                magic, hcs, kind, flags, nl, tl, pl, kl, vl, vcs, lsn, gen, ver, exp, dur = unpack(mm, pos)
                p = pos + hsize
                ne = p + nl + tl + kl + pl
                ve = ne + vl
                ok = (magic == magic_ok and ve <= end and kl and xxh32(mv[pos + 8:ne]) == hcs
                      and ((kind == put and xxh3(mv[ne:ve]) == vcs) or (kind == delete and not vl)))
            if not ok:
                item = next(r.scan(mv, pos, end))
                if isinstance(item, r.Damage):
                    item.error.__traceback__ = None  # its frames hold views of the mapping
                    if isinstance(item.error, r.Truncated) or item.end >= end or unwritten_hole(
                            mv, item.offset, item.end):
                        suspects.append((sid, item.offset, str(item.error)))
                    else:
                        out.damaged.append((sid, item.offset, str(item.error)))
                        log.warning("flash: damaged record in segment %d at offset %d (%s); skipped",
                                    sid, item.offset, item.error)
                    pos = item.end
                    del item
                    continue
                # the careful decoder accepted what the fast path did not (should not happen): use it
                kind, flags, lsn, gen, exp, vl, vcs, ver, dur = (
                    item.kind, 1 if item.parent is not None else 0, item.lsn, item.generation, item.expires,
                    item.value_len, item.value_cs, item.version, item.durable)
                ni = names.of(item.namespace, item.tenant)
                key, parent, ne, ve = item.key, item.parent, item.value_off, item.end
            else:
                nt_end = p + nl + tl
                nt = mm[p:nt_end]
                hit = raw_names.get(nt)
                ni = hit[1] if hit is not None and hit[0] == nl else names.of_raw(nt, nl)
                key = mm[nt_end:nt_end + kl]
                parent = mm[nt_end + kl:ne] if flags & 1 else None
            replayed += 1
            if dur != 1:
                if dur > own + 1:
                    own = dur - 1
                prev = True
            if lsn > max_lsn:
                max_lsn = lsn
            if gen > max_gen:
                max_gen = gen
            if lsn < min_lsn:
                min_lsn = lsn
            sc = scoped[ni]
            if kind == delete:
                tombstones += 1
            if sc is None:
                skipped += 1
                pos = ve
                continue
            ikey = (nsnames[ni][0], sc, key)
            cur = get(ikey)
            if cur is None or lsn >= (cur[0] if cur.__class__ is TombRow else cur[LSN]):
                table[ikey] = TombRow(lsn, ver, exp, sid, ve - pos) if kind == delete else (
                    key, ni, parent, vl, vcs, gen, exp, sid, ne, ve - pos, lsn, ver)
            pos = ve
    finally:
        mv.release()
        out.max_lsn, out.max_gen, seg.min_lsn = max_lsn, max_gen, min_lsn
        out.replayed += replayed
        out.skipped_namespaces += skipped
        seg.tombstones += tombstones
    return own, prev


def unwritten_hole(mv: memoryview, start: int, end: int) -> bool:
    """Whether a damaged stretch ends in bytes never written (zeros): a batch cut by a crash
    while a later batch was written past it (flipped bytes do not end in a zero run)."""
    return end - start >= 8 and not any(mv[end - 8:end])


def file_size(path: str) -> int:
    return os.stat(path).st_size
