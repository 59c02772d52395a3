"""The storage engine of one node: region, allocator, index, eviction (pure, synchronous)."""

from memkv.engine.allocator import ExtentAllocator
from memkv.engine.checksum import checksum
from memkv.engine.entry import Entry
from memkv.engine.eviction import LRUPolicy, S3FIFOPolicy, make_policy
from memkv.engine.region import Region
from memkv.engine.store import Reservation, Store

__all__ = [
    "Entry",
    "ExtentAllocator",
    "LRUPolicy",
    "Region",
    "Reservation",
    "S3FIFOPolicy",
    "Store",
    "checksum",
    "make_policy",
]
