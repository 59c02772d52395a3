"""Extent allocator over ``[0, size)`` with segregated free lists and a quarantine.

* Free extents live in power-of-two bins (by size in granules). ``alloc`` looks
  for a best fit among the first few extents of the request's own bin, then
  takes any extent of the smallest non-empty larger bin (which always fits, found
  in O(1) with a bitmap), and only as a last resort scans the whole own bin.
* Neighbouring free extents are coalesced (``start -> size`` and ``end -> start``
  dicts), so every operation is a handful of dict operations.
* ``free`` does not make an extent allocatable at once: it goes through a FIFO
  quarantine for ``quarantine_s`` seconds, so that a one-sided reader (shared
  memory, RDMA) holding an old descriptor never sees the bytes recycled quickly.
  An extent freed with an ``epoch`` (the grace epoch of the readers that
  announce their reads, memkv/engine/readers.py) waits in a second FIFO and
  comes back earlier, as soon as ``reclaim`` is told that no read of that epoch
  or older is still going (``below``), but never sooner than ``min_grace_s``.
  ``alloc`` never waits for the quarantine: it returns ``None`` and lets the
  caller evict or fail.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

from memkv.engine.clock import SYSTEM
from memkv.errors import InvalidArgument

_SCAN = 32  # extents of the own bin looked at for a best fit before going up a bin


class ExtentAllocator:
    def __init__(
        self,
        size: int,
        *,
        granularity: int = 256,
        quarantine_s: float = 2.0,
        min_grace_s: float = 0.001,
        clock: Callable[[], float] = SYSTEM.monotonic,
    ) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise InvalidArgument(f"granularity must be a power of two, got {granularity}")
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.size = (int(size) // granularity) * granularity  # usable bytes
        self.quarantine_s = float(quarantine_s)
        self.min_grace_s = float(min_grace_s)
        self._clock = clock
        self._fs: dict[int, int] = {}  # free start -> size
        self._fe: dict[int, int] = {}  # free end -> start
        # start -> size, by size class; OrderedDict because a plain dict that had its first
        # items deleted iterates over the holes, which makes "take the first one" O(n)
        self._bins: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(64)]
        self._bitmap = 0  # bit b set <=> bins[b] non-empty
        self._alloc: dict[int, int] = {}  # allocated start -> size
        self._waste: dict[int, int] = {}  # allocated start -> rounding waste (only when > 0)
        self._q: deque[tuple[float, int, int, Hashable]] = deque()  # (release_at, start, size, tag)
        # freed with a grace epoch: (release_at, start, size, tag, epoch, earliest), epochs non-decreasing
        self._eq: deque[tuple[float, int, int, Hashable, int, float]] = deque()
        self._q_tags: dict[Hashable, int] = {}
        self.used_bytes = 0
        self.free_bytes = 0
        self.quarantined_bytes = 0
        self.waste_bytes = 0
        self.allocs = 0
        self.failed_allocs = 0
        self.early_reclaimed = 0  # bytes of epoch-tagged extents reused before the full bound
        if self.size > 0:
            self._insert_free(0, self.size)

    # -- size classes -------------------------------------------------------------------
    def round(self, n: int) -> int:
        """Bytes actually taken by a value of ``n`` bytes (at least one granule)."""
        g = self.granularity
        return ((n + g - 1) // g) * g if n > 0 else g

    def _bin_add(self, start: int, size: int) -> None:
        b = (size >> self._shift).bit_length() - 1
        d = self._bins[b]
        if not d:
            self._bitmap |= 1 << b
        d[start] = size

    def _bin_del(self, start: int, size: int) -> None:
        b = (size >> self._shift).bit_length() - 1
        d = self._bins[b]
        del d[start]
        if not d:
            self._bitmap &= ~(1 << b)

    def _insert_free(self, start: int, size: int) -> None:
        """Add ``[start, start+size)`` to the free lists, merging with free neighbours."""
        self.free_bytes += size
        fs, fe = self._fs, self._fe
        end = start + size
        nsize = fs.pop(end, None)
        if nsize is not None:
            del fe[end + nsize]
            self._bin_del(end, nsize)
            size += nsize
            end += nsize
        pstart = fe.pop(start, None)
        if pstart is not None:
            psize = fs.pop(pstart)
            self._bin_del(pstart, psize)
            start = pstart
            size += psize
        fs[start] = size
        fe[end] = start
        self._bin_add(start, size)

    # -- public operations --------------------------------------------------------------
    def alloc(self, n: int, now: float | None = None) -> int | None:
        """Offset of a fresh extent of ``round(n)`` bytes, or ``None`` if no free extent fits."""
        g = self.granularity
        size = ((n + g - 1) // g) * g if n > 0 else g
        if self._q or self._eq:
            if now is None:
                now = self._clock()
            if (self._q and self._q[0][0] <= now) or (self._eq and self._eq[0][0] <= now):
                self.reclaim(now)
        units = size >> self._shift
        b = units.bit_length() - 1
        bins = self._bins
        best = -1
        bsize = 0
        d = bins[b]
        if d:
            k = 0
            for s, sz in d.items():
                if sz >= size and (best < 0 or sz < bsize):
                    best, bsize = s, sz
                    if sz == size:
                        break
                k += 1
                if k >= _SCAN:
                    break
        if best < 0:
            mask = self._bitmap >> (b + 1)
            if mask:
                hb = (mask & -mask).bit_length() + b
                for best, bsize in bins[hb].items():  # noqa: B007 - first one
                    break
            elif len(d) > _SCAN:
                for s, sz in d.items():
                    if sz >= size:
                        best, bsize = s, sz
                        break
        if best < 0:
            self.failed_allocs += 1
            return None
        # take [best, best+size) out of the free extent; the rest stays free
        shift = self._shift
        bb = (bsize >> shift).bit_length() - 1
        bd = bins[bb]
        del bd[best]
        fs = self._fs
        del fs[best]
        if bsize > size:
            rest = best + size
            rsize = bsize - size
            fs[rest] = rsize
            self._fe[rest + rsize] = rest
            rb = (rsize >> shift).bit_length() - 1
            if rb == bb:
                bd[rest] = rsize
            else:
                if not bd:
                    self._bitmap &= ~(1 << bb)
                rd = bins[rb]
                if not rd:
                    self._bitmap |= 1 << rb
                rd[rest] = rsize
        else:
            del self._fe[best + bsize]
            if not bd:
                self._bitmap &= ~(1 << bb)
        self.free_bytes -= size
        self._alloc[best] = size
        if size != n and n > 0:
            self._waste[best] = size - n
            self.waste_bytes += size - n
        self.used_bytes += size
        self.allocs += 1
        return best

    def free(
        self, offset: int, now: float | None = None, *, tag: Hashable = None, immediate: bool = False,
        epoch: int | None = None,
    ) -> int:
        """Release the extent at ``offset``; returns its size.

        It goes to the quarantine (allocatable again ``quarantine_s`` after ``now``)
        unless ``immediate`` (the bytes were never visible to a reader) or the
        quarantine is 0; with ``epoch``, earlier once ``reclaim`` is given a ``below``
        past it. ``tag`` lets the caller see whose bytes are quarantined.
        """
        size = self._alloc.pop(offset, None)
        if size is None:
            raise InvalidArgument(f"free of unallocated offset {offset}")
        w = self._waste.pop(offset, 0)
        if w:
            self.waste_bytes -= w
        self.used_bytes -= size
        if immediate or self.quarantine_s <= 0:
            self._insert_free(offset, size)
            return size
        if now is None:
            now = self._clock()
        if epoch is None:
            self._q.append((now + self.quarantine_s, offset, size, tag))
        else:
            self._eq.append((now + self.quarantine_s, offset, size, tag, epoch, now + self.min_grace_s))
        self.quarantined_bytes += size
        self._q_tags[tag] = self._q_tags.get(tag, 0) + size
        return size

    def reclaim(self, now: float | None = None, below: int = 0) -> int:
        """Move every extent whose quarantine expired back to the free lists, and every one freed with an
        epoch under ``below`` at least ``min_grace_s`` ago; bytes moved."""
        if now is None:
            now = self._clock()
        moved = 0
        q = self._q
        while q and q[0][0] <= now:
            _, off, size, tag = q.popleft()
            moved += self._unquarantine(off, size, tag)
        eq = self._eq
        early = 0
        while eq:
            release_at, off, size, tag, epoch, earliest = eq[0]
            if release_at > now:
                if epoch >= below or earliest > now:
                    break
                early += size
            eq.popleft()
            moved += self._unquarantine(off, size, tag)
        self.early_reclaimed += early
        return moved

    def _unquarantine(self, off: int, size: int, tag: Hashable) -> int:
        tags = self._q_tags
        left = tags[tag] - size
        if left:
            tags[tag] = left
        else:
            del tags[tag]
        self.quarantined_bytes -= size
        self._insert_free(off, size)
        return size

    @property
    def newest_epoch(self) -> int:
        """The epoch of the latest extent freed with one still in quarantine (0: none)."""
        return self._eq[-1][4] if self._eq else 0

    def quarantined_for(self, tag: Hashable) -> int:
        """Bytes freed with ``tag`` that are still in quarantine."""
        return self._q_tags.get(tag, 0)

    def size_of(self, offset: int) -> int:
        return self._alloc[offset]

    def is_allocated(self, offset: int) -> bool:
        return offset in self._alloc

    # -- measurements -------------------------------------------------------------------
    @property
    def largest_free(self) -> int:
        if not self._bitmap:
            return 0
        top = self._bitmap.bit_length() - 1
        return max(self._bins[top].values())

    @property
    def extents(self) -> int:
        """Number of allocated extents."""
        return len(self._alloc)

    @property
    def free_extents(self) -> int:
        return len(self._fs)

    def fragmentation(self) -> float:
        """``1 - largest_free / free_bytes`` (0 when nothing is free)."""
        if self.free_bytes <= 0:
            return 0.0
        return 1.0 - self.largest_free / self.free_bytes

    def free_extents_list(self) -> list[tuple[int, int]]:
        """Sorted ``(start, size)`` of the free extents (for tests and debugging; O(n log n))."""
        return sorted(self._fs.items())

    def allocated_list(self) -> list[tuple[int, int]]:
        return sorted(self._alloc.items())

    def quarantined_list(self) -> list[tuple[int, int]]:
        return sorted([(e[1], e[2]) for e in self._q] + [(e[1], e[2]) for e in self._eq])

    def stats(self) -> dict:
        return {
            "size": self.size,
            "granularity": self.granularity,
            "used": self.used_bytes,
            "free": self.free_bytes,
            "quarantined": self.quarantined_bytes,
            "early_reclaimed": self.early_reclaimed,
            "largest_free": self.largest_free,
            "fragmentation": round(self.fragmentation(), 6),
            "waste": self.waste_bytes,
            "extents": len(self._alloc),
            "free_extents": len(self._fs),
            "failed_allocs": self.failed_allocs,
        }
