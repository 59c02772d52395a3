"""RESP (the Redis serialization protocol), sans-IO: parsing and serializing, no sockets.

Server side (the node's RESP front end, ``memkv.server.resp``):

* :class:`CommandReader` — bytes in, commands out. Accepts RESP2 multibulk
  requests (``*N\\r\\n$L\\r\\n...``, what every client library sends) and inline
  commands (``PING\\r\\n``, what telnet sends). It parses incrementally (a
  5 MiB argument arriving in 64 KiB pieces is scanned once, not 80 times) and
  can hand a large argument to the caller *before* it is buffered
  (:class:`LargeArg`), so that a SET payload is received straight into its
  place in the node's region. The complete multibulk commands at hand are
  parsed by hiredis' C ``Reader`` in one go (a Python parse of a small GET cost
  more than the rest of the node's work on it); each one is accepted only if
  re-encoding it gives back exactly the bytes it came from, so anything hiredis
  reads more leniently than we do (a bulk without its CRLF, a status where a
  bulk belongs, a limit exceeded) goes to the checked Python parser below, which
  also handles partial commands, inline commands and large arguments.
* reply serializers ``simple``, ``error``, ``integer``, ``bulk``, ``null``,
  ``array_head``, ``map_head``, ``encode`` (RESP2 or RESP3, ``proto`` argument).

Client side / tests: :func:`encode_command` and :func:`parse_reply`.

Every malformed input raises :class:`RespError` (a ``ProtocolError``) — never
another exception — and every size is checked before anything is allocated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import hiredis

from memkv.errors import ProtocolError

CRLF = b"\r\n"


class RespError(ProtocolError):
    """The peer broke the RESP framing; the connection cannot continue."""


@dataclass(frozen=True)
class RespLimits:
    max_args: int = 1024 * 1024  # Redis: 1M arguments per multibulk
    max_bulk: int = 512 * 1024 * 1024  # Redis: proto-max-bulk-len
    max_inline: int = 64 * 1024  # Redis: PROTO_INLINE_MAX_SIZE
    stream_threshold: int = 16 * 1024  # arguments at least this large may be streamed (LargeArg)


class NeedData:
    """More bytes are needed before the next command is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass
class LargeArg:
    """A large bulk argument whose bytes have not all arrived yet.

    ``args`` are the arguments before it (``args[0]`` is the command name),
    ``length`` its size, ``nargs`` the command's argument count. The caller
    either streams it (:meth:`CommandReader.take_into`, then receive the rest
    itself and report it with :meth:`CommandReader.consumed_directly`, then
    :meth:`CommandReader.finish_large` with a placeholder object that stands
    for the argument) or asks the reader to buffer it like any other argument
    (:meth:`CommandReader.buffer_large`).
    """

    args: list[Any]
    length: int
    nargs: int


def _parse_int(line: bytes | bytearray | memoryview, what: str) -> int:
    s = bytes(line)
    if not s or len(s) > 20:
        raise RespError(f"invalid {what} length")
    neg = s[:1] == b"-"
    digits = s[1:] if neg else s
    if not digits.isdigit():
        raise RespError(f"invalid {what} length {s[:24]!r}")
    n = int(digits)
    return -n if neg else n


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command like Redis' ``sdssplitargs`` (quotes and escapes)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\r\n\v\f":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        if line[i] in b"\"'":
            quote = line[i]
            i += 1
            while True:
                if i >= n:
                    raise RespError("unbalanced quotes in request")
                ch = line[i]
                if quote == 0x22 and ch == 0x5C and i + 1 < n:  # backslash in double quotes
                    nxt = line[i + 1]
                    if nxt == 0x78 and i + 3 < n:  # \xHH
                        try:
                            cur.append(int(line[i + 2:i + 4], 16))
                            i += 4
                            continue
                        except ValueError:
                            pass
                    cur.append({0x6E: 10, 0x72: 13, 0x74: 9, 0x62: 8, 0x61: 7}.get(nxt, nxt))
                    i += 2
                    continue
                if quote == 0x27 and ch == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    cur.append(0x27)
                    i += 2
                    continue
                if ch == quote:
                    i += 1
                    if i < n and line[i] not in b" \t\r\n\v\f":
                        raise RespError("closing quote must be followed by a space")
                    break
                cur.append(ch)
                i += 1
        else:
            while i < n and line[i] not in b" \t\r\n\v\f":
                cur.append(line[i])
                i += 1
        args.append(bytes(cur))


# hiredis allocates an aggregate's slots when it reads the header (a count of 2e9 took seconds):
# bytes with a type byte followed by seven digits (a million elements) anywhere go to the checked
# parser instead. Found by mapping type bytes to "A", digits to "D" and searching, at C speed.
_CLASSES = bytes(0x41 if ch in b"*%~>|" else 0x44 if 0x30 <= ch <= 0x39 else 0x2E for ch in range(256))
_HUGE_AGGREGATE = b"ADDDDDDD"


def _wire(args: list[Any], max_bulk: int) -> bytes | None:
    """The canonical encoding of a command of bulk strings (None: some argument is not one, or too big)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if type(a) is not bytes or len(a) > max_bulk:
            return None
        parts.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(parts)


class CommandReader:
    """Incremental parser of client requests (see the module doc).

    Use: ``view = reader.recv_buffer(); n = sock.recv_into(view); reader.received(n)``
    then call :meth:`next` until it returns :data:`NEED_DATA`. ``next`` returns
    a ``list`` of arguments (``bytes``; a streamed argument is the caller's
    placeholder), a :class:`LargeArg`, or ``NEED_DATA``; it raises
    :class:`RespError` on malformed input.
    """

    MIN_FREE = 16 * 1024

    def __init__(self, limits: RespLimits | None = None, bufsize: int = 64 * 1024, *, hiredis: bool = True) -> None:
        self.limits = limits or RespLimits()
        self.hiredis = hiredis  # False: the checked parser alone (tests compare the two)
        self.buf = bytearray(bufsize)
        self.start = 0
        self.end = 0
        self._nargs: int | None = None  # in a multibulk: its argument count
        self._args: list[Any] = []
        self._bulk: int | None = None  # length of the bulk being read (header parsed)
        self._buffer_large = False  # the caller asked to buffer the pending large bulk
        self._streaming = 0  # bytes of a LargeArg still to be received by the caller
        self._need_crlf = False  # after a streamed argument: its trailing CRLF
        self._ready: deque[list[bytes]] = deque()  # complete commands parsed by hiredis, not returned yet

    # -- input
    @property
    def buffered(self) -> int:
        return self.end - self.start

    def recv_buffer(self) -> memoryview:
        """Free room at the end of the buffer (compacts or grows as needed)."""
        want = self.MIN_FREE
        if self._bulk is not None and not self._streaming:
            want = max(want, self._bulk + 2 - self.buffered)
        if len(self.buf) - self.end < want:
            live = self.buffered
            if self.start and live + want <= len(self.buf):
                self.buf[:live] = self.buf[self.start:self.end]
            else:
                new = bytearray(max(live + want, len(self.buf)))
                new[:live] = self.buf[self.start:self.end]
                self.buf = new
            self.start, self.end = 0, live
        return memoryview(self.buf)[self.end:]

    def received(self, n: int) -> None:
        self.end += n
        if self.end > len(self.buf):
            raise ValueError("received more than the buffer holds")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes (convenience for tests and pure-function use)."""
        mv = memoryview(data).cast("B")
        while mv.nbytes:
            room = self.recv_buffer()
            k = min(room.nbytes, mv.nbytes)
            room[:k] = mv[:k]
            self.received(k)
            mv = mv[k:]

    # -- streaming of a large argument
    def take_into(self, view: memoryview) -> int:
        """Copy the buffered bytes of the pending large argument into ``view``; bytes copied."""
        if self._bulk is None or self._buffer_large:
            raise RuntimeError("no large argument is pending")
        if self._streaming == 0:
            self._streaming = self._bulk
        k = min(self.buffered, view.nbytes, self._streaming)
        view[:k] = memoryview(self.buf)[self.start:self.start + k]
        self.start += k
        self._streaming -= k
        return k

    def consumed_directly(self, n: int) -> None:
        """The caller received ``n`` bytes of the large argument itself (``recv_into``)."""
        if n > self._streaming:
            raise ValueError("more bytes than the large argument has")
        self._streaming -= n

    @property
    def large_left(self) -> int:
        """Bytes of the streamed large argument the caller still has to receive."""
        return self._streaming

    def finish_large(self, placeholder: Any) -> None:
        """The large argument is complete; ``placeholder`` stands for it in the command's args."""
        if self._bulk is None or self._streaming:
            raise RuntimeError("the large argument is not complete")
        self._args.append(placeholder)
        self._bulk = None
        self._need_crlf = True

    def buffer_large(self) -> None:
        """Do not stream the pending large argument: buffer it like a small one."""
        self._buffer_large = True

    # -- parsing
    def _line(self, limit: int) -> bytes | None:
        """The next CRLF-terminated line (without CRLF) or None; RespError past ``limit``."""
        i = self.buf.find(b"\r\n", self.start, min(self.end, self.start + limit + 2))
        if i < 0:
            if self.buffered > limit + 1:
                raise RespError("line too long")
            return None
        line = bytes(self.buf[self.start:i])
        self.start = i + 2
        return line

    def _parse_complete(self) -> None:
        """Parse the complete multibulk commands at hand with hiredis into ``_ready``; stop before
        the first one that is partial or not exactly canonical (the checked parser takes it from there)."""
        buf, start, end = self.buf, self.start, self.end
        if buf[start:end].translate(_CLASSES).find(_HUGE_AGGREGATE) >= 0:
            return
        lim = self.limits
        reader = hiredis.Reader()
        reader.feed(buf, start, end - start)
        pos = start
        while pos < end:
            try:
                args = reader.gets()
            except hiredis.ProtocolError:
                break
            if type(args) is not list or len(args) > lim.max_args:
                break  # partial (False), or not a command: the checked parser decides
            wire = _wire(args, lim.max_bulk)
            if wire is None or buf[pos:pos + len(wire)] != wire:
                break
            pos += len(wire)
            if args:  # (an empty multibulk is ignored, as Redis does)
                self._ready.append(args)
        self.start = pos

    def next(self) -> list[Any] | LargeArg | NeedData:  # noqa: A003
        lim = self.limits
        if self._ready:
            return self._ready.popleft()
        if self.hiredis and self._nargs is None and not self._need_crlf and self.end > self.start \
                and self.buf[self.start] == 0x2A:
            self._parse_complete()  # at a command boundary, a multibulk
            if self._ready:
                return self._ready.popleft()
        while True:
            if self._need_crlf:
                if self.buffered < 2:
                    return NEED_DATA
                if self.buf[self.start:self.start + 2] != CRLF:
                    raise RespError("expected CRLF after bulk argument")
                self.start += 2
                self._need_crlf = False
            if self._nargs is None:
                if not self.buffered:
                    return NEED_DATA
                if self.buf[self.start] == 0x2A:  # '*'
                    mark = self.start
                    line = self._line(32)
                    if line is None:
                        return NEED_DATA
                    n = _parse_int(memoryview(line)[1:], "multibulk")
                    if n > lim.max_args:
                        self.start = mark
                        raise RespError("invalid multibulk length")
                    if n <= 0:
                        continue  # Redis ignores empty multibulks
                    self._nargs = n
                    self._args = []
                else:
                    line = self._line(lim.max_inline)
                    if line is None:
                        return NEED_DATA
                    args = split_inline(line)
                    if args:
                        return args
                    continue
            nargs = self._nargs
            args = self._args
            while len(args) < nargs:
                if self._bulk is None:
                    if not self.buffered:
                        return NEED_DATA
                    if self.buf[self.start] != 0x24:  # '$'
                        raise RespError(f"expected '$', got {bytes(self.buf[self.start:self.start + 1])!r}")
                    line = self._line(32)
                    if line is None:
                        return NEED_DATA
                    n = _parse_int(memoryview(line)[1:], "bulk")
                    if n < 0 or n > lim.max_bulk:
                        raise RespError("invalid bulk length")
                    self._bulk = n
                    self._buffer_large = False
                n = self._bulk
                if self.buffered >= n + 2:
                    s = self.start
                    if self.buf[s + n:s + n + 2] != CRLF:
                        raise RespError("expected CRLF after bulk argument")
                    args.append(bytes(self.buf[s:s + n]))
                    self.start = s + n + 2
                    self._bulk = None
                    continue
                if n >= lim.stream_threshold and not self._buffer_large:
                    return LargeArg(list(args), n, nargs)
                return NEED_DATA
            self._nargs = None
            self._args = []
            return args


def parse_commands(data: bytes | bytearray | memoryview, limits: RespLimits | None = None
                   ) -> tuple[list[list[bytes]], int]:
    """Pure function: the complete commands at the start of ``data`` and the bytes they span.

    Large arguments are buffered (never streamed). Raises :class:`RespError`.
    """
    reader = CommandReader(limits, bufsize=max(len(data), 1))
    reader.feed(data)
    out: list[list[bytes]] = []
    consumed = 0
    while True:
        cmd = reader.next()
        if isinstance(cmd, LargeArg):
            reader.buffer_large()
            continue
        if isinstance(cmd, NeedData):
            return out, consumed
        out.append(cmd)
        consumed = reader.start  # the buffer was filled from offset 0 and never compacted


# -- serializers (server replies) ---------------------------------------------------------------
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
QUEUED = b"+QUEUED\r\n"
NULL2 = b"$-1\r\n"
NULL3 = b"_\r\n"
NULL_ARRAY2 = b"*-1\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"
EMPTY_ARRAY = b"*0\r\n"


def simple(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    if b"\r" in text or b"\n" in text:
        raise ValueError("simple strings cannot contain CR or LF")
    return b"+" + text + CRLF


def error(message: str) -> bytes:
    """``-ERR message`` (or ``-PREFIX message`` when ``message`` starts with an upper-case word)."""
    msg = message.replace("\r", " ").replace("\n", " ")
    first = msg.split(" ", 1)[0]
    if not (first.isupper() and first.isalpha()):
        msg = "ERR " + msg
    return b"-" + msg.encode("utf-8", "replace") + CRLF


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk_head(n: int) -> bytes:
    return b"$%d\r\n" % n


def bulk(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def null(proto: int = 2) -> bytes:
    return NULL3 if proto >= 3 else NULL2


def array_head(n: int) -> bytes:
    return b"*%d\r\n" % n


def map_head(n: int, proto: int = 2) -> bytes:
    """A map of ``n`` pairs: ``%n`` in RESP3, a flat array of 2n items in RESP2."""
    return b"%%%d\r\n" % n if proto >= 3 else b"*%d\r\n" % (2 * n)


def double(x: float, proto: int = 2) -> bytes:
    return b",%r\r\n" % x if proto >= 3 else bulk(repr(x))


def verbatim(text: str, proto: int = 2) -> bytes:
    """A human-readable text (INFO): verbatim string ``=`` in RESP3, bulk string in RESP2."""
    data = text.encode()
    if proto >= 3:
        return b"=%d\r\ntxt:%b\r\n" % (len(data) + 4, data)
    return bulk(data)


def encode(value: Any, proto: int = 2) -> bytes:
    """Serialize a Python value: None, bool, int, float, str/bytes (bulk), list/tuple, dict."""
    if value is None:
        return null(proto)
    if isinstance(value, bool):
        if proto >= 3:
            return b"#t\r\n" if value else b"#f\r\n"
        return ONE if value else ZERO
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, float):
        return double(value, proto)
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return bulk(bytes(value) if not isinstance(value, str) else value)
    if isinstance(value, dict):
        parts = [map_head(len(value), proto)]
        for k, v in value.items():
            parts.append(encode(k, proto))
            parts.append(encode(v, proto))
        return b"".join(parts)
    if isinstance(value, (list, tuple)):
        return array_head(len(value)) + b"".join(encode(v, proto) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} as RESP")


# -- client side ---------------------------------------------------------------------------------
def encode_command(*args: bytes | str | int | float) -> bytes:
    """A request as clients send it (multibulk of bulk strings)."""
    parts = [array_head(len(args))]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, (int, float)):
            a = str(a).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(parts)


class ReplyError:
    """An error reply (``-ERR ...``) as a value."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and other.message == self.message

    def __repr__(self) -> str:
        return f"ReplyError({self.message!r})"


class Push(list):  # type: ignore[type-arg]
    """A RESP3 push message (``>``)."""


_MAX_DEPTH = 64


def parse_reply(data: bytes | bytearray | memoryview, pos: int = 0, limits: RespLimits | None = None,
                _depth: int = 0) -> tuple[Any, int] | None:
    """Pure function: one reply (RESP2 or RESP3) at ``data[pos:]`` -> ``(value, end)`` or None if incomplete.

    Bulk strings become ``bytes``, simple strings ``str``, errors :class:`ReplyError`,
    nulls ``None``, maps ``dict``, sets ``set`` or ``list`` (unhashable items).
    Raises :class:`RespError` on malformed input.
    """
    lim = limits or RespLimits()
    if _depth > _MAX_DEPTH:
        raise RespError("reply nested too deeply")
    buf = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    if pos >= len(buf):
        return None
    i = buf.find(b"\r\n", pos, pos + lim.max_inline + 2)
    if i < 0:
        if len(buf) - pos > lim.max_inline + 1:
            raise RespError("line too long")
        return None
    kind, line, end = buf[pos:pos + 1], bytes(buf[pos + 1:i]), i + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), end
    if kind == b"-":
        return ReplyError(line.decode("utf-8", "replace")), end
    if kind == b":":
        return _parse_int(line, "integer"), end
    if kind == b"_":
        if line:
            raise RespError("bad null")
        return None, end
    if kind == b"#":
        if line not in (b"t", b"f"):
            raise RespError("bad boolean")
        return line == b"t", end
    if kind == b",":
        try:
            return float(line.decode("ascii")), end
        except (ValueError, UnicodeDecodeError):
            raise RespError("bad double") from None
    if kind == b"(":
        if not line.lstrip(b"-").isdigit():
            raise RespError("bad big number")
        return int(line), end
    if kind in (b"$", b"=", b"!"):
        n = _parse_int(line, "bulk")
        if n == -1 and kind == b"$":
            return None, end
        if n < 0 or n > lim.max_bulk:
            raise RespError("invalid bulk length")
        if len(buf) < end + n + 2:
            return None
        if buf[end + n:end + n + 2] != CRLF:
            raise RespError("expected CRLF after bulk")
        body = bytes(buf[end:end + n])
        if kind == b"=":
            body = body[4:] if len(body) >= 4 and body[3:4] == b":" else body
        if kind == b"!":
            return ReplyError(body.decode("utf-8", "replace")), end + n + 2
        return body, end + n + 2
    if kind in (b"*", b"%", b"~", b">", b"|"):
        n = _parse_int(line, "aggregate")
        if n == -1 and kind == b"*":
            return None, end
        if n < 0 or n > lim.max_args:
            raise RespError("invalid aggregate length")
        count = 2 * n if kind in (b"%", b"|") else n
        items: list[Any] = []
        p = end
        for _ in range(count):
            r = parse_reply(buf, p, lim, _depth + 1)
            if r is None:
                return None
            v, p = r
            items.append(v)
        if kind == b"|":  # attributes precede the real reply
            return parse_reply(buf, p, lim, _depth + 1)
        if kind == b"%":
            try:
                return dict(zip(items[::2], items[1::2], strict=True)), p
            except TypeError:
                return list(zip(items[::2], items[1::2], strict=True)), p
        if kind == b"~":
            try:
                return set(items), p
            except TypeError:
                return items, p
        if kind == b">":
            return Push(items), p
        return items, p
    raise RespError(f"unknown reply type {kind!r}")
