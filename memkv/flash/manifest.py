"""The segment manifest: which segment files the log has, and how many bytes of each were durable.

Recovery replays whatever segment files it finds, so without a list of what should be there a
segment file that is gone, or emptied or cut at a record boundary, loses its records in silence
(the index snapshot catches it only for the rows it names; compaction removes segments too, so
the files alone cannot tell a removal from a loss). The log writer rewrites this small file
(``MKVSEGM1`` | xxh3-64 of the body | body: ``(seg_id u64, durable_bytes u64)`` pairs, little
endian) when a new segment gets its first write -- before any record of it is acknowledged --,
when compaction removes a segment (before the file is unlinked), and at shutdown. Written to a
temporary name, fsynced and renamed, then the directory is fsynced (which also makes the new
segment's directory entry durable). Recovery reports every listed segment that is missing or
shorter than its durable bytes (``check``). A missing or damaged manifest is no list: nothing to
check (a data dir written before the manifest existed, or one whose manifest could not be
rewritten when compaction removed a segment: ``drop_manifest``).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from array import array

import xxhash

from memkv.flash.segment import fsync_dir

NAME = "segments.manifest"
MAGIC = b"MKVSEGM1"
_SWAP = sys.byteorder != "little"


class ManifestError(Exception):
    pass


def write_manifest(directory: str, lengths: dict[int, int]) -> None:
    """Replace the manifest with ``lengths`` (segment id -> bytes known durable), durably."""
    body = array("Q", [x for sid in sorted(lengths) for x in (sid, lengths[sid])])
    if _SWAP:
        body.byteswap()
    raw = body.tobytes()
    path = os.path.join(directory, NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(MAGIC + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw)) + raw)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def read_manifest(directory: str) -> dict[int, int] | None:
    """The manifest (segment id -> durable bytes), None if there is none; ``ManifestError`` if damaged."""
    try:
        with open(os.path.join(directory, NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < 16 or raw[:8] != MAGIC or (len(raw) - 16) % 16:
        raise ManifestError("bad segment manifest header or length")
    if xxhash.xxh3_64_intdigest(raw[16:]) != struct.unpack_from("<Q", raw, 8)[0]:
        raise ManifestError("segment manifest checksum mismatch")
    body = array("Q")
    body.frombytes(raw[16:])
    if _SWAP:
        body.byteswap()
    return dict(zip(body[0::2], body[1::2], strict=True))


def check(listed: dict[int, int], sizes: dict[int, int]) -> list[tuple[int, int, str]]:
    """Damage the manifest shows: (segment, offset, error) for each listed segment that is missing or
    shorter than its durable bytes, given the sizes of the segment files there are."""
    out = []
    for sid, length in sorted(listed.items()):
        size = sizes.get(sid)
        if size is None:
            out.append((sid, 0, "segment file missing"))
        elif size < length:
            out.append((sid, size, f"segment file ends at {size}, {length} bytes of it were durable"))
    return out


def drop_manifest(directory: str) -> None:
    """Remove the manifest (no list: nothing is checked), when it cannot be rewritten -- a full
    disk must not stop compaction from removing segments; the next rewrite brings it back."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, NAME))
    fsync_dir(directory)
