"""The client-readable index: its layout in a node's region, shared by the node and one-sided readers.

A node keeps, at the end of its region (the memory it maps for same-host
clients and registers for RDMA), a hash table that readers search themselves,
so that a GET over shared memory or RDMA needs no request to the node
(Pilaf, FaRM)::

    region: [ values (the allocator's extents) | index header (4 KiB) | slots ]

Slots are 64 bytes (one cache line). A key's *home* slot is the low bits of
its fingerprint; its entry lives in one of the ``WINDOW`` slots from home on
(bounded linear probing: no wrap-around, the table has ``WINDOW - 1`` spare
slots at its end), so one read of ``WINDOW * 64`` contiguous bytes -- one RDMA
READ -- finds it or proves it is not published. A key with no free slot in
its window is simply not published: readers then ask the node.

Entry (little-endian, 64 bytes)::

    0  u32 seq       bumped on every change of the slot; odd while the slot is being written
    4  u16 kind      0 empty, 1 value; 2 reserved (a delete at ``version``: "ask the node")
    6  u16 reserved
    8  u32 tag       (namespace, scope) of the key, assigned by the node; 0 never used
    12 u32 expires   whole seconds after the header's ``epoch`` (node wall clock); 0: no TTL
    16 u64 fp_lo     128-bit fingerprint of the key: xxh3-128 seeded with the node's secret seed
    24 u64 fp_hi
    32 u64 offset    of the value in the region
    40 u32 length
    44 u64 checksum  xxh3-64 of the value (the same one every reader verifies)
    52 u64 version   write version (memkv/protocol/versions.py)
    60 u32 echeck    low 32 bits of xxh3-64 of bytes 0..60: the entry checks itself

Header (at the index's base): magic ``MKIX``, format version, slot size, window,
slots, epoch, quarantine bound (ms), fingerprint seed; at byte 64 the node's
heartbeat (``HEARTBEAT``), at byte 72 the *grace epoch* (``GRACE_EPOCH``).

Readers announce their reads (same-host readers; memkv/engine/readers.py): each
has a 64-byte slot in a small table the node shares writable with them
(``READER_SLOT``). Before it reads anything of the index a reader copies the
grace epoch into the first u64 of its slot, and stores ``IDLE`` there once its
last copy (the entry's re-read) is done; ``RELEASED`` when it stops reading the
region for good. The node tags each extent it frees with the grace epoch, moves
the epoch on, and reuses the extent as soon as no slot holds an epoch at or
below the tag (the reads that may have found the entry are over), or after the
quarantine bound whatever the slots say (a reader that stalled or died).

Writer protocol (the node, one thread): store ``seq + 1`` (odd), then bytes
4..64 with an ``echeck`` computed for the final even ``seq + 2``, then
``seq + 2``. Reader protocol: read the window; take the entry whose tag and
fingerprint match, accept it only if ``seq`` is even and ``echeck`` matches
(a torn copy, in whatever order the bytes landed, fails it); copy the value
and verify its checksum; then read the entry again and accept the value only if
the entry is byte-for-byte the same (nothing changed it meanwhile) and the
whole read took less than the node's quarantine bound: an extent freed while a
reader may still copy it is not reused for that long.
"""

from __future__ import annotations

import itertools
import struct
import threading

import xxhash

MAGIC = b"MKIX"
FORMAT_VERSION = 2  # 2: readers announce their reads (grace epoch)
HEADER_SIZE = 4096
SLOT = 64
WINDOW = 8
WINDOW_BYTES = WINDOW * SLOT

EMPTY, VALUE, TOMBSTONE = 0, 1, 2
MAX_LENGTH = (1 << 32) - 1  # longer values are not published (read over TCP)

ENTRY = struct.Struct("<IHHIIQQQIQQI")
assert ENTRY.size == SLOT
_BODY = struct.Struct("<HHIIQQQIQQ")  # bytes 4..60
_SEQ = struct.Struct("<I")
_ECHECK = struct.Struct("<I")
# magic, format version, slot size, window, slots, epoch (wall s), quarantine (ms), seed (u64)
HEADER = struct.Struct("<4sHHIQQQQ")
# The node's heartbeat: a u64 at this offset of the header that the node bumps every
# ``HEARTBEAT_S`` and sets to 0 when it shuts down. A reader that sees it unchanged for
# ``LIVENESS_S`` of its own time (or 0) stops trusting the index: a stopped, hung or dead node's
# region stays mapped by its readers but nobody keeps it current any more.
HEARTBEAT = struct.Struct("<Q")
HEARTBEAT_OFF = 64
HEARTBEAT_S = 0.25
LIVENESS_S = 1.0
# The grace epoch (u64, >= 1): readers announce it in their slot while they read (above).
GRACE_EPOCH = struct.Struct("<Q")
GRACE_EPOCH_OFF = 72
READER_SLOT = 64  # bytes per reader slot (one cache line: readers never share a line)
READER = struct.Struct("<Q")  # the announced epoch at the start of the slot
IDLE = 0
RELEASED = (1 << 64) - 1

_xxh3_64 = xxhash.xxh3_64_intdigest
_xxh3_128 = xxhash.xxh3_128_intdigest
_M64 = (1 << 64) - 1
_FP_OFF = 16  # where the fingerprint sits in an entry


def fingerprint(key: bytes, seed: int) -> int:
    """The key's 128-bit fingerprint under the node's seed."""
    return _xxh3_128(key, seed)


def fingerprint_bytes(fp: int) -> bytes:
    """How the fingerprint is laid out in an entry (fp_lo, fp_hi little-endian)."""
    return fp.to_bytes(16, "little")


def home_slot(fp: int, slots: int) -> int:
    """First slot of the key's window (``slots`` is a power of two)."""
    return fp & (slots - 1)


def slot_offset(base: int, slot: int) -> int:
    """Region offset of ``slot`` in an index whose header starts at ``base``."""
    return base + HEADER_SIZE + slot * SLOT


def table_bytes(slots: int) -> int:
    """Bytes the index takes in the region: header + slots + the window's spare tail."""
    return HEADER_SIZE + (slots + WINDOW - 1) * SLOT


def echeck(seq: int, body: bytes | bytearray | memoryview) -> int:
    """The entry's self-check over ``seq`` and bytes 4..60."""
    return _xxh3_64(_SEQ.pack(seq) + bytes(body)) & 0xFFFFFFFF


def pack_entry(seq: int, kind: int, tag: int, expires: int, fp: int, offset: int, length: int, checksum: int,
               version: int) -> bytes:
    """The 64 bytes of an entry with ``seq`` (even) and its self-check."""
    body = _BODY.pack(kind, 0, tag, expires, fp & _M64, fp >> 64, offset, length, checksum, version)
    return _SEQ.pack(seq) + body + _ECHECK.pack(echeck(seq, body))


def pack_header(slots: int, epoch: int, quarantine_ms: int, seed: int) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, SLOT, WINDOW, slots, epoch, quarantine_ms, seed)


class Found:
    """An entry a reader accepted from a window: where the value is, and the raw entry to re-check."""

    __slots__ = ("slot", "raw", "offset", "length", "checksum", "version", "expires")

    def __init__(self, slot: int, raw: bytes, offset: int, length: int, checksum: int, version: int,
                 expires: int) -> None:
        self.slot = slot  # index of the slot in the table
        self.raw = raw  # the entry's 64 bytes as first read
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.version = version
        self.expires = expires


def find(window: bytes | bytearray | memoryview, first_slot: int, fp_bytes: bytes, tag: int) -> Found | None:
    """The valid value entry for (fingerprint, tag) in ``window`` (slots from ``first_slot``), or None.

    None means "not published here, or being changed, or torn": the reader asks
    the node. A tombstone (reserved, issue of versioned deletes) is "ask the node" too.
    """
    data = bytes(window)
    pos = data.find(fp_bytes)
    while pos >= 0:
        start = pos - _FP_OFF
        if start % SLOT == 0:
            raw = data[start:start + SLOT]
            seq, kind, _r, etag, expires, _lo, _hi, offset, length, cs, version, check = ENTRY.unpack(raw)
            if etag == tag:
                if kind != VALUE or seq & 1 or check != (_xxh3_64(raw[:60]) & 0xFFFFFFFF):
                    return None
                return Found(first_slot + start // SLOT, raw, offset, length, cs, version, expires)
        pos = data.find(fp_bytes, pos + 1)
    return None


class ReaderSlot:
    """A reader's side of its slot in the node's reader table (see the module doc): ``enter`` before
    reading anything of the index, ``leave`` after the last copy, ``release`` when done for good.

    One client may run several reads at once (threads, tasks) through one slot: the slot shows the
    oldest epoch among them, so each is covered. A read is covered only while that oldest read is
    within the node's bound (after it the node ignores the slot), hence ``enter`` returns the start
    of the oldest read going on, from which the caller measures its own read's lateness.
    """

    __slots__ = ("_mine", "_grace", "_lock", "_reads", "_tokens")

    def __init__(self, table: memoryview, slot: int, region: memoryview, base: int) -> None:
        at = slot * READER_SLOT
        self._mine = table[at:at + READER.size].cast("Q")
        self._grace = region[base + GRACE_EPOCH_OFF:base + GRACE_EPOCH_OFF + GRACE_EPOCH.size].cast("Q")
        self._lock = threading.Lock()
        self._reads: dict[int, tuple[int, float]] = {}  # token -> (epoch announced, start), oldest first
        self._tokens = itertools.count(1)

    def enter(self, now: float) -> tuple[int, float]:
        """Announce a read starting at ``now``: its token for ``leave``, and the start of the oldest read
        of this slot still going (0 token: the slot is released; nothing is announced)."""
        with self._lock:
            try:
                epoch = self._grace[0]  # one aligned 8-byte load
                if not self._reads:
                    self._mine[0] = epoch  # one aligned 8-byte store; the lock's release orders it
            except ValueError:
                return 0, now  # released (the transport was closed)
            token = next(self._tokens)
            self._reads[token] = (epoch, now)
            return token, next(iter(self._reads.values()))[1]

    def leave(self, token: int) -> None:
        with self._lock:
            if self._reads.pop(token, None) is None:
                return
            try:
                self._mine[0] = next(iter(self._reads.values()))[0] if self._reads else IDLE
            except ValueError:
                pass  # released meanwhile (the transport failed and was closed)

    def release(self) -> None:
        """Never reading through this slot again: the node may give it to another reader."""
        with self._lock:
            try:
                self._mine[0] = RELEASED
            except ValueError:
                return  # already released
            self._mine.release()
            self._grace.release()
