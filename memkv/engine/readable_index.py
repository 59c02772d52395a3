"""The client-readable index: the node's side (format: memkv/protocol/index_format.py).

The store keeps it at the end of its region and calls two hooks, at fixed
points and nowhere else (``Store`` docstring):

* ``published(entry)``: a value is indexed with its bytes in the region, or
  its version or TTL changed (commit, idempotent re-put, promotion from flash,
  ``set_expiry``);
* ``withdrawn(entry)``: a value leaves the region (replace, delete, expiry,
  eviction, demotion to flash, purge), called *before* its extent is freed.

An entry published here is *indexed* (``Entry.indexed``): freeing its extent goes
through the allocator's quarantine, so a reader that found the entry before it
was withdrawn copies bytes that stay the value's own while its read may go on:
until no reader that announced a read before the free is still reading
(``readers.py``), and at most ``quarantine_s`` seconds; readers give up (and
ask the node) when a read takes longer.

The index is off until a one-sided reader first asks for it (``activate``):
a node that only ever serves TCP keeps reusing freed extents at once and pays
nothing per write. Activation publishes every value already in the region.

Deletes keep nothing here (the key is no longer published: readers ask the
node, which answers from its own index, tombstones included). Entry kind 2 is
reserved for a delete a reader should learn of without asking.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable

from memkv.engine.entry import Entry
from memkv.protocol import index_format as f

# default size: one slot per this many bytes of region (rounded up to a power of two)
BYTES_PER_SLOT = 8 * 1024
MIN_SLOTS = 1024
MAX_SLOTS = 1 << 22


def default_slots(memory: int) -> int:
    want = max(MIN_SLOTS, min(MAX_SLOTS, memory // BYTES_PER_SLOT))
    return 1 << (want - 1).bit_length()


class ReadableIndex:
    """A table of ``slots`` entries written into ``view[base:]`` (the region's tail)."""

    def __init__(self, view: memoryview, base: int, slots: int, *, wall: Callable[[], float],
                 monotonic: Callable[[], float], quarantine_s: float) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError(f"index slots must be a power of two, got {slots}")
        self.view = view
        self.base = base
        self.slots = slots
        self._wall = wall
        self._mono = monotonic
        self.seed = secrets.randbits(64)
        self.epoch = int(wall())
        self.quarantine_s = quarantine_s
        n = slots + f.WINDOW - 1
        self._keys: list[tuple[str, str, bytes] | None] = [None] * n
        self._entries: list[Entry | None] = [None] * n
        self._fps: list[int] = [0] * n
        self._tags: list[int] = [0] * n
        self._seqs: list[int] = [0] * n
        self._slot_of: dict[tuple[str, str, bytes], int] = {}
        self._tag_ids: dict[tuple[str, str], int] = {}
        self._tag_names: dict[int, tuple[str, str]] = {}
        self._ambiguous: set[tuple[int, int]] = set()
        self.active = False
        # A reader outside the node's process was told where the index is (LOCATE): freed extents of
        # published values then wait for the readers' grace (readers.py). Until then only the node's own
        # hot-read threads read it, and they mark the extents they send (``hazards``), so every other
        # freed extent is reused at once, as on a node that serves TCP only.
        self.shared = False
        self._hazards: list[set[int]] = []
        self._beats = 0
        self.published_total = 0
        self.withdrawn_total = 0
        self.overflows = 0  # values not published: their window was full
        self.collisions = 0  # fingerprints shared by two keys of one tag: neither is published
        view[base:base + f.HEADER_SIZE] = f.pack_header(slots, self.epoch, int(quarantine_s * 1000),
                                                        self.seed).ljust(f.HEADER_SIZE, b"\0")

    @property
    def size(self) -> int:
        return f.table_bytes(self.slots)

    # -- tags: (namespace, scope) -> the u32 readers match
    def tag_of(self, namespace: str, scope: str) -> int:
        key = (namespace, scope)
        t = self._tag_ids.get(key)
        if t is None:
            t = self._tag_ids[key] = len(self._tag_ids) + 1
            self._tag_names[t] = key
        return t

    def tag_name(self, tag: int) -> tuple[str, str] | None:
        return self._tag_names.get(tag)

    # -- liveness: readers stop trusting a region whose heartbeat stands still
    def heartbeat(self) -> None:
        """Bump the heartbeat (the node calls this every ``HEARTBEAT_S`` while it serves)."""
        self._beats += 1
        f.HEARTBEAT.pack_into(self.view, self.base + f.HEARTBEAT_OFF, self._beats)

    def stop(self) -> None:
        """The node is shutting down: readers see heartbeat 0 and ask the node (a new one) instead."""
        f.HEARTBEAT.pack_into(self.view, self.base + f.HEARTBEAT_OFF, 0)

    # -- lifecycle
    def activate(self, entries: Iterable[Entry], *, shared: bool = True) -> int:
        """Start publishing (the first one-sided reader, or with ``shared=False`` the first hot-read thread,
        asked): every value already in the region is published now; the number published."""
        self.shared = self.shared or shared
        if self.active:
            return 0
        self.active = True
        return sum(1 for e in entries if self.published(e))

    # -- the store's hooks
    def published(self, e: Entry) -> bool:
        """Publish ``e`` (new, or its version/TTL changed); False when it cannot be."""
        if not self.active or e.offset < 0 or e.length > f.MAX_LENGTH:
            return False
        ikey = e.ikey
        s = self._slot_of.get(ikey)
        if s is None:
            fp = f.fingerprint(e.key, self.seed)
            tag = self.tag_of(ikey[0], ikey[1])
            if (fp, tag) in self._ambiguous:
                return False
            home = fp & (self.slots - 1)
            keys, fps, tags = self._keys, self._fps, self._tags
            s = -1
            for i in range(home, home + f.WINDOW):
                if keys[i] is None:
                    if s < 0:
                        s = i
                elif fps[i] == fp and tags[i] == tag:
                    # two live keys, one fingerprint: a reader of either could find the other's entry
                    self._ambiguous.add((fp, tag))
                    self.collisions += 1
                    self._clear(i)
                    return False
            if s < 0:
                self.overflows += 1
                return False
            keys[s], fps[s], tags[s] = ikey, fp, tag
            self._slot_of[ikey] = s
        self._entries[s] = e
        self._write(s, f.VALUE, self._tags[s], self._expiry_stamp(e), self._fps[s], e.offset, e.length, e.checksum,
                    e.version)
        e.indexed = True  # freeing it waits for the reads that may have found it (readers.py)
        self.published_total += 1
        return True

    def withdrawn(self, e: Entry) -> None:
        """``e`` leaves the region (its extent is about to be freed): readers must no longer find it."""
        s = self._slot_of.get(e.ikey)
        if s is not None and self._entries[s] is e:
            self._clear(s)
            self.withdrawn_total += 1

    # -- what readers' touches refer to
    def entry_at(self, slot: int, seq: int) -> Entry | None:
        """The entry a reader read at ``slot`` when the slot's seq was ``seq`` (None: changed since)."""
        if 0 <= slot < len(self._entries) and self._seqs[slot] == seq:
            return self._entries[slot]
        return None

    def find_local(self, namespace: str, scope: str, key: bytes, margin_s: float) -> tuple[f.Found, Entry] | None:
        """``key``'s entry as a one-sided reader finds it (fingerprint, window, ``index_format.find``: seq
        even, self-check, tag), for a reader inside the node's process: a TCP connection's hot-read
        thread (memkv/server/hot_reads.py), which announces its reads in the reader table first like any
        same-host reader. With the entry, the ``Entry`` the slot holds (the reply's generation). None
        wherever a one-sided reader would ask the node: not published, being changed, within
        ``margin_s`` of its TTL, or a slot that changed meanwhile. Reads only (dict and list lookups,
        a copy of the window), so it may run on another thread than the writer's."""
        if not self.active:
            return None
        tag = self._tag_ids.get((namespace, scope))
        if tag is None:
            return None
        fp = f.fingerprint(key, self.seed)
        first = fp & (self.slots - 1)
        at = f.slot_offset(self.base, first)
        found = f.find(self.view[at:at + f.WINDOW_BYTES], first, f.fingerprint_bytes(fp), tag)
        if found is None or (found.expires and self._wall() >= self.epoch + found.expires - margin_s):
            return None
        e = self.entry_at(found.slot, int.from_bytes(found.raw[:4], "little"))
        if e is None or e.key != key or e.offset != found.offset:
            return None
        return found, e

    def still(self, found: f.Found, e: Entry) -> bool:
        """Whether the slot ``found`` came from still holds ``e`` at the same extent (nothing withdrew it)."""
        return self.entry_at(found.slot, int.from_bytes(found.raw[:4], "little")) is e and e.offset == found.offset

    # -- extents an in-process reader is sending (hazard pointers)
    def hazard_set(self) -> set[int]:
        """A set a hot-read thread puts the offsets it is about to send in, then checks ``still`` (so a
        value withdrawn before it was marked is not sent), and empties after the send."""
        s: set[int] = set()
        self._hazards.append(s)
        return s

    def drop_hazard_set(self, s: set[int]) -> None:
        self._hazards = [h for h in self._hazards if h is not s]

    def in_use(self, offset: int) -> bool:
        """Whether a hot-read thread may be sending the extent at ``offset`` (its free then waits for the
        readers' grace); answers for in-process readers only (see ``shared``)."""
        return any(offset in h for h in self._hazards)

    def tag_at(self, slot: int) -> int:
        return self._tags[slot] if 0 <= slot < len(self._tags) else 0

    def stats(self) -> dict[str, int | bool]:
        return {"active": self.active, "slots": self.slots, "bytes": self.size, "live": len(self._slot_of),
                "published": self.published_total, "withdrawn": self.withdrawn_total,
                "overflows": self.overflows, "collisions": self.collisions}

    # -- inside
    def _expiry_stamp(self, e: Entry) -> int:
        if e.expires is None:
            return 0
        wall = self._wall() + (e.expires - self._mono())
        return max(1, min(0xFFFFFFFF, math.ceil(wall - self.epoch)))

    def _clear(self, s: int) -> None:
        ikey = self._keys[s]
        if ikey is not None:
            self._slot_of.pop(ikey, None)
        self._keys[s] = None
        self._entries[s] = None
        self._fps[s] = 0
        self._tags[s] = 0
        self._write(s, f.EMPTY, 0, 0, 0, 0, 0, 0, 0)

    def _write(self, s: int, kind: int, tag: int, expires: int, fp: int, offset: int, length: int, checksum: int,
               version: int) -> None:
        """The writer's side of the protocol: odd seq, body with its self-check, even seq."""
        seq = (self._seqs[s] + 2) & 0xFFFFFFFF
        raw = f.pack_entry(seq, kind, tag, expires, fp, offset, length, checksum, version)
        at = self.base + f.HEADER_SIZE + s * f.SLOT
        view = self.view
        view[at:at + 4] = ((seq - 1) & 0xFFFFFFFF).to_bytes(4, "little")
        view[at + 4:at + f.SLOT] = raw[4:]
        view[at:at + 4] = raw[:4]
        self._seqs[s] = seq
