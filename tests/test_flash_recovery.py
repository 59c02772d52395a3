"""Recovery of the durable index: columnar snapshot + fast log replay, without a node process."""

from __future__ import annotations

import os

import pytest

from memkv.flash import record as r
from memkv.flash.log import FlashLog
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
    whole. The cut batch's unwritten rest reads as zeros; at the end of the log that is a torn
    (never acknowledged) write, not damage. These records carry no durability stamp (written as
    before it existed): a record of the next segment then vouches for the older one, and the same
    hole there is damage, as it always was."""
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


class Writer:
    """The node's log writer (``FlashLog``) on a directory, driven from this thread: ``queue`` appends
    a record as the tier does, ``settle`` writes and fdatasyncs everything queued as one batch (the
    shutdown path, ``flush_sync``). A record is acknowledged only once its batch settled, so the
    records queued before a ``settle`` are the acknowledged ones, and those queued after the last
    one are the batches a crash found in flight (queued before any of them was durable, stamped so)."""

    def __init__(self, directory: str, segment_size: int = 4096, lsn: int = 0) -> None:
        self.log = FlashLog(directory, segment_size=segment_size, budget=1 << 30)
        self.lsn = lsn
        self.values: dict[bytes, bytes] = {}
        self.at: dict[bytes, tuple[int, int, int]] = {}  # key -> (segment, record offset, record size)

    def queue(self, key: bytes, size: int = 300) -> int:
        """Append a put of ``key``; the id of the segment it went to."""
        self.lsn += 1
        value = os.urandom(size)
        head = r.encode_head(r.PUT, "ctx", "", key, None, len(value), r._xxh3(value), self.lsn, self.lsn, 0.0,
                             1_000_000 + self.lsn)
        p = self.log.append([head, value], len(head) + len(value), self.lsn)
        self.values[key] = value
        self.at[key] = (p.seg.id, p.offset, p.size)
        return p.seg.id

    def settle(self) -> None:
        self.log.flush_sync()

    def close(self) -> None:
        """A clean stop (the segment manifest gets each segment's final durable bytes)."""
        self.log.close()

    def crash(self) -> None:
        """Stop as a crash does: nothing more is written, the files are only closed."""
        for seg in self.log.segments.values():
            seg.close()


def _served(got: dict, w: Writer, keys) -> dict[bytes, bool]:
    """For each key, whether recovery indexed exactly the value the writer wrote for it."""
    return {k: got.get(("ctx", "", k), (None,) * 3)[2] == r._xxh3(w.values[k]) for k in keys}


def _zero(d: str, sid: int, start: int, end: int | None = None) -> None:
    path = os.path.join(d, segment_name(sid))
    end = os.path.getsize(path) if end is None else end
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def _crash_before_a_new_segment(d: str) -> tuple[Writer, list[bytes], list[bytes]]:
    """Six acknowledged records (each its own batch), then records queued while none of them was
    durable until one rolls over into segment 2; everything written. Returns the writer, the
    acknowledged keys and the in-flight keys of segment 1."""
    w = Writer(d)
    acked = [b"acked-%d" % i for i in range(6)]
    for k in acked:
        w.queue(k)
        w.settle()
    inflight = []
    while w.queue(b"inflight-%d" % len(inflight)) == 1:
        inflight.append(b"inflight-%d" % len(inflight))
    assert len(inflight) >= 3 and w.at[b"inflight-%d" % len(inflight)][0] == 2
    w.settle()
    w.crash()
    return w, acked, inflight


@pytest.mark.parametrize("image", ["hole, next segment empty", "hole, next segment written", "zero tail",
                                   "cut tail"])
def test_a_batch_cut_before_a_new_segment_is_a_torn_write_not_damage(tmp_path, image):
    """Crash images the parallel writer can leave at a segment boundary (found as "bad magic 0x0" in
    tests/test_crash.py): batch A (the first in-flight record) unwritten while batch B behind it in
    segment 1 was written past it, the record that rolled over into segment 2 written or not; or
    segment 1's in-flight tail unwritten (zeros) or cut. None of it was acknowledged: torn, not
    damage, and every acknowledged record is recovered."""
    d = str(tmp_path)
    w, acked, inflight = _crash_before_a_new_segment(d)
    first = w.at[inflight[0]]
    if image.startswith("hole"):
        _zero(d, 1, first[1], first[1] + first[2])
        lost = [inflight[0]]
    elif image == "zero tail":  # the file's size reached the disk, the last pages did not
        last = w.at[inflight[-1]]
        _zero(d, 1, last[1] - 10)
        lost = inflight[-2:]
    else:
        last = w.at[inflight[-1]]
        os.truncate(os.path.join(d, segment_name(1)), last[1] + 100)
        lost = [inflight[-1]]
    if image != "hole, next segment written":
        os.truncate(os.path.join(d, segment_name(2)), 0)
    out, got, _ = _recover(d)
    assert out.damaged == [] and out.torn_tail >= 1, (out.damaged, out.torn_tail)
    assert _served(got, w, acked) == dict.fromkeys(acked, True)
    assert _served(got, w, inflight) == {k: k not in lost for k in inflight}  # whole in-flight records are used


@pytest.mark.parametrize("where", ["middle of segment 1", "tail of segment 1", "cut end of segment 1",
                                   "middle of the last segment"])
def test_a_hole_in_acknowledged_records_is_reported(tmp_path, where):
    """The same shapes -- zeros, a zero tail, a cut end -- over records that were acknowledged before
    later records were queued are damage: reported, not taken for a torn write."""
    d = str(tmp_path)
    w = Writer(d)
    keys = []
    while len(keys) < 3 or w.at[keys[-1]][0] < 2 or sum(w.at[k][0] == 2 for k in keys) < 4:
        keys.append(b"k%d" % len(keys))
        w.queue(keys[-1])
        w.settle()
    w.crash()
    seg1 = [k for k in keys if w.at[k][0] == 1]
    seg2 = [k for k in keys if w.at[k][0] == 2]
    if where == "middle of segment 1":
        hit = seg1[1]
        _zero(d, 1, w.at[hit][1], w.at[hit][1] + w.at[hit][2])
    elif where == "tail of segment 1":
        hit = seg1[-1]
        _zero(d, 1, w.at[hit][1])
    elif where == "cut end of segment 1":
        hit = seg1[-1]
        os.truncate(os.path.join(d, segment_name(1)), w.at[hit][1] + 100)
    else:
        hit = seg2[1]
        _zero(d, 2, w.at[hit][1], w.at[hit][1] + w.at[hit][2])
    out, got, _ = _recover(d)
    assert out.torn_tail == 0 and (w.at[hit][0], w.at[hit][1]) in {d[:2] for d in out.damaged}, out.damaged
    # a cut file is also shorter than the manifest says it was durable: reported twice
    assert len(out.damaged) == (2 if where.startswith("cut") else 1), out.damaged
    assert _served(got, w, keys) == {k: k != hit for k in keys}


def test_a_torn_write_stays_torn_after_the_next_run_writes(tmp_path):
    """A restarted log writes on after a crash image with a hole: its new segments' stamps must not
    vouch for the old ones (ids skip one at the start of a run), so the hole is still a torn write
    at the next recovery, and the new records are recovered."""
    d = str(tmp_path)
    w, acked, inflight = _crash_before_a_new_segment(d)
    first = w.at[inflight[0]]
    _zero(d, 1, first[1], first[1] + first[2])
    os.truncate(os.path.join(d, segment_name(2)), 0)
    out, _, _ = _recover(d)
    assert out.damaged == [] and out.torn_tail == 1
    w2 = Writer(d, lsn=out.max_lsn)
    later = [b"later-%d" % i for i in range(20)]
    for k in later:
        w2.queue(k)
        w2.settle()
    w2.close()
    assert min(sid for sid, _, _ in w2.at.values()) == 4  # segment 3 skipped
    out, got, _ = _recover(d)
    assert out.damaged == [] and out.torn_tail == 1, (out.damaged, out.torn_tail)
    assert _served(got, w, acked) == dict.fromkeys(acked, True)
    assert _served(got, w2, later) == dict.fromkeys(later, True)


def _three_segments(d: str) -> tuple[Writer, list[bytes]]:
    """Acknowledged records (each its own batch) into segments 1 to 3, then a clean stop."""
    w = Writer(d)
    keys = []
    while len(keys) < 3 or w.at[keys[-1]][0] < 3:
        keys.append(b"k%d" % len(keys))
        w.queue(keys[-1])
        w.settle()
    w.close()
    return w, keys


def test_the_manifest_tells_a_lost_segment_from_a_removed_one(tmp_path):
    """No index snapshot: a segment file deleted or cut behind the log's back is reported from the
    segment manifest; one the log removed itself (compaction's ``FlashLog.remove``) is not."""
    d = str(tmp_path)
    w, keys = _three_segments(d)
    seg2 = os.path.join(d, segment_name(2))
    with open(seg2, "rb") as f:
        saved = f.read()
    os.unlink(seg2)
    out, _, _ = _recover(d)
    assert out.damaged == [(2, 0, "segment file missing")]
    with open(seg2, "wb") as f:
        f.write(saved[:w.at[[k for k in keys if w.at[k][0] == 2][-1]][1]])  # cut at a record boundary
    out, _, _ = _recover(d)
    assert [(sid, off) for sid, off, _ in out.damaged] == [(2, os.path.getsize(seg2))] and out.torn_tail == 0
    with open(seg2, "wb") as f:
        f.write(saved)
    out, _, _ = _recover(d)
    assert out.damaged == [] and out.torn_tail == 0
    flog = FlashLog(d, segment_size=4096, budget=1 << 30)
    flog.remove(flog.segments[2])
    flog.close()
    out, got, _ = _recover(d)
    assert out.damaged == [] and not os.path.exists(seg2)
    assert _served(got, w, keys) == {k: w.at[k][0] != 2 for k in keys}


def test_a_manifest_that_cannot_be_rewritten_does_not_stop_a_removal(tmp_path):
    """Compaction frees space by removing segments, also when the disk is too full for a new
    manifest: the removal goes on, the manifest is dropped (nothing is checked, nothing reported
    falsely), and the next new segment writes it again."""
    d = str(tmp_path)
    _three_segments(d)
    blocker = os.path.join(d, "segments.manifest.tmp")
    os.mkdir(blocker)  # the manifest's temporary file cannot be opened for writing: a real OSError
    flog = FlashLog(d, segment_size=4096, budget=1 << 30)
    flog.remove(flog.segments[2])
    assert not os.path.exists(os.path.join(d, segment_name(2)))
    assert not os.path.exists(os.path.join(d, "segments.manifest"))
    flog.close()  # cannot write it either: logged
    out, _, _ = _recover(d)
    assert out.damaged == []
    os.rmdir(blocker)
    w2 = Writer(d, lsn=out.max_lsn)
    w2.queue(b"after")
    w2.settle()
    w2.crash()
    os.unlink(os.path.join(d, segment_name(3)))
    out, _, _ = _recover(d)
    assert out.damaged == [(3, 0, "segment file missing")]
