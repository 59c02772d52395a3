"""Recovery of the durable index: columnar snapshot + fast log replay, without a node process."""

from __future__ import annotations

import os

import pytest

from memkv.flash import record as r
from memkv.flash.recovery import recover
from memkv.flash.segment import Segment, segment_name
from memkv.flash.snapshot import SnapshotError, read_snapshot, write_snapshot


def _scope(ns: str, tenant: str) -> str | None:
    return {"ctx": "", "sess": tenant}.get(ns)


class Log:
    """Writes records into segment files the way the node does (returns their locations)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.lsn = 0

    def put(self, sid: int, ns: str, key: bytes, value: bytes, *, tenant: str = "", parent: bytes | None = None,
            expires: float = 0.0, lsn: int | None = None) -> tuple:
        if lsn is None:
            self.lsn += 1
            lsn = self.lsn
        rec = r.encode(r.PUT, ns, tenant, key, value, parent=parent, lsn=lsn, generation=lsn, expires=expires,
                       version=1_000_000 + lsn)
        return self._append(sid, rec, ns, tenant, key, parent, value, lsn, expires)

    def delete(self, sid: int, ns: str, key: bytes, *, tenant: str = "") -> None:
        self.lsn += 1
        self._append(sid, r.encode(r.DELETE, ns, tenant, key, lsn=self.lsn), ns, tenant, key, None, b"", self.lsn, 0)

    def _append(self, sid, rec, ns, tenant, key, parent, value, lsn, expires) -> tuple:
        path = os.path.join(self.dir, segment_name(sid))
        off = os.path.getsize(path) if os.path.exists(path) else 0
        with open(path, "ab") as f:
            f.write(rec)
        voff = off + len(rec) - len(value)
        return (ns, tenant, key, parent, len(value), r._xxh3(value), lsn, expires, sid, voff, len(rec), lsn,
                1_000_000 + lsn)

    def size(self, sid: int) -> int:
        return os.path.getsize(os.path.join(self.dir, segment_name(sid)))


def _recover(directory: str, now: float = 1000.0):
    from memkv.flash.segment import list_segments

    segs = {sid: Segment(directory, sid, create=False) for sid in list_segments(directory)}
    try:
        out = recover(directory, segs, _scope, now_wall=now)
    finally:
        for s in segs.values():
            s.close()
    c = out.cols
    got = {}
    for i, key in enumerate(c["keys"]):
        ns, tn = out.names[c["names_idx"][i]]
        got[(ns, tn, key)] = (c["parents"][i], c["lengths"][i], c["checksums"][i], c["expires"][i], c["sids"][i],
                              c["voffs"][i], c["rsizes"][i], c["lsns"][i], c["versions"][i])
    return out, got, segs


def _expect(row: tuple) -> tuple:
    ns, tn, key, parent, length, cs, _gen, exp, sid, voff, rsize, lsn, ver = row
    return (ns, tn, key), (parent, length, cs, exp, sid, voff, rsize, lsn, ver)


def test_snapshot_roundtrip(tmp_path):
    rows = [("ctx", "", f"k{i}".encode(), b"p" if i % 3 == 0 else None, i, i * 7, i, 0.0 if i % 2 else 5.5, 1, i * 10,
             100 + i, i, 1_700_000_000_000_000 + i) for i in range(100)]
    rows.append(("sess", "tenant-a", b"x" * 300, None, 1 << 40, (1 << 64) - 1, 9, 0.0, 2, 0, 1, 101, (1 << 64) - 1))
    write_snapshot(str(tmp_path), 101, 9, {1: [4096, 1], 2: [10, 101]}, rows)
    snap = read_snapshot(str(tmp_path))
    assert snap.lsn == 101 and snap.gen == 9 and snap.segments == {1: [4096, 1], 2: [10, 101]}
    back = [(*snap.names[snap.cols["names_idx"][i]], snap.keys[i], snap.parents[i], snap.cols["lengths"][i],
             snap.cols["checksums"][i], snap.cols["generations"][i], snap.cols["expires"][i], snap.cols["sids"][i],
             snap.cols["voffs"][i], snap.cols["rsizes"][i], snap.cols["lsns"][i], snap.cols["versions"][i])
            for i in range(len(snap))]
    assert back == rows
    write_snapshot(str(tmp_path), 0, 0, {}, [])
    assert len(read_snapshot(str(tmp_path))) == 0


def test_damaged_or_old_snapshot_is_rejected(tmp_path):
    write_snapshot(str(tmp_path), 1, 1, {1: [10, 1]}, [("ctx", "", b"k", None, 1, 2, 1, 0.0, 1, 0, 70, 1, 1)])
    path = tmp_path / "index.snap"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError):
        read_snapshot(str(tmp_path))
    path.write_bytes(b"MKVSNAP1" + bytes(raw[8:]))
    with pytest.raises(SnapshotError):
        read_snapshot(str(tmp_path))


def test_full_replay_newest_wins_deletes_hide_and_damage_is_skipped(tmp_path):
    d = str(tmp_path)
    lg = Log(d)
    want = {}
    for i in range(50):
        row = lg.put(1, "ctx", f"k{i}".encode(), os.urandom(i + 1))
        want[row[:3]] = row
    row = lg.put(1, "sess", b"k1", b"tenant value", tenant="t1", parent=b"k0")
    want[row[:3]] = row
    lg.put(1, "nope", b"k1", b"unknown namespace")
    row = lg.put(2, "ctx", b"k3", b"newer")
    want[row[:3]] = row
    lg.delete(2, "ctx", b"k4")
    del want[("ctx", "", b"k4")]
    lg.put(2, "ctx", b"gone", b"expired", expires=999.0)
    row = lg.put(2, "ctx", b"later", b"expires later", expires=2000.0)
    want[row[:3]] = row
    # flip a byte inside the value of k10 (segment 1): only that record is lost
    k10 = want.pop(("ctx", "", b"k10"))
    with open(os.path.join(d, segment_name(1)), "r+b") as f:
        f.seek(k10[9])
        b = f.read(1)
        f.seek(k10[9])
        f.write(bytes([b[0] ^ 1]))
    # a torn record at the tail of the last segment
    with open(os.path.join(d, segment_name(2)), "ab") as f:
        f.write(r.encode(r.PUT, "ctx", "", b"torn", b"v" * 100, lsn=999)[:90])
    out, got, segs = _recover(d)
    assert got == dict(_expect(w) for w in want.values())
    assert out.snapshot_entries == 0 and len(out.damaged) == 1 and out.torn_tail == 1
    assert out.expired == 1 and out.skipped_namespaces == 1
    assert out.max_lsn == lg.lsn
    assert segs[2].tombstones == 1
    assert sum(s.live for s in segs.values()) == sum(w[10] for w in want.values())


def test_a_batch_torn_before_a_whole_one_is_a_torn_write_not_damage(tmp_path):
    """Two log batches are written in parallel: a crash can cut the first while the second is
    whole. The cut batch's unwritten rest reads as zeros; in the last segment that is a torn
    (never acknowledged) write, not damage. The same hole in an older segment is damage."""
    for last in (True, False):
        d = str(tmp_path / ("last" if last else "older"))
        os.makedirs(d)
        lg = Log(d)
        a = lg.put(1, "ctx", b"a", os.urandom(100))
        torn = r.encode(r.PUT, "ctx", "", b"torn", os.urandom(500), lsn=50)
        with open(os.path.join(d, segment_name(1)), "ab") as f:
            f.write(torn[:200] + bytes(len(torn) - 200))  # the batch's prefix reached the file, the rest did not
        b = lg.put(1, "ctx", b"b", os.urandom(100))
        if not last:
            lg.put(2, "ctx", b"c", b"in a later segment")
        out, got, _ = _recover(d)
        assert got[("ctx", "", b"a")] == _expect(a)[1] and got[("ctx", "", b"b")] == _expect(b)[1]
        assert ("ctx", "", b"torn") not in got
        assert (out.torn_tail, len(out.damaged)) == ((1, 0) if last else (0, 1))


def test_snapshot_plus_tail(tmp_path):
    d = str(tmp_path)
    lg = Log(d)
    rows = {}
    for i in range(30):
        row = lg.put(1, "ctx", f"k{i}".encode(), os.urandom(10))
        rows[row[:3]] = row
    row = lg.put(1, "sess", b"k0", b"scoped", tenant="t9")
    rows[row[:3]] = row
    # the snapshot covers segment 1 up to here, and also lists an entry of a namespace that is gone
    snap_rows = [*rows.values(), ("old-ns", "", b"z", None, 1, 1, 1, 0.0, 1, 0, 70, 5, 5)]
    write_snapshot(d, lg.lsn, lg.lsn, {1: [lg.size(1), 1]}, snap_rows)
    want = dict(rows)
    # the tail: overwrite, delete, new keys, and a compaction copy (old lsn) of a key the snapshot has newer
    row = lg.put(1, "ctx", b"k1", b"overwritten")
    want[row[:3]] = row
    lg.delete(2, "ctx", b"k2")
    del want[("ctx", "", b"k2")]
    row = lg.put(2, "ctx", b"new", b"tail value")
    want[row[:3]] = row
    lg.put(2, "ctx", b"k3", b"stale copy", lsn=1)  # lsn 1 < the snapshot's lsn of k3
    out, got, _ = _recover(d)
    assert got == dict(_expect(w) for w in want.values())
    assert out.replayed == 4 and out.snapshot_entries == 29
    assert out.skipped_namespaces == 1
