"""``purge``: remove every value a tenant wrote from one node, leaving no copy of its bytes.

Steps (all on the node's trio thread except file I/O, which runs in worker threads):

1. settle the flash log (records still being written by the writer thread);
2. for each live entry written by the tenant (any namespace): overwrite its
   region extent with zeros, then drop it (a durable entry gets a tombstone);
3. settle the log again (the tombstones are durable);
4. **scrub** the flash segment files: every PUT record of the tenant still in
   a file (live, overwritten, deleted earlier but not compacted yet, copies
   made by compaction) is overwritten with zeros in place, header included, and
   the file is fsynced. Recovery treats such a stretch as damage and resyncs
   at the next record header, so the other tenants' records are untouched;
5. write a fresh index snapshot (the old one named the purged keys).

Afterwards no file under the data dir holds the purged values (the audit log
never holds values; it keeps the purge record itself).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from memkv.errors import MemKVError

log = logging.getLogger("memkv.purge")


async def _settle(tier: Any) -> None:
    if tier is None:
        return
    try:
        await tier.log.wait(tier.log.seq)
    except MemKVError as exc:
        log.warning("purge: flash log write failed while settling: %s", exc)


def scrub_segments(directory: str, tenant: str) -> tuple[int, int]:
    """Zero every PUT record of ``tenant`` in the segment files of ``directory``; (records, bytes)."""
    from memkv.flash import record as r
    from memkv.flash.compaction import scan_headers
    from memkv.flash.segment import list_segments, segment_name

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


async def purge_tenant(node: Any, tenant: str) -> dict[str, Any]:
    store = node.store
    tier = getattr(node, "flash", None)
    await _settle(tier)
    now = store.clock()
    values = region_values = flash_values = nbytes = 0
    wview = store.region.view
    for e in list(store._index.values()):
        if e.tenant != tenant or store._index.get(e.ikey) is not e:
            continue
        if e.offset >= 0:
            wview[e.offset:e.offset + e.length] = bytes(e.length)
            region_values += 1
        if e.flash is not None:
            flash_values += 1
        nbytes += e.length
        values += 1
        store._drop(e, now, "delete")
    await _settle(tier)
    scrubbed = scrubbed_bytes = 0
    if tier is not None:
        scrubbed, scrubbed_bytes = await trio.to_thread.run_sync(scrub_segments, tier.dir, tenant)
        # a compaction running meanwhile may have copied a record before it was dropped: once more
        await _settle(tier)
        s2, b2 = await trio.to_thread.run_sync(scrub_segments, tier.dir, tenant)
        scrubbed += s2
        scrubbed_bytes += b2
        try:
            await tier.snapshot()
        except (MemKVError, OSError) as exc:
            log.warning("purge: snapshot after purge failed: %s", exc)
    return {"node": node.node_id, "tenant": tenant, "values": values, "bytes": nbytes,
            "region_values": region_values, "flash_values": flash_values,
            "flash_records_scrubbed": scrubbed, "flash_bytes_scrubbed": scrubbed_bytes}
