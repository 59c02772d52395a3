"""``purge``: remove every value a tenant wrote from one node, leaving no copy of its bytes.

Steps (all on the node's trio thread except file I/O, which runs in worker threads):

1. settle the flash log (records still being written by the writer thread);
2. ``Store.erase_tenant``: each live entry written by the tenant (any namespace)
   has its region extent overwritten with zeros and is dropped (a durable entry
   gets a tombstone);
3. ``FlashTier.scrub_tenant``: once the tombstones are durable, every PUT record of
   the tenant still in a segment file is zeroed in place (memkv/flash/scrub.py);
4. a fresh index snapshot (the old one named the purged keys).

Afterwards no file under the data dir holds the purged values (the audit log
never holds values; it keeps the purge record itself).
"""

from __future__ import annotations

import logging
from typing import Any

from memkv.engine.store import Store
from memkv.errors import MemKVError
from memkv.flash.tier import FlashTier

log = logging.getLogger("memkv.purge")


async def purge_tenant(store: Store, tier: FlashTier | None, node_id: str, tenant: str) -> dict[str, Any]:
    if tier is not None:
        await tier.settle()
    erased = store.erase_tenant(tenant)
    scrubbed = scrubbed_bytes = 0
    if tier is not None:
        scrubbed, scrubbed_bytes = await tier.scrub_tenant(tenant)
        try:
            await tier.snapshot()
        except (MemKVError, OSError) as exc:
            log.warning("purge: snapshot after purge failed: %s", exc)
    return {"node": node_id, "tenant": tenant, **erased,
            "flash_records_scrubbed": scrubbed, "flash_bytes_scrubbed": scrubbed_bytes}
