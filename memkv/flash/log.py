"""The log writer: assigns record positions, writes batches, group-commits them.

``append`` (trio thread, synchronous, cheap) gives a record its place at the
end of the active segment and queues its buffers (the value as a memoryview
of the region: no copy). The flusher task (``run``) takes everything queued,
writes it with ``pwritev`` and ``fdatasync`` in a worker thread, then wakes
every waiter: one fsync covers all the records queued while the previous one
ran (group commit). ``wait(seq)`` returns once record ``seq`` is durable or
raises the error that made its batch fail (``DiskFull`` on ENOSPC).

What a crash can leave. Up to ``parallel`` batches are written at once, but a record is
acknowledged only after its own batch's fdatasync *and* every earlier batch settled, so the
records a crash can cut or leave unwritten (a zero hole where a later batch in flight was
written past them) are never acknowledged, and they lie in the last batches: nothing queued
after a batch settled is among them. ``append`` stamps each record with what the writer knew
to be durable at that moment (``record.stamp_head``: its own segment's durable bytes; a
stamp >= 2 also says every record before it in the segment settled, hence the whole previous
segment did). Recovery trusts a hole only where no stamp says it was durable. Segment ids
skip one when a run starts and after a failed batch, so that no stamp of this run speaks for
a segment that an earlier crash (or the failure) left with holes.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import trio

from memkv.engine.clock import SYSTEM, Clock
from memkv.errors import DiskFull, MemKVError, ServerError
from memkv.flash.manifest import drop_manifest, write_manifest
from memkv.flash.record import stamp_head
from memkv.flash.segment import Segment, fsync_dir, list_segments, pwritev_all

log = logging.getLogger("memkv.flash")


class Pending:
    __slots__ = ("seg", "offset", "bufs", "size", "seq", "done")

    def __init__(self, seg: Segment, offset: int, bufs: list, size: int, seq: int,
                 done: Callable[[bool], None] | None) -> None:
        self.seg = seg
        self.offset = offset
        self.bufs = bufs
        self.size = size
        self.seq = seq
        self.done = done  # called in the trio thread with ok=True/False once the batch settled


class FlashLog:
    def __init__(self, directory: str, *, segment_size: int, budget: int, parallel: int = 2,
                 clock: Clock = SYSTEM) -> None:
        self.dir = directory
        self.clock = clock
        self.parallel = max(1, int(parallel))  # batches in flight (write + fdatasync each)
        self.segment_size = int(segment_size)
        self.budget = int(budget)
        self.segments: dict[int, Segment] = {}
        for sid in list_segments(directory):
            self.segments[sid] = Segment(directory, sid, create=False)
        self.used = sum(s.size for s in self.segments.values())
        self.active: Segment | None = None
        # one id skipped after the segments of an earlier run: a stamp in this run's first segment
        # vouches for its predecessor id (see the module docstring), which must not be theirs
        self.next_id = max(self.segments) + 2 if self.segments else 1
        self.seq = 0  # last assigned
        self.durable_seq = 0
        self.batch: list[Pending] = []
        self.failures: list[tuple[int, int, MemKVError]] = []  # (first seq, last seq, error), recent
        self.failed_batches = 0
        self.enospc_at: float | None = None
        self.fsyncs = 0
        self.bytes_written = 0
        self.removals = 0  # segments removed (compaction: a tombstone may be needed no more)
        self._stats_lock = threading.Lock()  # two writer threads may update the counters
        self._manifest_lock = threading.Lock()  # writer threads and removals rewrite the manifest
        self._work = trio.Event()
        self._flushed = trio.Event()
        self.closed = False

    # -- appends (trio thread)
    def room(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget

    def _segment_for(self, size: int) -> Segment:
        a = self.active
        if a is None or (a.size and a.size + size > self.segment_size):
            if a is not None:
                a.sealed = True
            a = self.active = Segment(self.dir, self.next_id, create=True)
            self.segments[a.id] = a
            self.next_id += 1
        return a

    def append(self, bufs: list, size: int, lsn: int, done: Callable[[bool], None] | None = None) -> Pending:
        """Queue a record of ``size`` bytes (``bufs`` concatenated, the first its header and names);
        returns its pending write. The header is stamped with its segment's durable bytes now."""
        seg = self._segment_for(size)
        bufs = [stamp_head(bufs[0], seg.durable + 1), *bufs[1:]]
        p = Pending(seg, seg.size, bufs, size, self.seq + 1, done)
        self.seq += 1
        seg.size += size
        if lsn < seg.min_lsn:
            seg.min_lsn = lsn
        self.used += size
        self.batch.append(p)
        self._work.set()
        return p

    # -- durability
    async def wait(self, seq: int) -> None:
        while self.durable_seq < seq:
            await self._flushed.wait()
        self.check(seq)

    def check(self, seq: int) -> None:
        for lo, hi, exc in self.failures:
            if lo <= seq <= hi:
                raise type(exc)(exc.message)

    async def run(self) -> None:
        """The flusher task: up to ``parallel`` batches in flight, settled in order.

        A batch is taken as soon as a slot is free, so the next batch's ``pwritev`` +
        ``fdatasync`` overlaps the previous one's (the device sees a queue depth of 2,
        and puts that arrive during an fsync wait for less than a whole fsync more).
        A batch is reported durable only after its own fdatasync returned *and* every
        earlier batch has settled, so ``durable_seq`` only moves forward in order.
        """
        slots = trio.Semaphore(self.parallel)
        prev = trio.Event()
        prev.set()
        async with trio.open_nursery() as nursery:
            while True:
                await self._work.wait()
                await slots.acquire()
                self._work = trio.Event()
                batch, self.batch = self.batch, []
                if not batch:
                    slots.release()
                    continue
                done = trio.Event()
                nursery.start_soon(self._flush_batch, batch, prev, done, slots)
                prev = done

    async def _flush_batch(self, batch: list[Pending], prev: trio.Event, done: trio.Event,
                           slots: trio.Semaphore) -> None:
        with trio.CancelScope(shield=True):  # a batch that was written is always settled
            error: OSError | None = None
            try:
                await trio.to_thread.run_sync(self._write, batch, abandon_on_cancel=False)
            except OSError as exc:
                error = exc
            await prev.wait()
            try:
                if error is not None:
                    self._failed(batch, error)
                else:
                    self._succeeded(batch)
            finally:
                self.durable_seq = batch[-1].seq
                old, self._flushed = self._flushed, trio.Event()
                old.set()
                done.set()
                slots.release()

    def flush_sync(self) -> None:
        """Write and sync everything queued, in this thread (shutdown)."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        try:
            self._write(batch)
        except OSError as exc:
            self._failed(batch, exc)
        else:
            self._succeeded(batch)
        self.durable_seq = batch[-1].seq

    def _write(self, batch: list[Pending]) -> None:
        """Worker thread: write the batch (contiguous runs per segment in one pwritev), then fdatasync."""
        touched: list[Segment] = []
        i = 0
        while i < len(batch):
            seg = batch[i].seg
            start = batch[i].offset
            bufs: list[Any] = []
            end = start
            while i < len(batch) and batch[i].seg is seg and batch[i].offset == end:
                bufs.extend(batch[i].bufs)
                end += batch[i].size
                i += 1
            pwritev_all(seg.fd, bufs, start)
            with self._stats_lock:
                self.bytes_written += end - start
            if seg not in touched:
                touched.append(seg)
        for seg in touched:
            os.fdatasync(seg.fd)
            with self._stats_lock:
                self.fsyncs += 1
            if not seg.dir_synced:
                self.record_segments()  # lists the new segment (and fsyncs the directory)
                seg.dir_synced = True

    def _succeeded(self, batch: list[Pending]) -> None:
        for p in batch:
            end = p.offset + p.size
            if end > p.seg.durable:
                p.seg.durable = end
            p.bufs = []
            if p.done is not None:
                p.done(True)

    def _failed(self, batch: list[Pending], exc: OSError) -> None:
        self.failed_batches += 1
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            err: MemKVError = DiskFull(f"flash device is full: {exc}")
            self.enospc_at = self.clock.monotonic()
        else:
            err = ServerError(f"flash write failed: {exc}")
        log.error("flash: a batch of %d records failed to write: %s", len(batch), exc)
        self.failures.append((batch[0].seq, batch[-1].seq, err))
        del self.failures[:-64]
        # everything after the failure point in these segments is garbage; new records go to a fresh segment
        if self.active is not None and any(p.seg is self.active for p in batch):
            self.active.sealed = True
            self.active = None
            self.next_id += 1  # the next segment's stamps must not vouch for this one's failed bytes
        for p in batch:
            p.bufs = []
            if p.done is not None:
                p.done(False)

    # -- segments
    def record_segments(self, without: Segment | None = None) -> None:
        """Rewrite the segment manifest (memkv/flash/manifest.py): every segment, ``without`` taken
        out first, with its durable bytes. Under a lock, so that the last one written is newest."""
        with self._manifest_lock:
            if without is not None:
                self.segments.pop(without.id, None)
            write_manifest(self.dir, {sid: s.durable for sid, s in dict(self.segments).items()})

    def remove(self, seg: Segment) -> None:
        """Forget and delete a segment (its readers are gone); the manifest stops listing it first."""
        try:
            self.record_segments(without=seg)
        except OSError as exc:  # ENOSPC, typically: removing segments is how space comes back
            log.warning("flash: could not rewrite the segment manifest (%s); dropped until the next segment", exc)
            drop_manifest(self.dir)
        self.used -= seg.size
        self.removals += 1
        seg.unlink()
        fsync_dir(self.dir)
        self.enospc_at = None

    def close(self) -> None:
        if not self.closed:
            try:
                self.record_segments()  # the final durable bytes of each segment
            except OSError as exc:
                log.warning("flash: could not write the segment manifest at shutdown: %s", exc)
        self.closed = True
        for seg in self.segments.values():
            seg.close()

