"""The flash tier of a node: durable namespaces on append-only segment files.

It is the store's tier (``memkv.engine.tier.Tier``; ``Store.attach_tier``):

* ``Store.reserve`` asks ``admit`` whether the disk budget has room
  (``DiskFull`` otherwise, before any payload is received);
* ``Store.commit`` calls ``committed``: the record (header + the value as a
  view of the region) is queued on the log; the entry's ``flash`` slot gets
  ``(segment, value offset, record size, lsn, write seq)``; ``touched`` tells
  the connection which write seq its reply must wait for (group commit);
* ``Store._drop`` calls ``dropped`` (an unversioned tombstone record for a
  value freed for good; dead bytes for the compactor), ``Store.delete`` calls
  ``buried`` (a versioned tombstone: version and purge time), and eviction of an entry with a flash copy only frees its
  region extent (``offset = -1``);
* a read of a flash-only entry is promoted first (``promote_for_read``, the
  node's promotion stage: memkv/server/stages.py): read back into a region
  extent in a worker thread and its checksum verified (a mismatch is a miss,
  logged and counted).

While a record is being written its entry is leased (not evictable) and marked
exposed (a delete quarantines the extent instead of reusing it at once), so
the bytes the writer thread reads stay put. Time (expiry stamps, the retry
after ENOSPC, the snapshot and compaction schedules) comes from the store's
injected clock.
"""

from __future__ import annotations

import fcntl
import gc
import heapq
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

import trio

from memkv.engine.checksum import checksum as _checksum
from memkv.errors import CorruptValue, DiskFull, InvalidArgument, MemKVError, OutOfMemory
from memkv.flash import record as r
from memkv.flash.compaction import compact_loop
from memkv.flash.log import FlashLog
from memkv.flash.recovery import recover
from memkv.flash.scrub import scrub_segments
from memkv.flash.segment import preadv_all
from memkv.flash.snapshot import write_snapshot

if TYPE_CHECKING:
    from memkv.engine.entry import Entry
    from memkv.engine.store import Store

log = logging.getLogger("memkv.flash")

# drop reasons after which a value must not come back at a restart (``Store.drop``): a purge, a slot
# this node freed after handing it off; "tombstone" (a versioned delete) writes its record in ``buried``
FREED = ("delete", "free")
NAME_SLACK = r.HEADER_SIZE + 3 * 128  # header + namespace/tenant/parent upper bound, for admission
READ_LEASE_S = 2.0  # a value promoted for a reply is not evicted before the reply is sent
SNAPSHOT_CHECK_S = 0.25  # how often the snapshot loop looks at the records written since the last one


class FlashTier:
    def __init__(self, store: Store, data_dir: str, *, disk: int, segment_size: int = 64 << 20,
                 compaction_rate: int = 64 << 20, compaction_threshold: float = 0.5,
                 compaction_interval: float = 0.5, snapshot_every: int = 200_000) -> None:
        self.store = store
        self.clock = store.clock
        self.dir = os.path.join(data_dir, "flash")
        os.makedirs(self.dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.dir, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise InvalidArgument(f"data dir {data_dir} is in use by another memkv node") from None
        self.compaction_rate = int(compaction_rate)
        self.compaction_threshold = float(compaction_threshold)
        self.compaction_interval = float(compaction_interval)
        self.snapshot_every = int(snapshot_every)
        self.log = FlashLog(self.dir, segment_size=segment_size, budget=disk, clock=self.clock)
        self.durable_ns = {n for n, p in store.namespaces.items() if p.durability == "durable"}
        self.lsn = 0
        self.touched = 0  # highest write seq the current request must wait for
        self.corrupt = 0
        self.promotions = 0
        self.disk_full = 0
        self.compactions = 0
        self.compaction_copied = 0
        self.reclaimed = 0
        self.snapshots = 0
        self.snapshot_lsn = 0
        # the lsn of the snapshot on disk (0: none usable): recovery replays only the log after it, so
        # compaction keeps the tombstones newer than it (the snapshot may index a put they hide)
        self.snapshot_on_disk = 0
        self._inflight: dict[Entry, trio.Event] = {}
        self.recovered_tombstones = 0
        self._purges: list[float] = []  # purge wall times of the kept tombstones
        self.tombstones_expired = 0  # kept tombstones past their purge time (compaction may drop them)
        t0 = time.perf_counter()  # a measurement (stats), not a schedule
        gc_was_on = gc.isenabled()
        gc.disable()  # millions of new objects, no cycles: the collector would only rescan them
        try:
            self.recovered = recover(self.dir, self.log.segments, self.scope, now_wall=self.clock.wall())
            self.lsn = self.snapshot_lsn = self.recovered.max_lsn
            self.snapshot_on_disk = self.recovered.snapshot_lsn
            self.recovered_entries = self.recovered.entries
            self._adopt_all()
        finally:
            if gc_was_on:
                gc.enable()
            gc.freeze()  # the recovered index is long-lived: keep it out of future collections
        self.recovery_s = time.perf_counter() - t0
        self.corrupt += len(self.recovered.damaged)
        store.attach_tier(self)
        log.info("flash: %d durable values recovered in %.2fs (%d from the snapshot, %d log records replayed, "
                 "%d damaged, %d torn)", self.recovered_entries, self.recovery_s,
                 self.recovered.snapshot_entries, self.recovered.replayed, len(self.recovered.damaged),
                 self.recovered.torn_tail)

    # -- helpers
    def scope(self, namespace: str, tenant: str) -> str | None:
        pol = self.store.namespaces.get(namespace)
        if pol is None or pol.durability != "durable":
            return None
        return tenant if pol.tenant_scoped else ""

    def _adopt_all(self) -> None:
        store = self.store
        rec = self.recovered
        cols = rec.cols
        gen = rec.max_gen
        if gen > store.generation:
            store.generation = gen
        exps = cols["expires"]
        if any(exps):
            mono_off = self.clock.monotonic() - self.clock.wall()
            exps = [x + mono_off if x else None for x in exps]
        else:
            exps = repeat(None, len(cols["keys"]))
        store.adopt_columns(rec.names, cols["keys"], cols["names_idx"], cols["parents"], cols["lengths"],
                            cols["checksums"], cols["generations"], exps,
                            zip(cols["sids"], cols["voffs"], cols["rsizes"], cols["lsns"], repeat(0)),
                            cols["versions"])
        rec.cols = {}
        if rec.tombs:
            mono_off = self.clock.monotonic() - self.clock.wall()
            self.recovered_tombstones = store.adopt_tombstones(
                ((ns, scope, key), ver, exp + mono_off) for ns, scope, key, ver, exp, _sid, _size in rec.tombs)
            for _ns, _scope, _key, _ver, exp, _sid, _size in rec.tombs:
                self.tombstone_kept(exp)
            rec.tombs = []

    # -- hooks called by the Store
    def admit(self, key: bytes, length: int) -> None:
        flog = self.log
        if flog.enospc_at is not None:
            if self.clock.monotonic() - flog.enospc_at < 1.0:
                self.disk_full += 1
                raise DiskFull("flash device is full (ENOSPC); delete data so that compaction can free space")
            flog.enospc_at = None  # try again
        if not flog.room(NAME_SLACK + len(key) + length):
            self.disk_full += 1
            raise DiskFull(f"flash budget is full ({flog.used}/{flog.budget} bytes); delete data or raise --disk")

    def committed(self, e: Entry) -> None:
        loc = e.flash
        if loc is not None:  # idempotent re-put of a value already in the log
            if loc[4] > self.log.durable_seq and loc[4] > self.touched:
                self.touched = loc[4]
            return
        store = self.store
        self.lsn += 1
        lsn = self.lsn
        exp = 0.0 if e.expires is None else e.expires - self.clock.monotonic() + self.clock.wall()
        head = r.encode_head(r.PUT, e.namespace, e.tenant, e.key, e.parent, e.length, e.checksum, lsn,
                             e.generation, exp, e.version)
        size = len(head) + e.length
        view = store.view(e)
        p = self.log.append([head, view], size, lsn)
        saved_lease, saved_exposed = e.lease_until, e.exposed
        e.lease_until = math.inf  # not evictable while the writer reads its extent
        e.exposed = True  # freed through the quarantine if deleted meanwhile
        loc = e.flash = (p.seg.id, p.offset + len(head), size, lsn, p.seq)
        p.seg.live += size

        def done(ok: bool) -> None:
            if e.lease_until == math.inf:
                e.lease_until = saved_lease
            if not saved_exposed:
                e.exposed = False
            if not ok and e.flash is loc:
                store.drop(e, "rollback")  # never acknowledged: forget it

        p.done = done
        if p.seq > self.touched:
            self.touched = p.seq

    def dropped(self, e: Entry, reason: str) -> None:
        loc = e.flash
        seg = self.log.segments.get(loc[0])
        if seg is not None:
            seg.live -= loc[2]
        if reason in FREED:  # gone for good without a versioned delete: an unversioned tombstone record
            self._tombstone_record(e.namespace, e.tenant, e.key, 0, None)

    def buried(self, ikey: tuple[str, str, bytes], version: int, until: float) -> None:
        """A versioned delete's tombstone: its record carries the version and, in ``expires``, the wall
        time until which it is kept (recovery adopts it until then)."""
        self._tombstone_record(ikey[0], ikey[1], ikey[2], version,
                               until - self.clock.monotonic() + self.clock.wall())

    def _tombstone_record(self, namespace: str, tenant: str, key: bytes, version: int,
                          purge_wall: float | None) -> None:
        self.lsn += 1
        head = r.encode_head(r.DELETE, namespace, tenant, key, None, 0, 0, self.lsn, 0, purge_wall, version)
        p = self.log.append([head], len(head), self.lsn)
        p.seg.tombstones += 1
        if version and purge_wall:
            self.tombstone_kept(purge_wall)
        if p.seq > self.touched:
            self.touched = p.seq

    def tombstone_kept(self, purge_wall: float) -> None:
        """A kept tombstone (a versioned delete within its retention) was written or recovered: when its
        purge time passes, compaction looks again at what it must copy (``expire_tombstones``)."""
        heapq.heappush(self._purges, purge_wall)

    def expire_tombstones(self) -> None:
        """Count the kept tombstones past their purge time (compaction's estimates are stale then)."""
        heap = self._purges
        now = self.clock.wall()
        while heap and heap[0] <= now:
            heapq.heappop(heap)
            self.tombstones_expired += 1

    # -- reads
    async def promote(self, e: Entry) -> None:
        """Bring a flash-only entry back into the region (no-op if it is there or gone)."""
        store = self.store
        while e.offset < 0 and e.flash is not None and store.current(e):
            ev = self._inflight.get(e)
            if ev is not None:
                await ev.wait()
                continue
            ev = self._inflight[e] = trio.Event()
            try:
                await self._load(e)
            finally:
                del self._inflight[e]
                ev.set()
            return

    async def _load(self, e: Entry) -> None:
        store = self.store
        loc = e.flash
        if loc[4] > self.log.durable_seq:
            try:
                await self.log.wait(loc[4])
            except MemKVError:
                return
            loc = e.flash
            if loc is None or e.offset >= 0 or not store.current(e):
                return
        seg = self.log.segments.get(loc[0])
        if seg is None:
            self.report_flash_corrupt(e, f"segment {loc[0]} is missing")
            return
        res = self._reserve(e)
        seg.readers += 1
        try:
            n = await trio.to_thread.run_sync(preadv_all, seg.fd, res.view, loc[1])
        except OSError as exc:
            log.warning("flash: read of %r failed: %s", e.key, exc)
            n = -1
        finally:
            seg.readers -= 1
        self._finish_load(e, res, n, loc)

    def _reserve(self, e: Entry):
        return self.store.reserve_copy(e)

    def _finish_load(self, e: Entry, res: Any, n: int, loc: tuple) -> bool:
        store = self.store
        if not store.current(e) or e.offset >= 0:
            store.abort(res)
            return e.offset >= 0
        if n != e.length or _checksum(res.view) != e.checksum:
            store.abort(res)
            if n >= 0:
                self.report_flash_corrupt(e, f"checksum mismatch in segment {loc[0]} at {loc[1]}")
            return False
        store.refill(res, e)
        self.promotions += 1
        return True

    def promote_sync(self, e: Entry) -> None:
        """Blocking promote for callers outside the async request path (``Store.view``)."""
        loc = e.flash
        if loc[4] > self.log.durable_seq:
            raise InvalidArgument("value is being written to flash; retry")
        seg = self.log.segments.get(loc[0])
        if seg is None:
            self.report_flash_corrupt(e, f"segment {loc[0]} is missing")
            raise CorruptValue(f"value of {e.key!r} is damaged on flash")
        res = self._reserve(e)
        try:
            n = preadv_all(seg.fd, res.view, loc[1])
        except OSError:
            n = -1
        if not self._finish_load(e, res, n, loc):
            raise CorruptValue(f"value of {e.key!r} is damaged on flash")

    def read_head(self, e: Entry, n: int) -> bytes | None:
        """The first ``n`` bytes of a flash-only value (one blocking pread, no promotion); None when
        its record is not on disk yet or cannot be read."""
        loc = e.flash
        if loc is None or loc[4] > self.log.durable_seq:
            return None
        seg = self.log.segments.get(loc[0])
        if seg is None:
            return None
        buf = bytearray(n)
        seg.readers += 1
        try:
            got = preadv_all(seg.fd, memoryview(buf), loc[1])
        except OSError:
            return None
        finally:
            seg.readers -= 1
        return bytes(buf) if got == n else None

    def report_flash_corrupt(self, e: Entry, why: str) -> None:
        self.corrupt += 1
        log.error("flash: value %s/%r is damaged (%s); dropped, served as a miss", e.namespace, e.key, why)
        self.store.report_corrupt(e)

    # -- purge
    async def settle(self) -> None:
        """Wait until every record queued so far is on disk (or its batch failed)."""
        try:
            await self.log.wait(self.log.seq)
        except MemKVError as exc:
            log.warning("flash: a log write failed while settling: %s", exc)

    async def scrub_tenant(self, tenant: str) -> tuple[int, int]:
        """Zero every record of ``tenant`` in the segment files (after its entries were dropped);
        (records, bytes). Twice: a compaction running meanwhile may have copied a record before
        it was dropped."""
        await self.settle()
        records, nbytes = await trio.to_thread.run_sync(scrub_segments, self.dir, tenant)
        await self.settle()
        r2, b2 = await trio.to_thread.run_sync(scrub_segments, self.dir, tenant)
        return records + r2, nbytes + b2

    # -- snapshots
    def _capture(self) -> tuple[tuple[int, int, dict[int, list[int]], list[tuple], list[tuple]], int]:
        flog = self.log
        segs = {sid: [s.size, s.min_lsn] for sid, s in flog.segments.items()}
        wall = self.clock.wall() - self.clock.monotonic()
        rows = [
            (e.namespace, e.tenant, e.key, e.parent, e.length, e.checksum, e.generation,
             0.0 if e.expires is None else e.expires + wall, loc[0], loc[1], loc[2], loc[3], e.version)
            for e in self.store.entries() if (loc := e.flash) is not None
        ]
        durable = self.durable_ns
        tombs = [(ik[0], ik[1], ik[2], ver, until + wall)
                 for ik, ver, until, _gen in self.store.tombstones() if ik[0] in durable]
        return (self.lsn, self.store.generation, segs, rows, tombs), flog.seq

    async def snapshot(self) -> None:
        lsn = self.lsn
        data, seq = self._capture()
        await self.log.wait(seq)  # the snapshot may only point at durable records
        await trio.to_thread.run_sync(write_snapshot, self.dir, *data)
        self.snapshots += 1
        self.snapshot_lsn = self.snapshot_on_disk = lsn

    async def _snapshot_loop(self) -> None:
        while True:
            await self.clock.sleep(SNAPSHOT_CHECK_S)
            if self.lsn - self.snapshot_lsn >= self.snapshot_every:
                try:
                    await self.snapshot()
                except (MemKVError, OSError) as exc:
                    log.warning("flash: snapshot failed: %s", exc)

    # -- life cycle
    def close(self) -> None:
        """Shutdown: write what is queued, snapshot the index (fast restart), close files."""
        if self.log.closed:
            return
        try:
            self.log.flush_sync()
            data, _ = self._capture()
            write_snapshot(self.dir, *data)
        except OSError as exc:
            log.warning("flash: shutdown snapshot failed: %s", exc)
        finally:
            self.log.close()
            os.close(self._lock_fd)

    def background(self) -> list[Callable[[], Any]]:
        return [self.log.run, lambda: compact_loop(self), self._snapshot_loop]

    def stats(self) -> dict[str, Any]:
        flog = self.log
        return {
            "dir": self.dir,
            "budget": flog.budget,
            "used": flog.used,
            "live": sum(s.live for s in flog.segments.values()),
            "segments": len(flog.segments),
            "fsyncs": flog.fsyncs,
            "bytes_written": flog.bytes_written,
            "records": self.lsn,
            "pending": len(flog.batch),
            "failed_batches": flog.failed_batches,
            "corrupt": self.corrupt,
            "promotions": self.promotions,
            "disk_full": self.disk_full,
            "compactions": self.compactions,
            "compaction_copied": self.compaction_copied,
            "reclaimed": self.reclaimed,
            "snapshots": self.snapshots,
            "recovery_s": round(self.recovery_s, 4),
            "recovered": {"entries": self.recovered_entries, "tombstones": self.recovered_tombstones,
                          "snapshot_entries": self.recovered.snapshot_entries,
                          "replayed": self.recovered.replayed, "damaged": len(self.recovered.damaged),
                          "torn": self.recovered.torn_tail},
        }

    # -- request path: the promotion stage (memkv/server/stages.py)
    def cold(self, entries: Sequence[Entry | None]) -> bool:
        """Whether any of these entries is only on flash (a read must promote it first)."""
        return any(e is not None and e.offset < 0 and e.flash is not None for e in entries)

    async def promote_for_read(self, entries: Sequence[Entry | None]) -> dict[int, memoryview]:
        """Bring the flash-only ``entries`` of one read into the region; returns the values read
        into private buffers instead (by position) when the pool has no room (everything pinned).

        Values promoted for a read are leased for ``READ_LEASE_S`` so that promoting the next
        key of the same GET_MANY cannot evict them before the reply is sent.
        """
        private: dict[int, memoryview] = {}
        for i, e in enumerate(entries):
            if e is None:
                continue
            if e.offset < 0:
                try:
                    await self.promote(e)
                except OutOfMemory:
                    buf = await self._read_private(e)
                    if buf is not None:
                        private[i] = memoryview(buf)
            if e.offset >= 0:
                until = self.clock.monotonic() + READ_LEASE_S
                if e.lease_until < until:
                    e.lease_until = until
        return private

    async def _read_private(self, e: Entry) -> bytearray | None:
        loc = e.flash
        seg = self.log.segments.get(loc[0]) if loc is not None else None
        if seg is None or loc[4] > self.log.durable_seq:
            return None
        buf = bytearray(e.length)
        seg.readers += 1
        try:
            n = await trio.to_thread.run_sync(preadv_all, seg.fd, memoryview(buf), loc[1])
        finally:
            seg.readers -= 1
        if n != e.length or _checksum(buf) != e.checksum:
            if self.store.current(e):
                self.report_flash_corrupt(e, f"checksum mismatch in segment {loc[0]} at {loc[1]}")
            return None
        return buf


def open_tier(cfg: Any, store: Store) -> FlashTier | None:
    """The flash tier of a node whose config has durable namespaces (recovering what its data dir
    holds), or None."""
    durable = sorted(n for n, p in cfg.namespaces.items() if p.durability == "durable")
    if not durable:
        return None
    if not cfg.data_dir:
        raise InvalidArgument(f"namespace(s) {', '.join(durable)} are durable but the node has no --data-dir "
                              "(set --data-dir or [node] data_dir)")
    return FlashTier(store, cfg.data_dir, disk=cfg.disk, segment_size=cfg.segment_size,
                     compaction_rate=cfg.compaction_rate, compaction_threshold=cfg.compaction_threshold,
                     snapshot_every=cfg.snapshot_every)
