"""The storage engine of one node: region + allocator + index + eviction pools.

Pure, synchronous, in-process. The payload of a value lives only in the region;
the index holds :class:`Entry` metadata. A write is two steps so that the server
can receive the payload straight into its final place::

    res = store.reserve(key, n, namespace="shared", checksum=c)   # room made, extent allocated
    sock.recv_into(res.view)                                        # payload lands in the region
    entry = store.commit(res)                                       # verified, indexed

Memory accounting. The region is split into pools (``PoolConfig.fraction``).
A pool's *capacity* is ``fraction x memory``; its live-data *budget* is
``fraction x memory x (1 - headroom)``: the headroom is the pool's share of room
for quarantined extents (freed bytes that may not be reused for
``quarantine_s``). A put into pool P

1. evicts from P only (never from another pool) until P's live bytes fit its budget;
2. fails with OutOfMemory if P's live + quarantined bytes would exceed its
   capacity (a write flood in one pool gets back-pressure instead of eating the
   room of the other pool);
3. allocates an extent; if there is no contiguous extent, evicts more from P
   (all the way when there is no quarantine, since freed bytes are reusable at
   once; else a bounded amount, so that the room exists once the quarantine
   expires) and raises OutOfMemory if it still cannot allocate.

Only extents a reader may know about (the entry was returned by ``get``,
``view`` or ``lookup_prefix``, or published in the client-readable index) go
through the quarantine when freed; bytes that were never located by anyone are
reusable at once. Extents only the client-readable index showed come back
earlier, as soon as no reader that announced a read may still copy them
(``readers.py``: the readers' grace epoch), so that writes into a full region
do not wait out the bound while no one-sided read is going on.

The client-readable index (``readable_index.py``) lives at the end of the region,
after the allocator's bytes. The store calls its two hooks and nothing else:
``published(entry)`` once an entry is indexed with its bytes in the region or its
version or TTL changed (``commit``, ``refill``, ``set_expiry``), and
``withdrawn(entry)`` before an entry's extent is freed (``_drop``, ``_demote``).
``touch(entry)`` is how reads that never reached the node count (eviction, hits);
``close`` stops the index's heartbeat (readers of a dead node's mapping then ask
the node instead).

Versioned deletes. A delete carries a version like a write (the client stamps it:
memkv/protocol/versions.py) and leaves a *tombstone*: the key's index key, the
delete's version and a purge time. A write of that key no newer than the
tombstone is dropped (``commit``), as a write older than the value held is; a
delete older than the value held leaves the value. So replicas that receive a
key's writes and deletes in any order -- late client sends, read repairs, slot
copies, anti-entropy -- end with the same, newest state, and a value a replica
missed the delete of is never copied back over the tombstone. Tombstones live
apart from the index (a GET hit never looks at them; a miss reports the
tombstone's version so that a cluster read does not take an older value from
another replica) and are bounded: each is kept ``tombstone_retention`` seconds
(default one hour) and at most ``max_tombstones`` are kept (the oldest go
first). After that bound a replica that missed the delete and was not repaired
meanwhile (anti-entropy compares replicas far more often) could bring the value
back. A newer write of the key replaces its tombstone. Durable namespaces
persist tombstones in the flash log and snapshot (``Tier.buried``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

from memkv.config import NamespacePolicy, PoolConfig, default_namespaces, default_pools
from memkv.engine.allocator import ExtentAllocator
from memkv.engine.checksum import checksum as _checksum
from memkv.engine.clock import SYSTEM, Clock
from memkv.engine.entry import Entry
from memkv.engine.eviction import LRUPolicy, S3FIFOPolicy, make_policy
from memkv.engine.observer import StoreObserver
from memkv.engine.readable_index import ReadableIndex, default_slots
from memkv.engine.readers import ReaderTable
from memkv.engine.region import Region
from memkv.engine.tier import Tier
from memkv.errors import (
    ChecksumMismatch,
    InvalidArgument,
    KeyExists,
    OutOfMemory,
    QuotaExceeded,
    UnknownNamespace,
    ValueTooLarge,
)
from memkv.protocol.index_format import table_bytes
from memkv.protocol.versions import CLOCK, VersionClock, newer

DEFAULT_TOMBSTONE_RETENTION_S = 3600.0
DEFAULT_MAX_TOMBSTONES = 1_000_000

# indices into the per-namespace / per-tenant counter lists
_HITS, _MISSES, _PUTS, _BYTES, _ENTRIES = range(5)
_STAT_NAMES = ("hits", "misses", "puts", "bytes", "entries")


class Reservation:
    """Room reserved for one value being written; fill ``view`` then ``commit`` or ``abort``."""

    __slots__ = (
        "key", "namespace", "tenant", "ikey", "offset", "length", "size", "checksum", "ttl", "pin",
        "parent", "view", "pool", "policy", "done", "version", "dram_only", "copy",
    )

    def __init__(self, key, namespace, tenant, ikey, offset, length, size, checksum, ttl, pin, parent,
                 view, pool, policy, version=0, dram_only=False, copy=False) -> None:
        self.key: bytes = key
        self.namespace: str = namespace
        self.tenant: str = tenant
        self.ikey: tuple[str, str, bytes] = ikey
        self.offset: int = offset
        self.length: int = length
        self.size: int = size
        self.checksum: int = checksum
        self.ttl: float | None = ttl
        self.pin: bool = pin
        self.parent: bytes | None = parent
        self.view: memoryview = view
        self.pool: _Pool = pool
        self.policy: NamespacePolicy = policy
        self.done = False
        self.version: int = version  # the writer's (memkv/protocol/versions.py); 0: the store assigns one
        # never handed to the tier (no-store writes: no flash record, so no segment or snapshot holds it)
        self.dram_only: bool = dram_only
        # a replica's state carried over (slot copy, read repair, anti-entropy): the newer version
        # wins even in a write-once namespace (``commit``)
        self.copy: bool = copy

    def __repr__(self) -> str:
        return f"<Reservation {self.namespace}/{self.key!r} off={self.offset} len={self.length}>"


class _Pool:
    __slots__ = ("name", "config", "capacity", "budget", "used", "entries", "policy", "tenant_used",
                 "tenant_lru", "tenant_evictions", "oom")

    def __init__(self, config: PoolConfig, capacity: int, budget: int) -> None:
        self.name = config.name
        self.config = config
        self.capacity = capacity
        self.budget = budget
        self.used = 0  # region bytes of live entries + open reservations
        self.entries = 0
        self.policy: LRUPolicy | S3FIFOPolicy = make_policy(config.policy)
        self.tenant_used: dict[str, int] = {}
        self.tenant_lru: dict[str, OrderedDict[Entry, None]] = {}  # per tenant, oldest first
        self.tenant_evictions: dict[str, int] = {}  # what a tenant's own STATS shows (Store.tenant_stats)
        self.oom = 0


def _evictable(now: float) -> Callable[[Entry], bool]:
    def eligible(e: Entry) -> bool:
        p = e.pin_until
        return (p is None or p <= now) and e.lease_until <= now and e.children == 0

    return eligible


class Store:
    def __init__(
        self,
        *,
        memory: int,
        namespaces: dict[str, NamespacePolicy] | None = None,
        pools: dict[str, PoolConfig] | None = None,
        shm_dir: str = "/dev/shm",
        name: str = "node",
        clock: Clock = SYSTEM,
        versions: VersionClock = CLOCK,
        quarantine_s: float = 2.0,
        tenant_quotas: dict[str, int] | None = None,
        max_value: int = 1 << 30,
        granularity: int = 256,
        headroom: float | None = None,
        index_slots: int | None = None,
        tombstone_retention: float = DEFAULT_TOMBSTONE_RETENTION_S,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
    ) -> None:
        self.namespaces: dict[str, NamespacePolicy] = dict(namespaces or default_namespaces())
        pool_cfgs = dict(pools or default_pools())
        for ns in self.namespaces.values():
            if ns.pool not in pool_cfgs:
                raise InvalidArgument(f"namespace {ns.name}: unknown pool {ns.pool!r}")
        self.clock = clock
        self._now = clock.monotonic
        self.versions = versions
        self.quarantine_s = float(quarantine_s)
        self.max_value = int(max_value)
        self.tenant_quotas: dict[str, int] = dict(tenant_quotas or {})
        if headroom is None:
            headroom = 0.125 if self.quarantine_s > 0 else 0.0
        if not 0.0 <= headroom < 1.0:
            raise InvalidArgument("headroom must be in [0, 1)")
        self.headroom = headroom
        # the client-readable index after the values (none without a quarantine: nothing would keep
        # a reader's bytes in place); ``index_slots`` None: sized from ``memory``, 0: none
        slots = 0 if self.quarantine_s <= 0 else default_slots(memory) if index_slots is None else int(index_slots)
        self.memory = int(memory)
        index_base = -(-self.memory // 4096) * 4096
        self.region = Region(index_base + (table_bytes(slots) if slots else 0), directory=shm_dir, name=name)
        try:
            self.allocator = ExtentAllocator(
                memory, granularity=granularity, quarantine_s=self.quarantine_s, clock=clock.monotonic
            )
        except BaseException:
            self.region.close()
            raise
        usable = self.allocator.size
        self.pools: dict[str, _Pool] = {}
        for pname, cfg in pool_cfgs.items():
            cap = int(cfg.fraction * usable)
            self.pools[pname] = _Pool(cfg, cap, int(cap * (1.0 - headroom)))
        self._ro = self.region.view.toreadonly()
        self.readable: ReadableIndex | None = None
        self.readers: ReaderTable | None = None  # who may still copy an extent the index showed
        if slots:
            self.readable = ReadableIndex(self.region.view, index_base, slots, wall=clock.wall,
                                          monotonic=clock.monotonic, quarantine_s=self.quarantine_s)
            self.readers = ReaderTable(self.region.view, index_base, monotonic=clock.monotonic,
                                       quarantine_s=self.quarantine_s)
        self._index: dict[tuple[str, str, bytes], Entry] = {}
        self._children: dict[tuple[str, str, bytes], int] = {}  # parent ikey -> live children
        self._expiry: list[tuple[float, int, Entry]] = []  # heap, lazily cleaned
        self._seq = itertools.count()
        self.generation = 0
        self._ns_stats: dict[str, list[int]] = {n: [0, 0, 0, 0, 0] for n in self.namespaces}
        self._tenant_stats: dict[str, list[int]] = {}
        self.corrupt = 0
        self.evictions = 0
        self.expirations = 0
        self.checksum_mismatches = 0
        self.superseded = 0  # writes dropped because the key already held a newer version (or tombstone)
        # Tombstones of versioned deletes (see the module doc): index key -> (version, purge time on the
        # store's monotonic clock, generation), oldest first; kept apart from the index so that a GET hit
        # never looks at them.
        if tombstone_retention <= 0 or max_tombstones < 1:
            raise InvalidArgument("tombstone retention and max_tombstones must be positive")
        self.tombstone_retention = float(tombstone_retention)
        self.max_tombstones = int(max_tombstones)
        self._tombs: OrderedDict[tuple[str, str, bytes], tuple[int, float, int]] = OrderedDict()
        self.tombstones_expired = 0  # purged after their retention
        self.tombstones_evicted = 0  # purged early: more than max_tombstones
        self.superseded_deletes = 0  # deletes older than the value they found (the value stays)
        self.closed = False
        # The tier under the region that keeps durable namespaces (the flash tier), or None:
        # set once, while the node is built (``attach_tier``).
        self.tier: Tier | None = None
        # Subsystems told of every value that enters or leaves the index (memkv/engine/observer.py):
        # set while the node is built (``attach_observer``); empty, they cost one test per write.
        self.observers: tuple[StoreObserver, ...] = ()

    def attach_tier(self, tier: Tier) -> None:
        """Durable namespaces are kept by ``tier`` from now on (once, before any request)."""
        if self.tier is not None:
            raise InvalidArgument("the store already has a tier")
        self.tier = tier

    def attach_observer(self, observer: StoreObserver) -> None:
        """``observer`` is told of every value indexed or dropped from now on (before any request)."""
        self.observers = (*self.observers, observer)

    def now(self) -> float:
        """The store's monotonic time (its injected clock)."""
        return self._now()

    # -- helpers -------------------------------------------------------------------------
    def _ns(self, namespace: str) -> NamespacePolicy:
        try:
            return self.namespaces[namespace]
        except KeyError:
            raise UnknownNamespace(f"unknown namespace {namespace!r}") from None

    def _tstats(self, tenant: str) -> list[int]:
        st = self._tenant_stats.get(tenant)
        if st is None:
            st = self._tenant_stats[tenant] = [0, 0, 0, 0, 0]
        return st

    def _quota(self, pool: _Pool, tenant: str) -> int | None:
        q = self.tenant_quotas.get(tenant)
        return q if q is not None else pool.config.tenant_quota

    def _lookup(self, key: bytes, namespace: str, tenant: str, now: float | None) -> Entry | None:
        """Live entry for the key or None; drops it if expired (``now`` None = read the clock if needed)."""
        pol = self._ns(namespace)
        e = self._index.get((namespace, tenant if pol.tenant_scoped else "", key))
        if e is not None and e.expires is not None:
            if now is None:
                now = self._now()
            if e.expires <= now:
                self._drop(e, now, "expire")
                return None
        return e

    def _drop(self, e: Entry, now: float, reason: str) -> None:
        """Remove a live entry from the index, the accounting and the region."""
        if self._index.get(e.ikey) is not e:
            return
        if e.flash is not None and self.tier is not None:
            if reason == "evict":  # the value stays on flash: only its DRAM copy goes
                self._demote(e, now)
                return
            self.tier.dropped(e, reason)
        del self._index[e.ikey]
        t = e.tenant
        if e.offset >= 0:  # a flash-only entry has no region accounting
            pool = self.pools[e.pool]
            if reason != "evict":  # pick_victim already detached it from the policy
                pool.policy.remove(e)
            self._unaccount(pool, e)
        ns = self._ns_stats[e.namespace]
        ns[_BYTES] -= e.length
        ns[_ENTRIES] -= 1
        ts = self._tstats(t)
        ts[_BYTES] -= e.length
        ts[_ENTRIES] -= 1
        if e.offset >= 0:
            self._free_extent(e, now)
            e.offset = -1
        if e.parent is not None:
            pk = (e.ikey[0], e.ikey[1], e.parent)
            n = self._children.get(pk, 0) - 1
            if n > 0:
                self._children[pk] = n
            else:
                self._children.pop(pk, None)
            p = self._index.get(pk)
            if p is not None and p.children > 0:
                p.children -= 1
                if p.children == 0 and reason == "evict":
                    self.pools[p.pool].policy.demote(p)  # the chain's new tail goes next
        if reason == "evict":
            self.evictions += 1
            self._count_eviction(e)
        elif reason == "expire":
            self.expirations += 1
        if self.observers:
            for o in self.observers:
                o.dropped(e, reason)

    def _unaccount(self, pool: _Pool, e: Entry) -> None:
        pool.used -= e.size
        pool.entries -= 1
        t = e.tenant
        left = pool.tenant_used.get(t, 0) - e.size
        if left > 0:
            pool.tenant_used[t] = left
        else:
            pool.tenant_used.pop(t, None)
        lru = pool.tenant_lru.get(t)
        if lru is not None:
            lru.pop(e, None)
            if not lru:
                del pool.tenant_lru[t]

    def _demote(self, e: Entry, now: float) -> None:
        """Evict the region copy of a value that lives on flash; it stays indexed (offset -1)."""
        self._unaccount(self.pools[e.pool], e)
        self._free_extent(e, now)
        e.offset = -1
        e.exposed = e.indexed = False
        self.evictions += 1
        self._count_eviction(e)

    def _free_extent(self, e: Entry, now: float) -> None:
        """Withdraw ``e`` from the client-readable index, then free its extent: at once if nobody could
        have located it, after the readers' grace if only the index showed it, else after the bound."""
        if self.readable is not None:
            self.readable.withdrawn(e)
        epoch = None
        immediate = not (e.exposed or e.indexed)
        if e.indexed and not e.exposed and self.readers is not None:
            ix = self.readable
            if ix is not None and not ix.shared and not ix.in_use(e.offset):
                immediate = True  # only the node's hot-read threads read the index, and none sends it
            else:
                epoch = self.readers.tag()
        self.allocator.free(e.offset, now, tag=e.pool, immediate=immediate, epoch=epoch)

    def _reclaim(self, now: float) -> None:
        """Give quarantined extents back: those past the bound, and those no announced read may copy."""
        alloc = self.allocator
        newest = alloc.newest_epoch
        alloc.reclaim(now, self.readers.safe_below(newest) if newest and self.readers is not None else 0)

    def _count_eviction(self, e: Entry) -> None:
        ev = self.pools[e.pool].tenant_evictions
        ev[e.tenant] = ev.get(e.tenant, 0) + 1

    # -- what the tier and the node's subsystems use (never the index itself) ----------------
    def lookup(self, ikey: tuple[str, str, bytes]) -> Entry | None:
        """The indexed entry under an index key ``(namespace, scope, key)``, as it is: no expiry
        check, no access counted (slot copies, compaction, recovery bookkeeping)."""
        return self._index.get(ikey)

    def current(self, entry: Entry) -> bool:
        """Whether ``entry`` is still the one indexed for its key (not replaced, dropped or expired away)."""
        return self._index.get(entry.ikey) is entry

    def drop(self, entry: Entry, reason: str = "delete") -> bool:
        """Remove ``entry`` if it is still current; ``reason`` as the tier sees it ("delete" writes a
        tombstone, "rollback" forgets a write whose record never became durable)."""
        if self._index.get(entry.ikey) is not entry:
            return False
        self._drop(entry, self._now(), reason)
        return True

    def erase_tenant(self, tenant: str) -> dict[str, int]:
        """Overwrite with zeros and drop every value ``tenant`` wrote (purge); counts of what went."""
        now = self._now()
        wview = self.region.view
        out = {"values": 0, "bytes": 0, "region_values": 0, "flash_values": 0}
        for e in [e for e in self._index.values() if e.tenant == tenant]:
            if self._index.get(e.ikey) is not e:
                continue
            if e.offset >= 0:
                wview[e.offset:e.offset + e.length] = bytes(e.length)
                out["region_values"] += 1
            if e.flash is not None:
                out["flash_values"] += 1
            out["bytes"] += e.length
            out["values"] += 1
            self._drop(e, now, "delete")
        # its tombstones name its keys: they go too (the tier's unversioned tombstones hide its records)
        scoped = {n for n, p in self.namespaces.items() if p.tenant_scoped}
        for ikey in [ik for ik in self._tombs if ik[0] in scoped and ik[1] == tenant]:
            del self._tombs[ikey]
        return out

    def set_tenant_quotas(self, quotas: dict[str, int]) -> None:
        """Per-tenant byte quotas (the node's tenant table changed)."""
        self.tenant_quotas = dict(quotas)

    def reserve_copy(self, e: Entry) -> Reservation:
        """Room in the region for the value of a tier-only entry (promotion: no tier admission)."""
        return self.reserve(e.key, e.length, namespace=e.namespace, tenant=e.tenant, checksum=e.checksum,
                            dram_only=True)

    def refill(self, res: Reservation, e: Entry) -> None:
        """Give a tier-only entry its region copy back (the tier filled ``res.view`` from ``reserve_copy``)."""
        res.done = True
        pool = res.pool
        e.offset = res.offset
        e.size = res.size
        pool.entries += 1
        pool.policy.insert(e)
        lru = pool.tenant_lru.get(e.tenant)
        if lru is None:
            lru = pool.tenant_lru[e.tenant] = OrderedDict()
        lru[e] = None
        try:
            res.view.release()
        except BufferError:
            pass
        if self.readable is not None:
            self.readable.published(e)

    def adopt_columns(self, names: list[tuple[str, str]], keys: list[bytes], names_idx: list[int],
                      parents: list[bytes | None], lengths: list[int], checksums: list[int],
                      generations: list[int], expires: Iterable[float | None], flashes: Iterable[object],
                      versions: list[int]) -> int:
        """Index values that live only on flash (recovery: ``offset`` -1, no region bytes), given as
        parallel columns (one ``Entry`` and one dict insert per value, everything else in bulk).

        ``names[names_idx[i]]`` is entry i's ``(namespace, tenant)``; ``expires`` are monotonic
        times or None. The keys must be new and distinct (the index of a starting node).
        """
        if not keys:
            return 0
        index = self._index
        children = self._children
        now = self._now()
        info: list[Any] = []
        for ns, tenant in names:  # a name no entry uses may be unknown (None)
            pol = self.namespaces.get(ns)
            info.append(None if pol is None else (ns, tenant, tenant if pol.tenant_scoped else "", pol.pool))
        before = len(index)
        expiring: list[Entry] = []
        if len(info) == 1:
            ns, tenant, scope, pool = info[0]
            for key, parent, length, checksum, generation, exp, flash, ver in zip(
                    keys, parents, lengths, checksums, generations, expires, flashes, versions, strict=True):
                ikey = (ns, scope, key)
                e = index[ikey] = Entry(key, ns, tenant, -1, length, checksum, generation, now, exp, None, parent,
                                        pool, ikey, 0, ver)
                e.flash = flash
                if exp is not None:
                    expiring.append(e)
        else:
            for key, ni, parent, length, checksum, generation, exp, flash, ver in zip(
                    keys, names_idx, parents, lengths, checksums, generations, expires, flashes, versions,
                    strict=True):
                ns, tenant, scope, pool = info[ni]
                ikey = (ns, scope, key)
                e = index[ikey] = Entry(key, ns, tenant, -1, length, checksum, generation, now, exp, None, parent,
                                        pool, ikey, 0, ver)
                e.flash = flash
                if exp is not None:
                    expiring.append(e)
        n = len(index) - before
        if n != len(keys):
            raise ValueError("adopt_columns: keys must be new and distinct")
        for e in expiring:
            heapq.heappush(self._expiry, (e.expires, next(self._seq), e))
        if generations:
            self.generation = max(self.generation, max(generations))
            self.versions.observe(max(versions))
        # accounting per (namespace, tenant)
        if len(info) == 1:
            sums = {0: [sum(lengths), n]}
        else:
            sums = {}
            for ni, length in zip(names_idx, lengths, strict=True):
                agg = sums.get(ni)
                if agg is None:
                    agg = sums[ni] = [0, 0]
                agg[0] += length
                agg[1] += 1
        for ni, (nbytes, count) in sums.items():
            ns, tenant = info[ni][0], info[ni][1]
            for st in (self._ns_stats[ns], self._tstats(tenant)):
                st[_BYTES] += nbytes
                st[_ENTRIES] += count
        # chain links among the adopted entries
        if any(p is not None for p in parents):
            linked: set[tuple[str, str, bytes]] = set()
            for ni, parent in zip(names_idx, parents, strict=True):
                if parent is not None:
                    pk = (info[ni][0], info[ni][2], parent)
                    children[pk] = children.get(pk, 0) + 1
                    linked.add(pk)
            for pk in linked:
                p = index.get(pk)
                if p is not None:
                    p.children = children[pk]
        return n

    def _evict_one(self, pool: _Pool, now: float, eligible: Callable[[Entry], bool]) -> int:
        """Evict one entry of ``pool``; bytes freed (0 if nothing is evictable)."""
        victim = pool.policy.pick_victim(now, eligible)
        if victim is None:
            return 0
        size = victim.size
        self._drop(victim, now, "evict")
        return size

    def _evict_tenant(self, pool: _Pool, tenant: str, now: float, eligible: Callable[[Entry], bool]) -> int:
        """Evict the least recently used evictable entry of ``tenant`` in ``pool``."""
        lru = pool.tenant_lru.get(tenant)
        if not lru:
            return 0
        for e in lru:
            if eligible(e):
                break
        else:
            return 0
        pool.policy.remove(e)
        pool.policy.evictions += 1
        size = e.size
        self._drop(e, now, "evict")
        return size

    # -- writes --------------------------------------------------------------------------
    def reserve(
        self,
        key: bytes,
        length: int,
        *,
        namespace: str,
        tenant: str = "",
        checksum: int,
        ttl: float | None = None,
        pin: bool = False,
        parent: bytes | None = None,
        version: int = 0,
        dram_only: bool = False,
        copy: bool = False,
    ) -> Reservation:
        """Make room for a value of ``length`` bytes and allocate it (see the module doc).

        ``dram_only``: the value stays in the region even in a durable namespace (the tier
        neither admits nor records it). ``copy``: a replica's state (slot copy, read repair,
        anti-entropy) with its version: in a write-once namespace it replaces an older value
        rather than raise ``KeyExists`` -- a newer version of a write-once key exists only if the key
        was deleted and written again where the copy comes from, and the replica that missed
        the delete must take it (or conflicting writes that raced would never converge)."""
        pol = self._ns(namespace)
        if length < 0:
            raise InvalidArgument(f"negative length {length}")
        if length > self.max_value:
            raise ValueTooLarge(f"value of {length} bytes is over the limit of {self.max_value}")
        pool = self.pools[pol.pool]
        if self.tier is not None and pol.durability == "durable" and not dram_only:
            self.tier.admit(key, length)  # DiskFull before any payload is received
        alloc = self.allocator
        size = alloc.round(length)
        if size > pool.budget:
            raise ValueTooLarge(f"{length} bytes do not fit pool {pool.name} ({pool.budget} bytes)")
        ikey = (namespace, tenant if pol.tenant_scoped else "", key)
        now = self._now()
        old = self._index.get(ikey)
        if old is not None:
            if old.expires is not None and old.expires <= now:
                self._drop(old, now, "expire")
            elif not pol.overwrite and not copy and (old.checksum != checksum or old.length != length):
                raise KeyExists(f"key {key!r} exists in namespace {namespace} with different bytes")
        quota = self._quota(pool, tenant)
        eligible = None
        if quota is not None:
            if size > quota:
                raise QuotaExceeded(f"value of {length} bytes is over tenant {tenant!r}'s quota of {quota}")
            if pool.tenant_used.get(tenant, 0) + size > quota:
                eligible = _evictable(now)
                while pool.tenant_used.get(tenant, 0) + size > quota:
                    if not self._evict_tenant(pool, tenant, now, eligible):
                        raise QuotaExceeded(
                            f"tenant {tenant!r} is over its quota of {quota} bytes in pool {pool.name}"
                        )
        # 1. the pool's live budget
        if pool.used + size > pool.budget:
            if eligible is None:
                eligible = _evictable(now)
            while pool.used + size > pool.budget:
                if not self._evict_one(pool, now, eligible):
                    pool.oom += 1
                    raise OutOfMemory(
                        f"pool {pool.name} is full ({pool.used}/{pool.budget} bytes) and nothing is evictable"
                    )
        # 2. the pool's share of quarantine room
        if alloc.quarantined_bytes:
            self._reclaim(now)
            if pool.used + alloc.quarantined_for(pool.name) + size > pool.capacity:
                pool.oom += 1
                raise OutOfMemory(
                    f"pool {pool.name}: {alloc.quarantined_for(pool.name)} freed bytes are in quarantine"
                    f" for up to {self.quarantine_s}s; retry shortly"
                )
        # 3. a contiguous extent
        off = alloc.alloc(length, now)
        if off is None:
            if eligible is None:
                eligible = _evictable(now)
            if self.quarantine_s <= 0:
                while off is None:
                    if not self._evict_one(pool, now, eligible):
                        break
                    off = alloc.alloc(length, now)
            else:
                # freed extents come back only after the quarantine: make the room now, fail this put
                freed = 0
                while freed < size:
                    n = self._evict_one(pool, now, eligible)
                    if not n:
                        break
                    freed += n
            if off is None:
                pool.oom += 1
                raise OutOfMemory(
                    f"no contiguous {size}-byte extent (free {alloc.free_bytes}, largest "
                    f"{alloc.largest_free}, quarantined {alloc.quarantined_bytes})"
                )
        pool.used += size
        pool.tenant_used[tenant] = pool.tenant_used.get(tenant, 0) + size
        if parent is not None and parent == key:
            parent = None
        return Reservation(
            key, namespace, tenant, ikey, off, length, size, checksum, ttl, pin, parent,
            self.region.view[off:off + length], pool, pol, version, dram_only, copy,
        )

    def _release(self, res: Reservation, *, immediate: bool) -> None:
        pool = res.pool
        pool.used -= res.size
        left = pool.tenant_used.get(res.tenant, 0) - res.size
        if left > 0:
            pool.tenant_used[res.tenant] = left
        else:
            pool.tenant_used.pop(res.tenant, None)
        self.allocator.free(res.offset, self._now(), tag=pool.name, immediate=immediate)
        try:
            res.view.release()
        except BufferError:
            pass

    def abort(self, res: Reservation) -> None:
        """Give the reservation's room back (e.g. the connection died mid-payload). Idempotent."""
        if res.done:
            return
        res.done = True
        # a writer might still be writing into the extent (shm/RDMA): quarantine it
        self._release(res, immediate=False)

    def commit(self, res: Reservation) -> Entry | None:
        """Verify the payload's checksum and index it; returns the live entry.

        Of two writes of one key the newer version stays, whatever order they arrive in: an
        older write arriving late (a slow replica send, a read repair or a slot copy racing a
        client write) is dropped and the current entry returned (``Store.superseded`` counts
        them). The same bytes again keep the entry, which takes the newer version. A write no
        newer than the key's tombstone is dropped too, and None returned: the delete stands."""
        if res.done:
            raise InvalidArgument("reservation already committed or aborted")
        res.done = True
        cs = _checksum(res.view)
        if cs != res.checksum:
            self.checksum_mismatches += 1
            self._release(res, immediate=True)
            raise ChecksumMismatch(
                f"checksum of {res.key!r} is {cs:#018x}, the writer sent {res.checksum:#018x}"
            )
        now = self._now()
        pol = res.policy
        version = res.version
        if version:
            self.versions.observe(version)
        else:
            version = self.versions.next()
        ttl = res.ttl if res.ttl is not None else pol.ttl
        expires = now + ttl if ttl is not None and ttl > 0 else None
        index = self._index
        ikey = res.ikey
        old = index.get(ikey)
        if old is not None and old.expires is not None and old.expires <= now:
            self._drop(old, now, "expire")
            old = None
        ns = self._ns_stats[res.namespace]
        ts = self._tstats(res.tenant)
        ns[_PUTS] += 1
        ts[_PUTS] += 1
        if (old is not None and old.checksum == cs and old.length == res.length
                and (not pol.overwrite or version <= old.version)):
            # idempotent re-put: keep the old value, refresh its TTL / pin. (In an overwritable
            # namespace, the same bytes with a newer version replace the entry like any write:
            # the flash record must carry the newer version, or a restart would bring back the
            # older one, which could then lose against a value written in between.)
            self._release(res, immediate=True)
            if expires is not None or old.expires is not None:
                old.expires = expires
                if expires is not None:
                    heapq.heappush(self._expiry, (expires, next(self._seq), old))
            if res.pin:
                old.pin_until = math.inf
            if version > old.version:
                old.version = version
            if self.readable is not None:
                self.readable.published(old)  # its version or TTL may have changed
            if self.tier is not None and pol.durability == "durable" and not res.dram_only:
                self.tier.committed(old)
            return old
        if old is None and self._tombs:
            tomb = self._tombs.get(ikey)
            if tomb is not None:
                if tomb[0] >= version:  # deleted by a newer (or the same) version: the delete stands
                    self._release(res, immediate=True)
                    self.superseded += 1
                    return None
                del self._tombs[ikey]  # the write is newer than the delete
        if old is not None and not pol.overwrite and not res.copy:
            self._release(res, immediate=True)
            raise KeyExists(f"key {res.key!r} exists in namespace {res.namespace} with different bytes")
        if old is not None and not newer(version, cs, old.version, old.checksum):
            self._release(res, immediate=True)
            self.superseded += 1
            return old
        self.generation += 1
        pool = res.pool
        e = Entry(
            res.key, res.namespace, res.tenant, res.offset, res.length, cs, self.generation, now,
            expires, math.inf if res.pin else None, res.parent, pool.name, ikey, res.size, version,
        )
        if old is not None:
            self._drop(old, now, "replace")
        index[ikey] = e
        pool.entries += 1
        pool.policy.insert(e)
        lru = pool.tenant_lru.get(res.tenant)
        if lru is None:
            lru = pool.tenant_lru[res.tenant] = OrderedDict()
        lru[e] = None
        n = self._children.get(ikey)
        if n:
            e.children = n
        if e.parent is not None:
            pk = (ikey[0], ikey[1], e.parent)
            self._children[pk] = self._children.get(pk, 0) + 1
            p = index.get(pk)
            if p is not None:
                p.children += 1
        if expires is not None:
            heapq.heappush(self._expiry, (expires, next(self._seq), e))
        ns[_BYTES] += res.length
        ns[_ENTRIES] += 1
        ts[_BYTES] += res.length
        ts[_ENTRIES] += 1
        try:
            res.view.release()
        except BufferError:
            pass
        if self.readable is not None:
            self.readable.published(e)
        if self.tier is not None and pol.durability == "durable" and not res.dram_only:
            self.tier.committed(e)  # queue the record; the reply waits for its group commit
        if self.observers:
            for o in self.observers:
                o.indexed(e)
        return e

    def put(self, key: bytes, value, *, namespace: str, tenant: str = "", ttl: float | None = None,
            pin: bool = False, parent: bytes | None = None, version: int = 0) -> Entry | None:
        """Convenience: reserve, copy ``value`` (any buffer) into the region, commit."""
        mv = memoryview(value).cast("B")
        res = self.reserve(key, mv.nbytes, namespace=namespace, tenant=tenant, checksum=_checksum(mv),
                           ttl=ttl, pin=pin, parent=parent, version=version)
        try:
            res.view[:] = mv
        except BaseException:
            self.abort(res)
            raise
        return self.commit(res)

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: bytes, *, namespace: str, tenant: str = "") -> Entry | None:
        """The live entry (hit) or None (miss); counts the access."""
        e = self._lookup(key, namespace, tenant, None)
        ns = self._ns_stats[namespace]
        ts = self._tenant_stats.get(tenant)
        if ts is None:
            ts = self._tstats(tenant)
        if e is None:
            ns[_MISSES] += 1
            ts[_MISSES] += 1
            return None
        ns[_HITS] += 1
        ts[_HITS] += 1
        self._accessed(e)
        return e

    def _accessed(self, e: Entry) -> None:
        e.hits += 1
        if e.offset >= 0:  # a flash-only entry is not in its pool's policy
            pool = self.pools[e.pool]
            pool.policy.access(e)
            lru = pool.tenant_lru.get(e.tenant)
            if lru is not None:
                lru.move_to_end(e)

    def touch(self, e: Entry) -> None:
        """A one-sided reader read this value without asking (its batched touches): count the hit and
        tell the eviction policy, as ``get`` does."""
        if self._index.get(e.ikey) is not e:
            return
        self._ns_stats[e.namespace][_HITS] += 1
        self._tstats(e.tenant)[_HITS] += 1
        self._accessed(e)

    def open_readable_index(self, *, shared: bool = True) -> ReadableIndex | None:
        """The client-readable index, publishing from now on (a one-sided reader asked; ``shared=False``:
        only the node's own hot-read threads, memkv/server/hot_reads.py); None without one."""
        ix = self.readable
        if ix is not None and (not ix.active or (shared and not ix.shared)):
            ix.activate((e for e in list(self._index.values()) if e.offset >= 0), shared=shared)
        return ix

    def exists(self, key: bytes, *, namespace: str, tenant: str = "") -> bool:
        return self._lookup(key, namespace, tenant, None) is not None

    def view(self, entry: Entry) -> memoryview:
        """Read-only view of the value's bytes in the region."""
        off = entry.offset
        if off < 0 and entry.flash is not None and self.tier is not None:
            self.tier.promote_sync(entry)  # blocking read from flash (the request path promotes async)
            off = entry.offset
        if off < 0:
            raise InvalidArgument(f"value of {entry.key!r} is not in the region")
        return self._ro[off:off + entry.length]

    def head(self, entry: Entry, n: int) -> bytes | None:
        """The first ``n`` bytes of a value without promoting it: from the region, or read from the
        tier when the value is only there (None when it cannot be read now). Not checksum-verified:
        the checksum covers the whole value."""
        n = min(n, entry.length)
        if entry.offset >= 0:
            return bytes(self._ro[entry.offset:entry.offset + n])
        if entry.flash is not None and self.tier is not None:
            return self.tier.read_head(entry, n)
        return None

    def expose(self, entry: Entry) -> None:
        """A descriptor of this value is handed to a one-sided reader (shared memory, RDMA).

        Only such values go through the quarantine when freed: a TCP reader gets
        its bytes through the node and verifies their checksum, so the region
        can reuse the extent at once.
        """
        entry.exposed = True

    def report_corrupt(self, entry: Entry) -> None:
        """A reader found a checksum mismatch: drop the entry and count it."""
        self.corrupt += 1
        self._drop(entry, self._now(), "corrupt")

    def verify(self, entry: Entry) -> bool:
        """Recompute the checksum of the value in the region."""
        return entry.offset >= 0 and _checksum(self.view(entry)) == entry.checksum

    # -- management ----------------------------------------------------------------------
    def delete(self, key: bytes, *, namespace: str, tenant: str = "", version: int = 0) -> bool:
        """Delete the key as of ``version`` (0: the store assigns one) and keep a tombstone; whether a
        value was removed. A value newer than the delete stays (``superseded_deletes``)."""
        now = self._now()
        e = self._lookup(key, namespace, tenant, now)
        if version:
            self.versions.observe(version)
        else:
            version = self.versions.next()
        if e is not None:
            if e.version > version:
                self.superseded_deletes += 1
                return False
            ikey = e.ikey
            self._drop(e, now, "tombstone")
        else:
            ikey = (namespace, tenant if self._ns(namespace).tenant_scoped else "", key)
        self._bury(ikey, version, now)
        return e is not None

    def _bury(self, ikey: tuple[str, str, bytes], version: int, now: float) -> None:
        """Keep (or move forward) the tombstone of ``ikey``; a durable namespace's goes to the tier."""
        tombs = self._tombs
        cur = tombs.get(ikey)
        if cur is not None:
            if cur[0] >= version:
                return
            del tombs[ikey]  # re-inserted last: the dict stays in purge order
        self.generation += 1
        until = now + self.tombstone_retention
        tombs[ikey] = (version, until, self.generation)
        tier = self.tier
        if tier is not None and self.namespaces[ikey[0]].durability == "durable":
            tier.buried(ikey, version, until)
        if len(tombs) > self.max_tombstones:
            tombs.popitem(last=False)
            self.tombstones_evicted += 1

    def tombstone(self, key: bytes, *, namespace: str, tenant: str = "") -> int:
        """The version of the key's tombstone (0: none) -- what a miss reply carries."""
        if not self._tombs:
            return 0
        t = self._tombs.get((namespace, tenant if self._ns(namespace).tenant_scoped else "", key))
        return 0 if t is None else t[0]

    def tombstone_of(self, ikey: tuple[str, str, bytes]) -> int:
        """The tombstone version under an index key (0: none)."""
        t = self._tombs.get(ikey)
        return 0 if t is None else t[0]

    def state_version(self, ikey: tuple[str, str, bytes]) -> int:
        """The version of what this node holds of ``ikey``: its live value's, else its tombstone's
        (0: neither). Replicas compare these (slot copies, anti-entropy): the higher one wins."""
        e = self._index.get(ikey)
        if e is not None and (e.expires is None or e.expires > self._now()):
            return e.version
        t = self._tombs.get(ikey)
        return 0 if t is None else t[0]

    def tombstones(self, after: int = 0) -> Iterator[tuple[tuple[str, str, bytes], int, float, int]]:
        """``(index key, version, purge time, generation)`` of the tombstones made after generation
        ``after`` (a snapshot taken when iteration starts)."""
        for ikey, (version, until, gen) in list(self._tombs.items()):
            if gen > after:
                yield ikey, version, until, gen

    def tombstones_in_slots(self, slots: Container[int], slot_of: Callable[[bytes], int], *,
                            after: int = 0) -> list[tuple[tuple[str, str, bytes], int]]:
        """``(index key, version)`` of the tombstones made after generation ``after`` whose key's slot
        is in ``slots`` (slot copies carry them)."""
        return [(ik, v) for ik, v, _u, _g in self.tombstones(after) if slot_of(ik[2]) in slots]

    def forget_tombstone(self, ikey: tuple[str, str, bytes]) -> bool:
        """Drop a tombstone without a trace (a slot this node no longer holds, after its hand-off)."""
        return self._tombs.pop(ikey, None) is not None

    def adopt_tombstones(self, rows: Iterable[tuple[tuple[str, str, bytes], int, float]]) -> int:
        """Tombstones recovered from flash: ``(index key, version, purge time on the store's monotonic
        clock)``; kept in purge order; an index key that holds a value is skipped (the value is newer)."""
        now = self._now()
        tombs = self._tombs
        n = 0
        for ikey, version, until in sorted(rows, key=lambda r: r[2]):
            if until <= now or version <= 0 or ikey in self._index:
                continue
            cur = tombs.get(ikey)
            if cur is not None and cur[0] >= version:
                continue
            self.generation += 1
            tombs[ikey] = (version, until, self.generation)
            self.versions.observe(version)
            n += 1
        while len(tombs) > self.max_tombstones:
            tombs.popitem(last=False)
            self.tombstones_evicted += 1
        return n

    def purge_tombstones(self, now: float | None = None) -> int:
        """Drop the tombstones whose retention has passed; how many."""
        if now is None:
            now = self._now()
        tombs = self._tombs
        n = 0
        while tombs:
            ikey, (_v, until, _g) = next(iter(tombs.items()))
            if until > now:
                break
            del tombs[ikey]
            n += 1
        self.tombstones_expired += n
        return n

    def pin(
        self, keys: Iterable[bytes], *, namespace: str, tenant: str = "", ttl: float | None = None
    ) -> int:
        """Pin existing keys (``ttl`` None = until unpinned); number pinned."""
        now = self._now()
        until = math.inf if ttl is None else now + ttl
        n = 0
        for k in keys:
            e = self._lookup(k, namespace, tenant, now)
            if e is None:
                continue
            if e.pin_until is None or e.pin_until < until:
                e.pin_until = until
            n += 1
        return n

    def unpin(self, keys: Iterable[bytes], *, namespace: str, tenant: str = "") -> int:
        now = self._now()
        n = 0
        for k in keys:
            e = self._lookup(k, namespace, tenant, now)
            if e is None:
                continue
            e.pin_until = None
            n += 1
        return n

    def lookup_prefix(self, keys: Iterable[bytes], *, namespace: str, tenant: str = "",
                      lease_s: float = 5.0) -> int:
        """Number of leading keys that exist; each of them is leased for ``lease_s`` seconds."""
        now = self._now()
        until = now + lease_s
        n = 0
        for k in keys:
            e = self._lookup(k, namespace, tenant, now)
            if e is None:
                break
            if e.lease_until < until:
                e.lease_until = until
            n += 1
        return n

    def expire(self, now: float | None = None) -> int:
        """Drop every entry whose TTL passed; number dropped."""
        if now is None:
            now = self._now()
        heap = self._expiry
        n = 0
        while heap and heap[0][0] <= now:
            _, _, e = heapq.heappop(heap)
            if e.expires is not None and e.expires <= now and self._index.get(e.ikey) is e:
                self._drop(e, now, "expire")
                n += 1
        if self.allocator.quarantined_bytes:
            self._reclaim(now)
        if self._tombs:
            self.purge_tombstones(now)
        return n

    def entries(self, namespace: str | None = None) -> Iterator[Entry]:
        """Indexed entries (a snapshot of the index taken when iteration starts)."""
        for e in list(self._index.values()):
            if namespace is None or e.namespace == namespace:
                yield e

    def entries_in_slots(self, slots: Container[int], slot_of: Callable[[bytes], int], *, after: int = 0,
                         batch: int = 5000) -> Iterator[list[Entry]]:
        """Indexed entries written after generation ``after`` whose key's slot (``slot_of(key)``, the
        cluster's hash) is in ``slots`` (slot copies and drops), from a snapshot taken when iteration
        starts, in lists: one per ``batch`` entries looked at, so that an async caller can let
        other tasks run between them."""
        snapshot = list(self._index.values())
        for i in range(0, len(snapshot), batch):
            yield [e for e in snapshot[i:i + batch] if e.generation > after and slot_of(e.key) in slots]

    # -- key-space helpers for the RESP front end (EXPIRE/TTL/SCAN/DBSIZE) ----------------
    def peek(self, key: bytes, *, namespace: str, tenant: str = "") -> Entry | None:
        """The live entry or None, without counting an access (no hit/miss, no policy update)."""
        return self._lookup(key, namespace, tenant, None)

    def set_expiry(self, key: bytes, ttl: float | None, *, namespace: str, tenant: str = "") -> bool:
        """Give an existing key a TTL in seconds (None: persist; <= 0: delete now). False if missing."""
        now = self._now()
        e = self._lookup(key, namespace, tenant, now)
        if e is None:
            return False
        if ttl is not None and ttl <= 0:
            self._drop(e, now, "expire")
            return True
        e.expires = None if ttl is None else now + ttl
        if e.expires is not None:
            heapq.heappush(self._expiry, (e.expires, next(self._seq), e))
        if self.readable is not None:
            self.readable.published(e)  # readers see the new expiry
        return True

    def ttl_left(self, key: bytes, *, namespace: str, tenant: str = "") -> float | None:
        """Seconds until the key expires; ``math.inf`` without TTL; None if it does not exist."""
        now = self._now()
        e = self._lookup(key, namespace, tenant, now)
        if e is None:
            return None
        return math.inf if e.expires is None else max(0.0, e.expires - now)

    def scan(self, *, namespace: str, tenant: str = "", after: int = 0, count: int = 10,
             match: Callable[[bytes], bool] | None = None) -> tuple[int, list[bytes]]:
        """Keys of ``namespace`` visible to ``tenant`` written after generation ``after``.

        Returns ``(cursor, keys)``; ``cursor`` 0 means the scan is complete. Index order
        is write order, so a key written during a scan is seen once or not at all.
        ``count`` bounds the entries examined (as Redis' SCAN COUNT), not the keys returned.
        """
        pol = self._ns(namespace)
        scope = tenant if pol.tenant_scoped else ""
        now = self._now()
        keys: list[bytes] = []
        examined = 0
        last = after
        for (ns, t, key), e in self._index.items():
            if e.generation <= after:
                continue
            if examined >= count:
                return last, keys
            examined += 1
            last = e.generation
            if ns != namespace or t != scope or (e.expires is not None and e.expires <= now):
                continue
            if match is None or match(key):
                keys.append(key)
        return 0, keys

    def count(self, *, namespace: str, tenant: str = "") -> int:
        """Live keys in ``namespace`` visible to ``tenant``."""
        pol = self._ns(namespace)
        if not pol.tenant_scoped:
            return self._ns_stats[namespace][_ENTRIES]
        return sum(1 for (ns, t, _k) in self._index if ns == namespace and t == tenant)

    def __len__(self) -> int:
        return len(self._index)

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """One tenant's figures and nothing of any other tenant's: its counters (hits, misses, puts,
        bytes, entries) and, per pool, its bytes and quota (what a non-admin tenant's STATS shows)."""
        own = dict(zip(_STAT_NAMES, self._tenant_stats.get(tenant, [0] * len(_STAT_NAMES)), strict=True))
        pools = {name: {"capacity": p.capacity, "policy": p.policy.name, "tenant_quota": self._quota(p, tenant),
                        "tenants": {tenant: p.tenant_used.get(tenant, 0)},
                        "evictions": p.tenant_evictions.get(tenant, 0)}
                 for name, p in self.pools.items()}
        return {"region": {"size": self.region.size}, "entries": own["entries"], "bytes": own["bytes"],
                "pools": pools, "tenants": {tenant: own}}

    def stats(self) -> dict:
        a = self.allocator
        if a.quarantined_bytes:
            self._reclaim(self._now())
        pools = {}
        for name, p in self.pools.items():
            pools[name] = {
                "capacity": p.capacity,
                "budget": p.budget,
                "used": p.used,
                "quarantined": a.quarantined_for(name),
                "entries": p.entries,
                "evictions": p.policy.evictions,
                "policy": p.policy.name,
                "tenant_quota": p.config.tenant_quota,
                "tenants": dict(p.tenant_used),
                "oom": p.oom,
            }
        return {
            "region": {
                "path": self.region.path,
                "size": self.memory,  # for values; the mapping is larger by the client-readable index
                "mapped": self.region.size,
                "used": a.used_bytes,
                "free": a.free_bytes,
                "quarantined": a.quarantined_bytes,
                "early_reclaimed": a.early_reclaimed,  # bytes reused before the bound: no read held them
                "largest_free": a.largest_free,
                "fragmentation": round(a.fragmentation(), 6),
                "waste": a.waste_bytes,
                "extents": a.extents,
                "free_extents": a.free_extents,
            },
            "entries": len(self._index),
            "bytes": sum(s[_BYTES] for s in self._ns_stats.values()),
            "generation": self.generation,
            "pools": pools,
            "namespaces": {n: dict(zip(_STAT_NAMES, s, strict=True)) for n, s in self._ns_stats.items()},
            "tenants": {t: dict(zip(_STAT_NAMES, s, strict=True)) for t, s in self._tenant_stats.items()},
            "corrupt": self.corrupt,
            "checksum_mismatches": self.checksum_mismatches,
            "superseded_writes": self.superseded,
            "tombstones": {"held": len(self._tombs), "retention_s": self.tombstone_retention,
                           "max": self.max_tombstones, "expired": self.tombstones_expired,
                           "evicted": self.tombstones_evicted, "superseded_deletes": self.superseded_deletes},
            "evictions": self.evictions,
            "expirations": self.expirations,
            "readable_index": self.readable.stats() if self.readable is not None else None,
            "readers": self.readers.stats() if self.readers is not None else None,
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.readable is not None:
            self.readable.stop()
        self._index.clear()
        if self.readers is not None:
            self.readers.close()
        try:
            self._ro.release()
        except BufferError:
            pass
        self.region.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
