"""Index snapshots: the durable part of the index in one checksummed, columnar file.

Layout: ``MKVSNAP3`` | xxh3-64 of the body (u64 LE) | body::

    meta_len u32 | meta (msgpack) | zero padding to a multiple of 8 |
    columns (N little-endian values each, in this order):
        length u64, checksum u64, generation u64, value_off u64, rec_size u64, lsn u64, version u64,
        expires_wall f64,
        seg_id u32, name u32 (index into meta "names"), key_len u32, parent_len i32 (-1: no parent) |
    keys (concatenated) | parents (concatenated) |
    tombstone columns (T values each): version u64, expires_wall f64, name u32, key_len u32 |
    tombstone keys (concatenated)

    meta = {"lsn": max lsn, "gen": max generation, "n": N, "t": T,
            "segments": {seg_id: [covered_end, min_lsn]}, "names": [[namespace, tenant], ...]}

Tombstones (versioned deletes still kept, memkv/engine/store.py) are the index's too: their
records may lie in the covered part of the log. Each counts as written at the snapshot's
``lsn`` (the key's state when the snapshot was taken: any record of the key in the log tail
with a higher lsn is newer, any other is older). ``MKVSNAP3`` (no tombstones) is an older
format: it is ignored and the log replayed in full, which recovers the same index.

Loading is a handful of bulk conversions (``array.frombytes`` + ``tolist``) and
one slice per key: no per-entry decoding (a 1M-entry index loads in a fraction
of a second). Recovery loads it, then scans every segment from its
``covered_end`` (0 for a segment the snapshot does not list). The file is
written to a temporary name, fsynced and renamed, so a crash leaves either the
old or the new snapshot. A snapshot of another format is ignored (the log is
replayed in full).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from memkv.flash.segment import fsync_dir

MAGIC = b"MKVSNAP4"
NAME = "index.snap"

# (name, array typecode, item size); u64 columns first so that every column stays 8-byte aligned
COLUMNS = (("lengths", "Q", 8), ("checksums", "Q", 8), ("generations", "Q", 8), ("voffs", "Q", 8),
           ("rsizes", "Q", 8), ("lsns", "Q", 8), ("versions", "Q", 8), ("expires", "d", 8), ("sids", "I", 4),
           ("names_idx", "I", 4), ("key_lens", "I", 4), ("parent_lens", "i", 4))
TOMB_COLUMNS = (("t_versions", "Q", 8), ("t_expires", "d", 8), ("t_names", "I", 4), ("t_key_lens", "I", 4))
for _name, _code, _size in COLUMNS + TOMB_COLUMNS:
    assert array(_code).itemsize == _size, (_name, _code)
_SWAP = sys.byteorder != "little"


class SnapshotError(Exception):
    pass


@dataclass
class Snapshot:
    """A loaded snapshot: parallel lists (one item per entry)."""

    lsn: int
    gen: int
    segments: dict[int, list[int]]
    names: list[tuple[str, str]]
    keys: list[bytes] = field(default_factory=list)
    parents: list[bytes | None] = field(default_factory=list)
    cols: dict[str, list[Any]] = field(default_factory=dict)
    # tombstones: (name index, key, version, expires_wall, lsn)
    tombs: list[tuple[int, bytes, int, float, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def encode_snapshot(lsn: int, gen: int, segments: dict[int, list[int]], rows: list[tuple],
                    tombs: list[tuple[str, str, bytes, int, float]] = ()) -> bytes:  # type: ignore[assignment]
    """The body of a snapshot; ``rows`` are ``(ns, tenant, key, parent, length, checksum, generation,
    expires_wall, seg_id, value_off, rec_size, lsn, version)``, ``tombs`` ``(ns, tenant, key, version,
    expires_wall)``."""
    n = len(rows)
    names: dict[tuple[str, str], int] = {}
    if n:
        nss, tns, keys, parents, lengths, sums, gens, exps, sids, voffs, rsizes, lsns, vers = zip(*rows,
                                                                                                    strict=True)
        nidx = [names.setdefault(nt, len(names)) for nt in zip(nss, tns, strict=True)]
    else:
        keys = parents = lengths = sums = gens = exps = sids = voffs = rsizes = lsns = vers = ()
        nidx = []
    data = {"lengths": lengths, "checksums": sums, "generations": gens, "voffs": voffs, "rsizes": rsizes,
            "lsns": lsns, "versions": vers, "expires": [float(x) for x in exps], "sids": sids, "names_idx": nidx,
            "key_lens": [len(k) for k in keys], "parent_lens": [-1 if p is None else len(p) for p in parents]}
    tdata: dict[str, Any] = {"t_versions": [t[3] for t in tombs], "t_expires": [float(t[4]) for t in tombs],
                             "t_names": [names.setdefault((t[0], t[1]), len(names)) for t in tombs],
                             "t_key_lens": [len(t[2]) for t in tombs]}
    meta = msgpack.packb({"lsn": lsn, "gen": gen, "n": n, "t": len(tombs), "segments": segments,
                          "names": [list(nt) for nt in names]}, use_bin_type=True)
    head = struct.pack("<I", len(meta)) + meta
    parts = [head, b"\0" * (-(len(head) + 16) % 8)]  # the body starts at file offset 16
    for name, code, _ in COLUMNS:
        a = array(code, data[name])
        if _SWAP:
            a.byteswap()
        parts.append(a.tobytes())
    parts.append(b"".join(keys))
    parts.append(b"".join(p for p in parents if p))
    parts.append(b"\0" * (-sum(len(p) for p in parts) % 8))  # the tombstone columns start 8-byte aligned
    for name, code, _ in TOMB_COLUMNS:
        a = array(code, tdata[name])
        if _SWAP:
            a.byteswap()
        parts.append(a.tobytes())
    parts.append(b"".join(t[2] for t in tombs))
    return b"".join(parts)


def write_snapshot(directory: str, lsn: int, gen: int, segments: dict[int, list[int]], rows: list[tuple],
                   tombs: list[tuple[str, str, bytes, int, float]] = ()) -> int:  # type: ignore[assignment]
    body = encode_snapshot(lsn, gen, segments, rows, tombs)
    path = os.path.join(directory, NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, MAGIC + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
        view = memoryview(body)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)
    return len(body) + 16


def read_snapshot(directory: str) -> Snapshot | None:
    """The snapshot, None if there is none; raises ``SnapshotError`` if it is damaged."""
    path = os.path.join(directory, NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < 20 or raw[:8] != MAGIC:
        raise SnapshotError("bad snapshot header (or an older format)")
    mv = memoryview(raw)
    if xxhash.xxh3_64_intdigest(mv[16:]) != struct.unpack_from("<Q", raw, 8)[0]:
        raise SnapshotError("snapshot checksum mismatch")
    try:
        return _decode(raw, mv)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a damaged snapshot
        raise SnapshotError(f"cannot decode snapshot: {exc}") from exc


def _columns(mv: memoryview, pos: int, columns: tuple, n: int, out: dict[str, list[Any]], error: str) -> int:
    """Decode ``n`` values of each of ``columns`` from ``pos`` into ``out``; the position after them."""
    for name, code, size in columns:
        a = array(code)
        a.frombytes(mv[pos:pos + n * size])
        if len(a) != n:
            raise SnapshotError(error)
        if _SWAP:
            a.byteswap()
        out[name] = a.tolist()
        pos += n * size
    return pos


def _decode(raw: bytes, mv: memoryview) -> Snapshot:
    (meta_len,) = struct.unpack_from("<I", raw, 16)
    pos = 20 + meta_len
    meta = msgpack.unpackb(mv[20:pos], raw=False, strict_map_key=False)
    pos += -pos % 8
    n = int(meta["n"])
    snap = Snapshot(int(meta["lsn"]), int(meta["gen"]), {int(k): v for k, v in meta["segments"].items()},
                    [(a, b) for a, b in meta["names"]])
    pos = _columns(mv, pos, COLUMNS, n, snap.cols, "snapshot is truncated")
    key_lens = snap.cols.pop("key_lens")
    parent_lens = snap.cols.pop("parent_lens")
    keys = []
    append = keys.append
    for kl in key_lens:
        end = pos + kl
        append(raw[pos:end])
        pos = end
    snap.keys = keys
    if any(pl >= 0 for pl in parent_lens):
        parents: list[bytes | None] = []
        for pl in parent_lens:
            if pl < 0:
                parents.append(None)
            else:
                parents.append(raw[pos:pos + pl])
                pos += pl
        snap.parents = parents
    else:
        snap.parents = [None] * n
    t = int(meta.get("t", 0))
    pos += -(pos - 16) % 8
    tcols: dict[str, list[Any]] = {}
    pos = _columns(mv, pos, TOMB_COLUMNS, t, tcols, "snapshot is truncated (tombstones)")
    lsn = snap.lsn
    for ni, kl, ver, exp in zip(tcols["t_names"], tcols["t_key_lens"], tcols["t_versions"], tcols["t_expires"],
                                strict=True):
        if ni >= len(snap.names):
            raise SnapshotError("tombstone names an unknown namespace")
        snap.tombs.append((ni, raw[pos:pos + kl], ver, exp, lsn))
        pos += kl
    if pos != len(raw):
        raise SnapshotError("snapshot has trailing or missing bytes")
    return snap


def remove_snapshot(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, NAME))
