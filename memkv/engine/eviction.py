"""Eviction policies of a pool: LRU and S3-FIFO, behind one interface.

``insert(entry)``, ``access(entry)``, ``remove(entry)``, ``demote(entry)`` and
``pick_victim(now, eligible) -> Entry | None``. ``pick_victim`` detaches the
entry it returns (the caller is about to drop it) and counts it in
``evictions``; entries for which ``eligible`` is false are skipped (rotated),
never returned. ``demote`` is called when an entry becomes evictable again
because its last chain child was evicted: if it has not been used since it was
skipped, it goes back to the eviction end, so a cold chain is evicted from its
tail, block after block. One call looks at each queued entry at most once (S3-FIFO: one
pass over the small queue plus one over the main queue), so it terminates even
when nothing is eligible.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from memkv.engine.entry import Entry

Eligible = Callable[[Entry], bool]


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._q: OrderedDict[Entry, None] = OrderedDict()  # oldest first
        self._skipped: set[Entry] = set()  # rotated because ineligible, not used since
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._q)

    def insert(self, entry: Entry) -> None:
        self._q[entry] = None

    def access(self, entry: Entry) -> None:
        try:
            self._q.move_to_end(entry)
        except KeyError:
            return
        if self._skipped:
            self._skipped.discard(entry)

    def remove(self, entry: Entry) -> None:
        self._q.pop(entry, None)
        if self._skipped:
            self._skipped.discard(entry)

    def demote(self, entry: Entry) -> None:
        if entry in self._skipped:
            self._skipped.discard(entry)
            self._q.move_to_end(entry, last=False)

    def pick_victim(self, now: float, eligible: Eligible) -> Entry | None:
        q = self._q
        for _ in range(len(q)):
            e = next(iter(q))
            if eligible(e):
                del q[e]
                if self._skipped:
                    self._skipped.discard(e)
                self.evictions += 1
                return e
            q.move_to_end(e)  # rotate the ineligible one out of the way
            self._skipped.add(e)
        return None

    def stats(self) -> dict:
        return {"policy": self.name, "entries": len(self._q), "evictions": self.evictions}


class S3FIFOPolicy:
    """S3-FIFO (Yang et al., SOSP'23): small FIFO, main FIFO with 2-bit frequency, ghost FIFO.

    New entries go to the small queue (about ``small_ratio`` of the bytes); an
    entry leaving the small queue moves to main if it was accessed there, else it
    is evicted and its key remembered in the ghost queue. A key found in the ghost
    queue on insert goes straight to main. Main is a FIFO with reinsertion: an
    entry with frequency > 0 is reinserted with frequency - 1.
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1) -> None:
        self.small_ratio = small_ratio
        self._s: OrderedDict[Entry, int] = OrderedDict()  # entry -> freq (0..3)
        self._m: OrderedDict[Entry, int] = OrderedDict()
        self._g: OrderedDict[Hashable, None] = OrderedDict()  # ikeys of recently evicted entries
        self.small_bytes = 0
        self.main_bytes = 0
        self.evictions = 0
        self.ghost_hits = 0
        self._peak = 0  # most entries ever queued: the ghost queue remembers that many keys

    def __len__(self) -> int:
        return len(self._s) + len(self._m)

    def insert(self, entry: Entry) -> None:
        g = self._g
        if g and entry.ikey in g:
            del g[entry.ikey]
            self.ghost_hits += 1
            self._m[entry] = 0
            self.main_bytes += entry.size
        else:
            self._s[entry] = 0
            self.small_bytes += entry.size
        n = len(self._s) + len(self._m)
        if n > self._peak:
            self._peak = n

    def access(self, entry: Entry) -> None:
        s = self._s
        f = s.get(entry)
        if f is not None:
            if f < 3:
                s[entry] = f + 1
            return
        m = self._m
        f = m.get(entry)
        if f is not None and f < 3:
            m[entry] = f + 1

    def remove(self, entry: Entry) -> None:
        if self._s.pop(entry, None) is not None:
            self.small_bytes -= entry.size
        elif self._m.pop(entry, None) is not None:
            self.main_bytes -= entry.size

    def demote(self, entry: Entry) -> None:
        if self._s.get(entry) == 0:
            self._s.move_to_end(entry, last=False)
        elif self._m.get(entry) == 0:
            self._m.move_to_end(entry, last=False)

    def _ghost(self, entry: Entry) -> None:
        g = self._g
        g[entry.ikey] = None
        limit = self._peak
        while len(g) > limit:
            g.popitem(last=False)

    def pick_victim(self, now: float, eligible: Eligible) -> Entry | None:
        s, m = self._s, self._m
        # 1. the small queue, while it holds more than its share (or main is empty)
        budget = len(s)
        ratio = self.small_ratio
        while budget and s and (not m or self.small_bytes > ratio * (self.small_bytes + self.main_bytes)):
            budget -= 1
            e, f = s.popitem(last=False)
            if f > 0 or not eligible(e):
                # accessed (or pinned/leased/chain head): promote to main
                self.small_bytes -= e.size
                m[e] = 0
                self.main_bytes += e.size
                continue
            self.small_bytes -= e.size
            self._ghost(e)
            self.evictions += 1
            return e
        # 2. the main queue: one pass, reinserting accessed entries with freq - 1
        fallback: Entry | None = None
        fallback_f = 4
        for _ in range(len(m)):
            e, f = m.popitem(last=False)
            if not eligible(e):
                m[e] = f
                continue
            if f == 0:
                self.main_bytes -= e.size
                self.evictions += 1
                return e
            m[e] = f - 1
            if f - 1 < fallback_f:
                fallback, fallback_f = e, f - 1
        if fallback is not None:  # every eligible entry was hot: take the coldest seen
            del m[fallback]
            self.main_bytes -= fallback.size
            self.evictions += 1
            return fallback
        # 3. nothing eligible in main: an eligible entry may still sit in small
        for _ in range(len(s)):
            e, f = s.popitem(last=False)
            s[e] = f
            if eligible(e):
                del s[e]
                self.small_bytes -= e.size
                self._ghost(e)
                self.evictions += 1
                return e
        return None

    def stats(self) -> dict:
        return {
            "policy": self.name,
            "entries": len(self),
            "small": len(self._s),
            "main": len(self._m),
            "ghost": len(self._g),
            "evictions": self.evictions,
            "ghost_hits": self.ghost_hits,
        }


def make_policy(name: str) -> LRUPolicy | S3FIFOPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")
