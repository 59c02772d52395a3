"""Scrubbing a tenant's records out of the segment files (purge).

Every PUT record of the tenant still in a file (live, overwritten, deleted
earlier but not compacted yet, copies made by compaction) is overwritten with
zeros in place, header included, and the file is fsynced. Recovery treats such
a stretch as damage and resyncs at the next record header, so the other
tenants' records are untouched.
"""

from __future__ import annotations

import os

from memkv.flash import record as r
from memkv.flash.compaction import scan_headers
from memkv.flash.segment import list_segments, segment_name


def scrub_segments(directory: str, tenant: str) -> tuple[int, int]:
    """Zero every PUT record of ``tenant`` in the segment files of ``directory``; (records, bytes)."""
    records = nbytes = 0
    for sid in list_segments(directory):
        path = os.path.join(directory, segment_name(sid))
        try:
            recs = scan_headers(path)
        except FileNotFoundError:
            continue  # compacted away meanwhile
        hits = [x for x in recs if x.kind == r.PUT and x.tenant == tenant]
        if not hits:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for rec in hits:
                zeros = bytes(rec.size)
                off = 0
                while off < rec.size:
                    off += os.pwrite(fd, memoryview(zeros)[off:], rec.offset + off)
                records += 1
                nbytes += rec.size
            os.fsync(fd)
        finally:
            os.close(fd)
    return records, nbytes
