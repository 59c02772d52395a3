"""One request and its reply, as sans-IO objects: what to send, where the reply payload goes, what to return.

A ``Call`` never touches a socket. The connection protocol
(``client/core/protocol.py``) encodes ``op``/``meta``/``payload``, asks
``destinations(frame)`` where the reply payload goes (the caller's buffer,
or a fresh ``bytes`` filled in place) and hands the finished reply to
``finish``, which turns it into the caller's result and checks its checksum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memkv.client.buffers import byte_view, finish_bytes, new_bytes
from memkv.errors import InvalidArgument, MemKVError, error_from_code
from memkv.protocol.checksum import STREAM_MIN, Checksummer, checksum
from memkv.protocol.codec import Frame
from memkv.protocol.opcodes import Op
from memkv.protocol.versions import CLOCK


@dataclass
class CorruptRead:
    """A value whose bytes did not match its checksum: a miss, to be reported."""

    key: bytes
    generation: int


class Call:
    op: Op = Op.PING
    meta: dict[str, Any]
    payload: list[memoryview]
    payload_len: int = 0
    # set by ``destinations``: the connection calls ``landed`` with each piece of payload it receives
    watches_payload = False
    # a write: a reply said it needs every live owner of its slot (``all``: the namespace's acks)
    every_owner = False

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta = meta or {}
        self.payload = []
        self.corrupt: list[CorruptRead] = []

    def destinations(self, frame: Frame) -> list[memoryview]:
        """Where the reply payload goes, in order; must cover ``frame.payload_len`` bytes."""
        return [memoryview(bytearray(frame.payload_len))]

    def landed(self, index: int, piece: memoryview) -> None:
        """``piece`` of destination ``index`` was just received (in order); only when ``watches_payload``."""


def _summers(lengths: list[int]) -> list[Checksummer | None]:
    """Per destination, a running checksum when the value is large enough to hash as it arrives."""
    return [Checksummer() if n >= STREAM_MIN else None for n in lengths]


def _sum_of(summer: Checksummer | None, dest: memoryview) -> int:
    return checksum(dest) if summer is None else summer.value()

    def finish(self, frame: Frame, dests: list[memoryview]) -> Any:
        return frame.meta


class SimpleCall(Call):
    def __init__(self, op: Op, meta: dict[str, Any], result_field: str | None = None) -> None:
        super().__init__(meta)
        self.op = op
        self.result_field = result_field

    def finish(self, frame: Frame, dests: list[memoryview]) -> Any:
        return frame.meta.get(self.result_field) if self.result_field else frame.meta


class DeleteCall(SimpleCall):
    """A versioned delete of one key; the reply's ``{"d": removed, ...}`` meta is the result."""

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__(Op.DELETE, meta)

    def finish(self, frame: Frame, dests: list[memoryview]) -> Any:
        # every live owner must have the tombstone where the namespace's acks say so ("all"); a
        # write-once namespace's rule (every owner the map names) is ``ops.every_owner``
        self.every_owner = bool(frame.meta.get("all"))
        return frame.meta


class RelayCall(SimpleCall):
    """Ask an owner that stored a write to hand it on to the owners at ``to`` (memkv/cluster/relay.py):
    the write's keys, each with its version (the relaying owner sends what it holds at least that new)."""

    def __init__(self, ns: str | None, keys: list[bytes], versions: list[int], to: list[str]) -> None:
        meta: dict[str, Any] = {"ks": keys, "vers": versions, "to": to}
        if ns is not None:
            meta["ns"] = ns
        super().__init__(Op.RELAY, meta, "n")

    @classmethod
    def of(cls, call: Call, result: Any, to: list[str]) -> RelayCall | None:
        """The relay of ``call`` (a put, put-many or delete) whose reply on the relaying owner was
        ``result``: the keys it stored (a put-many's per-key errors are the caller's); None: none."""
        m = call.meta
        keys = list(m["ks"]) if "ks" in m else [m["k"]]
        versions = [int(v) for v in m["vers"]] if "vers" in m else [int(m["ver"])] * len(keys)
        if isinstance(result, list):
            kept = [i for i, r in enumerate(result) if not isinstance(r, MemKVError)]
            keys, versions = [keys[i] for i in kept], [versions[i] for i in kept]
        return cls(m.get("ns"), keys, versions, to) if keys else None


def _with_ns(meta: dict[str, Any], namespace: str) -> dict[str, Any]:
    if namespace != "shared":
        meta["ns"] = namespace
    return meta


class PutCall(Call):
    op = Op.PUT

    def __init__(self, key: bytes, value: Any, *, namespace: str, ttl: float | None, pin: bool,
                 parent: bytes | None = None, extra: dict[str, Any] | None = None) -> None:
        view = byte_view(value)
        meta: dict[str, Any] = {"k": key, "cs": checksum(view)}
        if extra:  # security options: "model", "nostore"
            meta.update(extra)
        if "ver" not in meta:
            # the write's version, the same on every replica (memkv/protocol/versions.py)
            meta["ver"] = CLOCK.next()
        if ttl is not None:
            meta["ttl"] = ttl
        if pin:
            meta["pin"] = True
        if parent is not None:
            meta["parent"] = parent
        super().__init__(_with_ns(meta, namespace))
        self.payload = [view]
        self.payload_len = view.nbytes

    def finish(self, frame: Frame, dests: list[memoryview]) -> int:
        CLOCK.observe(int(frame.meta.get("ver", 0)))
        self.every_owner = bool(frame.meta.get("all"))
        return int(frame.meta.get("gen", 0))


class PutManyCall(Call):
    op = Op.PUT_MANY

    def __init__(self, keys: list[bytes], values: list[Any], *, namespace: str, ttl: float | None,
                 pin: bool, parents: list[bytes | None] | None = None, extra: dict[str, Any] | None = None) -> None:
        views = [byte_view(v) for v in values]
        meta: dict[str, Any] = {"ks": keys, "ls": [v.nbytes for v in views],
                                "cs": [checksum(v) for v in views]}
        if extra:  # security options: "model", "nostore"; "vers" (repairs, copies)
            meta.update(extra)
        if "ver" not in meta and "vers" not in meta:
            meta["ver"] = CLOCK.next()
        if ttl is not None:
            meta["ttl"] = ttl
        if pin:
            meta["pin"] = True
        if parents is not None and any(p is not None for p in parents):
            meta["parents"] = parents
        super().__init__(_with_ns(meta, namespace))
        self.payload = views
        self.payload_len = sum(v.nbytes for v in views)

    def finish(self, frame: Frame, dests: list[memoryview]) -> list[Any]:
        """Per item: the generation (int) or the typed error, in request order."""
        errs = frame.meta.get("errs") or [None] * len(frame.meta.get("gens", []))
        self.every_owner = bool(frame.meta.get("all"))
        vers = frame.meta.get("vers")
        if vers:
            CLOCK.observe(max(vers))
        out: list[Any] = []
        for gen, err in zip(frame.meta.get("gens", []), errs, strict=False):
            out.append(error_from_code(err[0], err[1]) if err else gen)
        return out


class GetCall(Call):
    op = Op.GET

    def __init__(self, key: bytes, *, namespace: str, into: Any = None) -> None:
        super().__init__(_with_ns({"k": key}, namespace))
        self.key = key
        self.into = byte_view(into, writable=True) if into is not None else None
        self.version = 0  # of the value returned (0: a miss)
        self.tomb = 0  # of a miss: the version of the key's tombstone on that node (0: none)
        self.overwrite = False  # the namespace allows overwrites: replicas may disagree (client/core/repair.py)
        self.too_small = 0  # size of a value the caller's buffer could not hold
        self._buf: bytes | bytearray = b""
        self._sums: list[Checksummer | None] = [None]

    def destinations(self, frame: Frame) -> list[memoryview]:
        n = frame.payload_len
        self.too_small = 0
        self._sums = _summers([n])
        self.watches_payload = self._sums[0] is not None
        if self.into is None:
            self._buf, view = new_bytes(n)
            return [view]
        if self.into.nbytes < n:
            self.too_small = n
            self.watches_payload = False
            return [memoryview(bytearray(n))]  # drain it; finish() raises
        return [self.into[:n]]

    def landed(self, index: int, piece: memoryview) -> None:
        self._sums[index].update(piece)  # type: ignore[union-attr]

    def finish(self, frame: Frame, dests: list[memoryview]) -> Any:
        meta = frame.meta
        self.overwrite = bool(meta.get("ow"))
        if not meta.get("f"):
            self.version = 0
            self.tomb = int(meta.get("dv", 0))
            return None
        self.tomb = 0
        self.version = int(meta.get("ver", 0))
        CLOCK.observe(self.version)
        if self.too_small:
            raise InvalidArgument(f"buffer of {self.into.nbytes if self.into else 0} bytes is too small "
                                  f"for a value of {self.too_small} bytes")
        if not dests:  # an empty value: the connection asked for no destination
            dests = [memoryview(b"")]
        if _sum_of(self._sums[0] if frame.payload_len else None, dests[0]) != frame.meta.get("cs"):
            self.corrupt.append(CorruptRead(self.key, int(frame.meta.get("gen", 0))))
            self.version = 0
            return None
        if self.into is None:
            return finish_bytes(self._buf) if frame.payload_len else b""
        return frame.payload_len


class GetManyCall(Call):
    op = Op.GET_MANY

    def __init__(self, keys: list[bytes], *, namespace: str, intos: list[Any] | None = None) -> None:
        super().__init__(_with_ns({"ks": keys}, namespace))
        self.keys = keys
        if intos is not None and len(intos) != len(keys):
            raise InvalidArgument("get_many_into needs one buffer per key")
        self.intos = [byte_view(b, writable=True) for b in intos] if intos is not None else None
        self.too_small: list[int] = []
        self.versions: list[int] = []  # per key, of the value returned (0: a miss)
        self.tombs: list[int] = []  # per key, of a miss: its tombstone's version on that node (0: none)
        self.overwrite = False
        self._bufs: list[bytes | bytearray] = []
        self._sums: list[Checksummer | None] = []

    def destinations(self, frame: Frame) -> list[memoryview]:
        dests: list[memoryview] = []
        self._bufs = []
        self.too_small = []
        lens = frame.meta.get("ls", [])
        self._sums = _summers([n for n in lens if n >= 0])
        self.watches_payload = any(s is not None for s in self._sums)
        for i, n in enumerate(lens):
            if n < 0:
                continue
            if self.intos is None:
                buf, view = new_bytes(n)
                self._bufs.append(buf)
                dests.append(view)
            elif self.intos[i].nbytes < n:
                self.too_small.append(i)
                dests.append(memoryview(bytearray(n)))
            else:
                dests.append(self.intos[i][:n])
        return dests

    def landed(self, index: int, piece: memoryview) -> None:
        summer = self._sums[index]
        if summer is not None:
            summer.update(piece)

    def finish(self, frame: Frame, dests: list[memoryview]) -> list[Any]:
        lens = frame.meta.get("ls", [])
        sums = frame.meta.get("cs", [])
        gens = frame.meta.get("gens", [])
        self.versions = list(frame.meta.get("vers") or [0] * len(lens))
        self.tombs = list(frame.meta.get("dvs") or [0] * len(lens))
        self.overwrite = bool(frame.meta.get("ow"))
        if not frame.payload_len:  # no destinations were asked for: nothing of an earlier attempt counts
            self._bufs, self.too_small, self._sums = [], [], []
        if self.versions:
            CLOCK.observe(max(self.versions))
        if self.too_small:
            raise InvalidArgument(f"buffers too small for keys at positions {self.too_small}")
        out: list[Any] = []
        j = 0
        for i, n in enumerate(lens):
            if n < 0:
                out.append(None)
                continue
            dest = dests[j] if j < len(dests) else memoryview(b"")  # no payload at all: empty values
            summer = self._sums[j] if j < len(self._sums) else None
            j += 1
            if _sum_of(summer, dest) != sums[i]:
                self.corrupt.append(CorruptRead(self.keys[i], int(gens[i])))
                self.versions[i] = 0
                out.append(None)
            elif self.intos is None:
                out.append(finish_bytes(self._bufs[j - 1]) if j - 1 < len(self._bufs) else bytes(dest))
            else:
                out.append(n)
        return out
