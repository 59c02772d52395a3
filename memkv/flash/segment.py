"""Segment files: ``seg-<id>.log`` under the flash directory, append-only.

A ``Segment`` knows its size (bytes assigned to records, written or pending),
how much of it is durable, the bytes of its records that are still live (the
compactor's input), its smallest record lsn (to decide when a tombstone may be
dropped) and how many readers hold its file descriptor (it is unlinked only
when none does).
"""

from __future__ import annotations

import contextlib
import os
import re

IOV_MAX = 1024
_NAME = re.compile(r"^seg-(\d{8})\.log$")


def segment_name(seg_id: int) -> str:
    return f"seg-{seg_id:08d}.log"


def list_segments(directory: str) -> list[int]:
    ids = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    __slots__ = ("id", "path", "fd", "size", "durable", "live", "tombstones", "min_lsn", "readers", "sealed",
                 "dir_synced", "doomed", "summary", "tomb_estimate")

    def __init__(self, directory: str, seg_id: int, *, create: bool) -> None:
        self.id = seg_id
        self.path = os.path.join(directory, segment_name(seg_id))
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(self.path, flags, 0o600)
        self.size = 0 if create else os.fstat(self.fd).st_size
        self.durable = self.size
        self.live = 0
        self.tombstones = 0
        self.min_lsn = 0 if not create else 1 << 63
        self.readers = 0
        self.sealed = not create
        self.dir_synced = not create
        self.doomed = False
        # compaction's reading of the file (bytes scanned, lowest put lsn per key hash, each key's
        # newest tombstone) and its estimate of the tombstone bytes a pass would copy (with the
        # state it holds for): memkv/flash/compaction.py, derived from the file, so never persisted
        self.summary: tuple | None = None
        self.tomb_estimate: tuple | None = None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __repr__(self) -> str:
        return f"<Segment {self.id} size={self.size} live={self.live}>"


def pwritev_all(fd: int, bufs: list, offset: int) -> None:
    """Write every buffer at ``offset`` (zero-copy; handles short writes and IOV_MAX)."""
    views = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i:i + IOV_MAX], offset)
        if n <= 0:
            raise OSError("pwritev wrote nothing")
        offset += n
        while n and i < len(views):
            size = views[i].nbytes
            if n >= size:
                n -= size
                i += 1
            else:
                views[i] = views[i].cast("B")[n:]
                n = 0


def preadv_all(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns bytes read (short only at end of file)."""
    got = 0
    total = view.nbytes
    while got < total:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got
