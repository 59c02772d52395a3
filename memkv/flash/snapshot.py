"""Index snapshots: the durable part of the index in one checksummed file.

Layout: ``MKVSNAP1`` | xxh3-64 of the body (u64 LE) | body (msgpack)::

    {"lsn": max lsn, "gen": max generation,
     "segments": {seg_id: [covered_end, min_lsn]},
     "entries": [[ns, tenant, key, parent, length, checksum, generation, expires_wall,
                  seg_id, value_off, rec_size, lsn], ...]}

Recovery loads it, then scans every segment from its ``covered_end`` (0 for a
segment the snapshot does not list). The file is written to a temporary name,
fsynced and renamed, so a crash leaves either the old or the new snapshot.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any

import msgpack
import xxhash

from memkv.flash.segment import fsync_dir

MAGIC = b"MKVSNAP1"
NAME = "index.snap"


class SnapshotError(Exception):
    pass


def write_snapshot(directory: str, data: dict[str, Any]) -> int:
    body = msgpack.packb(data, use_bin_type=True)
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


def read_snapshot(directory: str) -> dict[str, Any] | None:
    """The snapshot, None if there is none; raises ``SnapshotError`` if it is damaged."""
    path = os.path.join(directory, NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise SnapshotError("bad snapshot header")
    body = memoryview(raw)[16:]
    if xxhash.xxh3_64_intdigest(body) != struct.unpack_from("<Q", raw, 8)[0]:
        raise SnapshotError("snapshot checksum mismatch")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a damaged snapshot
        raise SnapshotError(f"cannot decode snapshot: {exc}") from exc
    return data


def remove_snapshot(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, NAME))
