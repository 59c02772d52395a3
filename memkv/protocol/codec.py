"""The memkv wire format as pure functions: no sockets, no clocks, no I/O.

A frame is a fixed 24-byte header, a msgpack *meta* map, then raw payload bytes::

    magic "MK" | version u8 | opcode u8 | flags u16 | reserved u16 |
    request id u32 | meta length u32 | payload length u64

Payload bytes are never msgpack-encoded: a receiver learns their length from
the header and can ``recv_into`` them straight into their final home (a region
extent on the node, the caller's buffer on the client). ``FrameReader`` is an
incremental parser in the style of h11: the owner of a socket feeds it bytes
and asks for events; it never blocks and never touches a socket, so it is easy
to fuzz. Limits are checked on the header and on the meta map before anything
is allocated for the payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from memkv.errors import BatchTooLarge, FrameTooLarge, KeyTooLarge, ProtocolError
from memkv.protocol.opcodes import Flag, Op

MAGIC = b"MK"
VERSION = 1
HEADER = struct.Struct("<2sBBHHIIQ")
HEADER_SIZE = HEADER.size  # 24
_VALID_OPS = frozenset(int(op) for op in Op)
# Plain ints: enum arithmetic costs about a microsecond per operation on the hot path.
F_RESPONSE = int(Flag.RESPONSE)
F_ERROR = int(Flag.ERROR)
_F_INVALID = ~(F_RESPONSE | F_ERROR)
_ERROR_REPLY = F_RESPONSE | F_ERROR


@dataclass(frozen=True)
class Limits:
    """Hard limits, enforced before allocating anything for a frame."""

    max_meta: int = 1 << 20
    max_payload: int = 1 << 31
    max_key: int = 512
    max_batch: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass
class Frame:
    """One decoded frame. ``payload`` is only filled by ``FrameReader.next_frame``."""

    op: int
    flags: int
    request_id: int
    meta: dict[str, Any]
    payload_len: int = 0
    payload: bytes | bytearray | memoryview = field(default=b"", repr=False)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & F_RESPONSE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & F_ERROR)


# --- encoding ---------------------------------------------------------------

def pack_meta(meta: dict[str, Any]) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def encode_head(op: int, request_id: int, meta: dict[str, Any], payload_len: int = 0,
                flags: int = 0) -> bytes:
    """Header plus meta; the payload (if any) is sent after it by the caller."""
    packed = pack_meta(meta)
    return HEADER.pack(MAGIC, VERSION, op, flags, 0, request_id & 0xFFFFFFFF, len(packed),
                       payload_len) + packed


def encode_frame(op: int, request_id: int, meta: dict[str, Any], payload: bytes = b"",
                 flags: int = 0) -> bytes:
    return encode_head(op, request_id, meta, len(payload), flags) + bytes(payload)


def encode_error(op: int, request_id: int, code: int, message: str) -> bytes:
    return encode_head(op, request_id, {"code": code, "msg": message}, 0, _ERROR_REPLY)


def advance(bufs: list[Any], chunk_len: int, sent: int) -> list[Any]:
    """What is left to send after ``sendmsg(bufs[:chunk_len])`` sent ``sent`` bytes.

    Fully sent buffers are dropped; a partly sent one is replaced by a view of
    its unsent tail. Pure bookkeeping shared by every sender (node, clients,
    RESP), so a partial write is handled the same way everywhere.
    """
    i = 0
    while i < chunk_len:
        b = bufs[i]
        size = len(b) if isinstance(b, bytes) else memoryview(b).nbytes
        if sent < size:
            break
        sent -= size
        i += 1
    if i < chunk_len and sent:
        return [memoryview(bufs[i]).cast("B")[sent:], *bufs[i + 1:]]
    return bufs[i:]


# --- decoding ---------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    op: int
    flags: int
    request_id: int
    meta_len: int
    payload_len: int


def parse_header(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    if len(data) < HEADER_SIZE:
        raise ProtocolError("truncated header")
    magic, version, op, flags, reserved, rid, meta_len, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if op not in _VALID_OPS:
        raise ProtocolError(f"unknown opcode {op}")
    if flags & _F_INVALID or reserved:
        raise ProtocolError("reserved header bits set")
    if meta_len > limits.max_meta:
        raise FrameTooLarge(f"meta of {meta_len} bytes exceeds limit {limits.max_meta}")
    if payload_len > limits.max_payload:
        raise FrameTooLarge(f"payload of {payload_len} bytes exceeds limit {limits.max_payload}")
    return Header(op, flags, rid, meta_len, payload_len)


def _unpack_options(limits: Limits) -> dict[str, Any]:
    return {"raw": False, "strict_map_key": True, "use_list": True, "max_bin_len": limits.max_meta,
            "max_str_len": limits.max_meta, "max_array_len": limits.max_batch * 4, "max_map_len": 64,
            "max_ext_len": 0}


_DEFAULT_UNPACK = _unpack_options(DEFAULT_LIMITS)


def unpack_meta(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a meta map; anything but a well-formed map with str keys is a ProtocolError."""
    try:
        opts = _DEFAULT_UNPACK if limits == DEFAULT_LIMITS else _unpack_options(limits)
        meta = msgpack.unpackb(data, **opts)
    except Exception as exc:  # msgpack raises many unrelated types on bad input
        raise ProtocolError(f"malformed meta: {type(exc).__name__}") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ProtocolError("meta must be a map with string keys")
    return meta


# --- typed access to meta fields ------------------------------------------------
# Handlers read fields through these helpers so a peer sending the wrong type
# gets a ProtocolError reply instead of crashing a node with a TypeError.

def get_key(meta: dict[str, Any], name: str = "k", limits: Limits = DEFAULT_LIMITS) -> bytes:
    value = meta.get(name)
    if not isinstance(value, bytes):
        raise ProtocolError(f"field {name!r} must be bytes")
    if len(value) > limits.max_key:
        raise KeyTooLarge(f"key of {len(value)} bytes exceeds limit {limits.max_key}")
    if not value:
        raise ProtocolError("empty key")
    return value


def get_keys(meta: dict[str, Any], name: str = "ks", limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    value = meta.get(name)
    if not isinstance(value, list):
        raise ProtocolError(f"field {name!r} must be a list of keys")
    if len(value) > limits.max_batch:
        raise BatchTooLarge(f"batch of {len(value)} exceeds limit {limits.max_batch}")
    for k in value:
        if not isinstance(k, bytes) or not k:
            raise ProtocolError(f"field {name!r} must hold non-empty bytes")
        if len(k) > limits.max_key:
            raise KeyTooLarge(f"key of {len(k)} bytes exceeds limit {limits.max_key}")
    return value


def get_ints(meta: dict[str, Any], name: str, count: int, *, minimum: int = 0) -> list[int]:
    value = meta.get(name)
    if not isinstance(value, list) or len(value) != count:
        raise ProtocolError(f"field {name!r} must be a list of {count} integers")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ProtocolError(f"field {name!r} must hold integers >= {minimum}")
    return value


def get_int(meta: dict[str, Any], name: str, default: int | None = None, *, minimum: int = 0) -> int:
    value = meta.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProtocolError(f"field {name!r} must be an integer >= {minimum}")
    return value


def get_str(meta: dict[str, Any], name: str, default: str | None = None, max_len: int = 256) -> str:
    value = meta.get(name, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"field {name!r} must be a string of at most {max_len} chars")
    return value


def get_opt_float(meta: dict[str, Any], name: str) -> float | None:
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ProtocolError(f"field {name!r} must be a non-negative number")
    return float(value)


def get_opt_bytes(meta: dict[str, Any], name: str, limits: Limits = DEFAULT_LIMITS) -> bytes | None:
    if meta.get(name) is None:
        return None
    return get_key(meta, name, limits)


def get_bool(meta: dict[str, Any], name: str, default: bool = False) -> bool:
    value = meta.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be a boolean")
    return value


# --- the incremental reader -------------------------------------------------

class NeedData:
    """Sentinel event: feed more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class FrameReader:
    """Incremental, allocation-conscious frame parser.

    Bytes enter either by ``feed(data)`` or, without a copy, by receiving into
    ``recv_buffer()`` and calling ``received(n)``. ``next_head()`` returns a
    ``Frame`` whose payload has NOT been consumed yet: the owner then moves the
    payload where it belongs with ``take_payload_into(dest)`` (bytes already
    buffered) followed by direct socket reads for the rest, and finally calls
    ``payload_done()``. ``next_frame()`` is the simple form that also collects
    the payload into ``bytes`` (for small control frames and tests).
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, buffer_size: int = 256 * 1024) -> None:
        self.limits = limits
        self._buf = bytearray(max(buffer_size, HEADER_SIZE + 64))
        self._start = 0  # first unread byte
        self._end = 0  # one past the last received byte
        self._pending: Frame | None = None  # head returned, payload not consumed
        self._payload_left = 0
        self._broken: ProtocolError | None = None

    # -- input
    def recv_buffer(self, min_size: int = 65536) -> memoryview:
        """Free space at the end of the buffer to receive into (compacts or grows)."""
        if len(self._buf) - self._end < min_size:
            unread = self._end - self._start
            if self._start:
                self._buf[:unread] = self._buf[self._start:self._end]
                self._start, self._end = 0, unread
            if len(self._buf) - self._end < min_size:
                self._buf.extend(bytes(min_size - (len(self._buf) - self._end)))
        return memoryview(self._buf)[self._end:]

    def received(self, n: int) -> None:
        self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = self.recv_buffer(len(data))
        view[: len(data)] = data
        self.received(len(data))

    @property
    def buffered(self) -> int:
        return self._end - self._start

    # -- events
    def next_head(self) -> Frame | NeedData:
        if self._broken is not None:
            raise self._broken
        if self._pending is not None:
            raise RuntimeError("payload of the previous frame not consumed")
        if self.buffered < HEADER_SIZE:
            return NEED_DATA
        try:
            h = parse_header(memoryview(self._buf)[self._start:self._end], self.limits)
            if self.buffered < HEADER_SIZE + h.meta_len:
                if h.meta_len + HEADER_SIZE > len(self._buf):
                    self.recv_buffer(h.meta_len + HEADER_SIZE)
                return NEED_DATA
            ms = self._start + HEADER_SIZE
            meta = unpack_meta(memoryview(self._buf)[ms:ms + h.meta_len], self.limits)
        except ProtocolError as exc:
            # A frame boundary is lost: this stream cannot be resynchronised.
            self._broken = exc
            raise
        self._start += HEADER_SIZE + h.meta_len
        frame = Frame(h.op, h.flags, h.request_id, meta, h.payload_len)
        self._payload_left = h.payload_len
        if h.payload_len:
            self._pending = frame
        return frame

    def take_payload_into(self, dest: memoryview) -> int:
        """Copy already-buffered payload bytes of the pending frame into ``dest``."""
        n = min(self._payload_left, self.buffered, len(dest))
        if n:
            dest[:n] = memoryview(self._buf)[self._start:self._start + n]
            self._start += n
            self._payload_left -= n
        return n

    def skip_payload(self) -> int:
        """Discard buffered payload bytes (a rejected request); returns bytes still due."""
        n = min(self._payload_left, self.buffered)
        self._start += n
        self._payload_left -= n
        return self._payload_left

    def consumed_directly(self, n: int) -> None:
        """The owner received ``n`` payload bytes straight from the socket."""
        self._payload_left -= n

    @property
    def payload_left(self) -> int:
        return self._payload_left

    def payload_done(self) -> None:
        if self._payload_left:
            raise RuntimeError(f"{self._payload_left} payload bytes not consumed")
        self._pending = None
        if self._start == self._end:
            self._start = self._end = 0

    def next_frame(self) -> Frame | NeedData:
        """A whole frame with its payload as bytes, or NEED_DATA (nothing consumed)."""
        if self._pending is None:
            if self.buffered < HEADER_SIZE:
                return NEED_DATA
            try:
                h = parse_header(memoryview(self._buf)[self._start:self._end], self.limits)
            except ProtocolError as exc:
                self._broken = exc
                raise
            if self.buffered < HEADER_SIZE + h.meta_len + h.payload_len:
                self.recv_buffer(HEADER_SIZE + h.meta_len + h.payload_len - self.buffered)
                return NEED_DATA
            head = self.next_head()
            assert isinstance(head, Frame)
        else:
            head = self._pending
            if self.buffered < self._payload_left:
                return NEED_DATA
        payload = bytes(memoryview(self._buf)[self._start:self._start + self._payload_left])
        self._start += self._payload_left
        self._payload_left = 0
        head.payload = payload
        self.payload_done()
        return head
