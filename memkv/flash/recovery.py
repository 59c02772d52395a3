"""Rebuild the durable index at startup: snapshot + replay of the log tail.

The newest record (highest lsn) of a key wins; a tombstone hides older puts;
a compaction copy has the same lsn as its original (either location is fine).
Records whose value fails its checksum are torn writes (the tail) or damaged
bytes (elsewhere): they are skipped and counted, every other record is used.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memkv.flash import record as r
from memkv.flash.segment import Segment
from memkv.flash.snapshot import SnapshotError, read_snapshot

log = logging.getLogger("memkv.flash")

# a recovered entry: (ns, tenant, key, parent, length, checksum, generation, expires_wall,
#                     seg_id, value_off, rec_size, lsn)
Row = tuple
SEG, VOFF, RSIZE, LSN = 8, 9, 10, 11


@dataclass
class Recovered:
    rows: list[Row] = field(default_factory=list)
    max_lsn: int = 0
    max_gen: int = 0
    snapshot_entries: int = 0
    replayed: int = 0
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (seg, offset, error)
    torn_tail: int = 0
    skipped_namespaces: int = 0
    seconds: float = 0.0


def recover(directory: str, segments: dict[int, Segment], scope: Callable[[str, str], str | None],
            now_wall: float | None = None) -> Recovered:
    """``scope(ns, tenant)`` gives the tenant part of the index key, None for an unknown namespace."""
    t0 = time.perf_counter()
    out = Recovered()
    now_wall = time.time() if now_wall is None else now_wall
    table: dict[tuple[str, str, bytes], Row | int] = {}  # ikey -> row, or tombstone lsn
    covered: dict[int, list] = {}
    try:
        snap = read_snapshot(directory)
    except SnapshotError as exc:
        log.warning("flash: ignoring the index snapshot (%s); replaying the whole log", exc)
        snap = None
    if snap is not None:
        covered = {int(k): v for k, v in snap["segments"].items()}
        out.max_lsn = snap["lsn"]
        out.max_gen = snap["gen"]
        scopes: dict[str, bool | None] = {}
        unknown = object()
        for row in snap["entries"]:
            sid = row[SEG]
            if sid not in segments or sid not in covered:
                continue
            ns = row[0]
            sc = scopes.get(ns, unknown)
            if sc is unknown:
                t = scope(ns, "t")
                sc = scopes[ns] = None if t is None else bool(t)
            if sc is None:
                out.skipped_namespaces += 1
                continue
            table[(ns, row[1] if sc else "", row[2])] = row
        out.snapshot_entries = len(table)
    last_id = max(segments, default=0)
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
            end = len(mm)
            for item in r.scan(mm, start, end):
                if isinstance(item, r.Damage):
                    tail = item.end >= end and sid == last_id
                    if isinstance(item.error, r.Truncated) or tail:
                        out.torn_tail += 1
                    else:
                        out.damaged.append((sid, item.offset, str(item.error)))
                        log.warning("flash: damaged record in segment %d at offset %d (%s); skipped",
                                    sid, item.offset, item.error)
                    continue
                out.replayed += 1
                lsn = item.lsn
                if lsn > out.max_lsn:
                    out.max_lsn = lsn
                if item.generation > out.max_gen:
                    out.max_gen = item.generation
                if lsn < seg.min_lsn:
                    seg.min_lsn = lsn
                if item.kind == r.DELETE:
                    seg.tombstones += 1
                ts = scope(item.namespace, item.tenant)
                if ts is None:
                    out.skipped_namespaces += 1
                    continue
                ikey = (item.namespace, ts, item.key)
                cur = table.get(ikey)
                if cur is not None:
                    cur_lsn = cur if isinstance(cur, int) else cur[LSN]
                    if lsn < cur_lsn:
                        continue
                if item.kind == r.DELETE:
                    table[ikey] = lsn
                else:
                    table[ikey] = (item.namespace, item.tenant, item.key, item.parent, item.value_len,
                                   item.value_cs, item.generation, item.expires, sid, item.value_off,
                                   item.size, lsn)
    rows = out.rows
    for row in table.values():
        if isinstance(row, int):
            continue
        if row[7] and row[7] <= now_wall:
            continue
        seg = segments.get(row[SEG])
        if seg is None:
            continue
        seg.live += row[RSIZE]
        rows.append(row)
    out.seconds = time.perf_counter() - t0
    return out


def file_size(path: str) -> int:
    return os.stat(path).st_size
