"""The on-flash record format, as pure functions (no I/O).

A segment file is a sequence of records::

    header (72 bytes) | namespace | tenant | key | parent | value

Header fields (little endian)::

    magic u32 | hcs u32 | kind u8 | flags u8 | ns_len u16 | tenant_len u16 | parent_len u16 |
    key_len u32 | value_len u64 | value_cs u64 | lsn u64 | generation u64 | version u64 | expires f64 |
    durable u32

``hcs`` is xxh32 over the header after it and the name bytes (namespace .. parent), so
a torn or flipped header is detected before its lengths are trusted; ``value_cs``
is the value's xxh3-64 (the same checksum the index and the clients use), so a
torn or flipped value is detected too. ``lsn`` orders records globally (the
newest record of a key wins at recovery; a copy made by compaction keeps its
lsn). ``version`` is the write's version (memkv/protocol/versions.py: how replicas
tell the newer of two values apart, also after a restart). ``expires`` is wall-clock
seconds (0 = never). ``durable`` is what the log writer knew to be on disk when it queued
the record (``stamp_head``): 1 + the bytes of the record's own segment then durable (so 1:
none of it yet; >= 2 also means every record of the segment before it had settled); 0: no
claim (records written before the field existed). Recovery uses it to tell a hole the crash
left in never-acknowledged records (torn) from damage to durable ones: memkv/flash/recovery.py.

``scan`` walks a buffer, skipping damaged bytes by searching for the next
header that checks out, so one bad record costs only itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

import xxhash

MAGIC = 0x52564B4D  # b"MKVR" little endian
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER = struct.Struct("<IIBBHHHIQQQQQdI")
HEADER_SIZE = HEADER.size  # 72
assert HEADER_SIZE == 72

PUT = 1
DELETE = 2
KINDS = (PUT, DELETE)
FLAG_PARENT = 1

MAX_NAME = 0xFFFF
MAX_DURABLE = 0xFFFFFFFF  # a larger durable extent is stamped as this (a lower bound stays true)
_DURABLE_AT = HEADER_SIZE - 4
MAX_KEY = 1 << 20
MAX_VALUE = 1 << 40

_xxh32 = xxhash.xxh32_intdigest
_xxh3 = xxhash.xxh3_64_intdigest


class RecordError(Exception):
    """Base class: the bytes at this offset are not a valid record."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


class Truncated(RecordError):
    """The buffer ends inside the record (a torn write at the tail of a log)."""


class BadHeader(RecordError):
    """Wrong magic, impossible field, or header checksum mismatch."""


class BadValue(RecordError):
    """The header checks out but the value's checksum does not (torn or flipped value)."""


class Record(NamedTuple):
    """A decoded record header; ``value_off`` is relative to the buffer that was decoded."""

    kind: int
    namespace: str
    tenant: str
    key: bytes
    parent: bytes | None
    value_len: int
    value_cs: int
    lsn: int
    generation: int
    expires: float
    offset: int  # start of the record
    value_off: int  # start of the value
    version: int = 0
    durable: int = 0  # the writer's durability stamp (see the module docstring)

    @property
    def size(self) -> int:
        return self.value_off - self.offset + self.value_len

    @property
    def end(self) -> int:
        return self.value_off + self.value_len


def encode_head(kind: int, namespace: str, tenant: str, key: bytes, parent: bytes | None, value_len: int,
                value_cs: int, lsn: int, generation: int, expires: float | None, version: int = 0) -> bytes:
    """Header + name bytes of a record; the value bytes follow it (written separately, zero-copy)."""
    if kind not in KINDS:
        raise ValueError(f"bad record kind {kind}")
    ns = namespace.encode()
    tn = tenant.encode()
    pr = parent if parent is not None else b""
    if len(ns) > MAX_NAME or len(tn) > MAX_NAME or len(pr) > MAX_NAME or len(key) > MAX_KEY:
        raise ValueError("name or key too long for a record")
    if kind == DELETE and value_len:
        raise ValueError("a tombstone has no value")
    names = b"".join((ns, tn, key, pr))
    rest = HEADER.pack(MAGIC, 0, kind, FLAG_PARENT if parent is not None else 0, len(ns), len(tn), len(pr),
                       len(key), value_len, value_cs, lsn, generation, version, float(expires or 0.0), 0)[8:]
    hcs = _xxh32(rest + names)
    return MAGIC_BYTES + struct.pack("<I", hcs) + rest + names


def encode(kind: int, namespace: str, tenant: str, key: bytes, value: bytes = b"", *, parent: bytes | None = None,
           lsn: int = 0, generation: int = 0, expires: float | None = None, version: int = 0) -> bytes:
    """A whole record as bytes (tests and small records; the log writes the value zero-copy)."""
    return encode_head(kind, namespace, tenant, key, parent, len(value), _xxh3(value) if kind == PUT else 0, lsn,
                       generation, expires, version) + bytes(value)


def decode_head(buf, offset: int = 0, end: int | None = None) -> Record:
    """Decode and check the header at ``offset`` (the value is not verified: see ``verify_value``).

    Raises ``Truncated`` if ``buf`` ends before the record does, ``BadHeader`` if the header is damaged.
    """
    if end is None:
        end = len(buf)
    if offset + HEADER_SIZE > end:
        raise Truncated("buffer ends inside a record header", offset)
    (magic, hcs, kind, flags, ns_len, tn_len, pr_len, key_len, value_len, value_cs, lsn, generation, version,
     expires, durable) = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise BadHeader(f"bad magic {magic:#x}", offset)
    names_end = offset + HEADER_SIZE + ns_len + tn_len + key_len + pr_len
    if names_end > end:
        # lengths are not trusted yet: a damaged header may look truncated; tell them apart by the checksum
        # when the names are present, else report a truncation (the tail of a log)
        raise Truncated("buffer ends inside a record's names", offset)
    mv = memoryview(buf)
    if _xxh32(mv[offset + 8:names_end]) != hcs:
        raise BadHeader("header checksum mismatch", offset)
    if kind not in KINDS or key_len == 0 or (kind == DELETE and value_len) or value_len > MAX_VALUE:
        raise BadHeader("impossible header fields", offset)
    p = offset + HEADER_SIZE
    ns = bytes(mv[p:p + ns_len]).decode("utf-8", "replace")
    p += ns_len
    tn = bytes(mv[p:p + tn_len]).decode("utf-8", "replace")
    p += tn_len
    key = bytes(mv[p:p + key_len])
    p += key_len
    parent = bytes(mv[p:p + pr_len]) if flags & FLAG_PARENT else None
    p += pr_len
    return Record(kind, ns, tn, key, parent, value_len, value_cs, lsn, generation, expires, offset, p, version,
                  durable)


def stamp_head(head, durable: int) -> bytes:
    """``head`` (a record's header and name bytes, as ``encode_head`` made them) with its ``durable``
    field set and its header checksum recomputed."""
    out = bytearray(head)
    _, _, _, _, nl, tl, pl, kl = struct.unpack_from("<IIBBHHHI", out)
    struct.pack_into("<I", out, _DURABLE_AT, min(durable, MAX_DURABLE))
    struct.pack_into("<I", out, 4, _xxh32(memoryview(out)[8:HEADER_SIZE + nl + tl + kl + pl]))
    return bytes(out)


def verify_value(buf, rec: Record) -> None:
    """Raise ``Truncated``/``BadValue`` unless the record's value in ``buf`` is whole and checks out."""
    if rec.kind != PUT:
        return
    if rec.end > len(buf):
        raise Truncated("buffer ends inside a record's value", rec.offset)
    if _xxh3(memoryview(buf)[rec.value_off:rec.end]) != rec.value_cs:
        raise BadValue("value checksum mismatch", rec.offset)


def decode(buf, offset: int = 0) -> Record:
    """Decode the record at ``offset`` and verify its value."""
    rec = decode_head(buf, offset)
    verify_value(buf, rec)
    return rec


class Damage(NamedTuple):
    """A stretch of bytes that held no valid record (reported by ``scan``)."""

    offset: int
    end: int
    error: RecordError


def scan(buf, start: int = 0, end: int | None = None, *, verify: bool = True) -> Iterator[Record | Damage]:
    """Yield every valid record in ``buf[start:end]`` in order, and a ``Damage`` for each damaged stretch.

    After a damaged record the scan resumes at the next offset where a header
    checks out. A record cut by ``end`` (a torn tail) is reported as ``Damage``
    with a ``Truncated`` error. A run of zero bytes (preallocated or never
    written) is damage too, reported once.
    """
    if end is None:
        end = len(buf)
    mv = memoryview(buf)
    pos = start
    while pos < end:
        try:
            rec = decode_head(mv, pos, end)
            if verify:
                if rec.end > end:
                    raise Truncated("buffer ends inside a record's value", pos)
                verify_value(mv[:end], rec)
            elif rec.end > end:
                raise Truncated("buffer ends inside a record's value", pos)
        except RecordError as exc:
            nxt = _resync(buf, mv, pos + 1, end)
            if isinstance(exc, BadValue):
                # the header is sound, so its length is trustworthy: skip just this record
                # (unless a valid header starts inside it: then it was a torn write overwritten later)
                rec_end = decode_head(mv, pos, end).end
                nxt = min(nxt, rec_end)
            yield Damage(pos, nxt, exc)
            pos = nxt
            continue
        yield rec
        pos = rec.end
    return


def _resync(raw, mv: memoryview, pos: int, end: int) -> int:
    """The next offset >= ``pos`` where a header checks out, or ``end``."""
    while True:
        i = _find(raw, pos, end)
        if i < 0:
            return end
        try:
            decode_head(mv, i, end)
            return i
        except Truncated:
            return i if i + HEADER_SIZE <= end else end
        except RecordError:
            pos = i + 1


def _find(raw, pos: int, end: int) -> int:
    find = getattr(raw, "find", None)  # bytes, bytearray, mmap
    if find is not None:
        return find(MAGIC_BYTES, pos, end)
    i = bytes(memoryview(raw)[pos:end]).find(MAGIC_BYTES)
    return -1 if i < 0 else i + pos
