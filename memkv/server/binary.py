"""The binary protocol's side of each operation: frame meta -> typed request -> reply.

Per opcode a decoder turns the frame's meta map (and payload length) into a
typed request (memkv/server/requests.py), checking every field's type
(``ProtocolError`` / ``InvalidArgument`` otherwise), and an encoder turns the
operation's typed result into the reply's meta map and payload buffers. What
runs in between is the node's pipeline, the same one RESP requests take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memkv.errors import ProtocolError
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.server.requests import (
    Auth,
    Call,
    Delete,
    Get,
    Hello,
    LookupPrefix,
    Peek,
    Pin,
    Ping,
    Put,
    ReportCorrupt,
    Request,
    Stats,
    Unpin,
)

Buffer = memoryview | bytes
Meta = dict[str, Any]


@dataclass
class Reply:
    meta: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)
    payload_len: int = 0


Decoder = Callable[[Meta, c.Limits, int], Request]
Encoder = Callable[[Request, Any], Reply]


def _ns(meta: Meta) -> str:
    return c.get_str(meta, "ns", "shared", 128)


# -- decoders ------------------------------------------------------------------------------
def decode_ping(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Ping()


def decode_hello(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Hello()


def decode_auth(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Auth(c.get_str(meta, "tenant", None, 128), c.get_key(meta, "cnonce"), c.get_key(meta, "proof"))


def decode_stats(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Stats()


def decode_get(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Get(_ns(meta), [c.get_key(meta, "k", limits)], meta.get("ep"))


def decode_get_many(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Get(_ns(meta), c.get_keys(meta, "ks", limits), meta.get("ep"))


def decode_exists_many(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Peek(_ns(meta), c.get_keys(meta, "ks", limits), meta.get("ep"), versions=c.get_bool(meta, "v"))


def decode_delete(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return _delete(meta, [c.get_key(meta, "k", limits)])


def decode_delete_many(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return _delete(meta, c.get_keys(meta, "ks", limits))


def _delete(meta: Meta, keys: list[bytes]) -> Delete:
    versions, _ = _versions(meta, len(keys))
    owner = meta.get("owner")
    return Delete(_ns(meta), keys, meta.get("ep"), versions=versions,
                  owner=None if owner is None else c.get_str(meta, "owner", None, 128))


def decode_pin(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Pin(_ns(meta), c.get_keys(meta, "ks", limits), c.get_opt_float(meta, "ttl"), meta.get("ep"))


def decode_unpin(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return Unpin(_ns(meta), c.get_keys(meta, "ks", limits), meta.get("ep"))


def decode_lookup_prefix(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    lease = c.get_opt_float(meta, "lease")
    return LookupPrefix(_ns(meta), c.get_keys(meta, "ks", limits), 5.0 if lease is None else lease, meta.get("ep"))


def decode_report_corrupt(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    return ReportCorrupt(_ns(meta), c.get_key(meta, "k", limits), c.get_int(meta, "gen"))


def _versions(meta: Meta, n: int) -> tuple[list[int] | None, bool]:
    """The writer's version per value: ``vers`` (one per key: read repairs and slot copies keep the
    versions they copy), else ``ver`` for all, else none (the store assigns them)."""
    if "vers" in meta:
        return c.get_ints(meta, "vers", n), True
    if "ver" in meta:
        return [c.get_int(meta, "ver")] * n, False
    return None, False


def _put(meta: Meta, keys: list[bytes], lengths: list[int], sums: list[int],
         parents: list[bytes | None] | None, single: bool) -> Put:
    versions, copies = _versions(meta, len(keys))
    model = meta.get("model")
    owner = meta.get("owner")
    return Put(_ns(meta), keys, lengths, list(sums), parents=parents, ttl=c.get_opt_float(meta, "ttl"),
               pin=c.get_bool(meta, "pin"), versions=versions, copies=copies,
               owner=None if owner is None else c.get_str(meta, "owner", None, 128),
               nostore=c.get_bool(meta, "nostore"),
               model=None if model is None else c.get_str(meta, "model", None, 256),
               cond="nx" if meta.get("nx") else None, epoch=meta.get("ep"), single=single)


def decode_put(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    parent = c.get_opt_bytes(meta, "parent", limits)
    return _put(meta, [c.get_key(meta, "k", limits)], [payload_len], [c.get_int(meta, "cs")],
                None if parent is None else [parent], True)


def decode_put_many(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
    keys = c.get_keys(meta, "ks", limits)
    lengths = c.get_ints(meta, "ls", len(keys))
    sums = c.get_ints(meta, "cs", len(keys))
    raw_parents = meta.get("parents")
    if raw_parents is None:
        parents = None
    elif isinstance(raw_parents, list) and len(raw_parents) == len(keys):
        parents = [None if p is None else c.get_key({"p": p}, "p", limits) for p in raw_parents]
    else:
        raise ProtocolError("field 'parents' must be a list as long as 'ks'")
    if sum(lengths) != payload_len:
        raise ProtocolError("value lengths do not add up to the payload length")
    return _put(meta, keys, lengths, sums, parents, False)


def decode_call(kind: str, access: Any) -> Decoder:
    """A registered operation's request: the meta map as sent (its handler reads it)."""

    def decode(meta: Meta, limits: c.Limits, payload_len: int) -> Request:
        return Call(kind, access, meta)

    return decode


# -- encoders ------------------------------------------------------------------------------
def encode_ping(req: Request, result: float) -> Reply:
    return Reply({"t": result})


def encode_hello(req: Request, result: tuple[bytes, bool, list[str]]) -> Reply:
    nonce, auth_required, workers = result
    return Reply({"nonce": nonce, "auth": auth_required, **({"workers": workers} if workers else {})})


def encode_auth(req: Request, result: bytes) -> Reply:
    return Reply({"proof": result})


def encode_stats(req: Request, result: dict[str, Any]) -> Reply:
    return Reply({"stats": result})


def _ow(meta: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    if overwrite:
        meta["ow"] = True  # replicas may disagree: cluster clients compare versions (client/ops.py)
    return meta


def encode_get(overwritable: Callable[[str], bool]) -> Encoder:
    def encode(req: Request, result: list[Any]) -> Reply:
        hit = result[0]
        if hit is None:
            tombs = req.tombs  # type: ignore[attr-defined]
            return Reply({"f": False} if tombs is None else {"f": False, "dv": tombs[0]})
        view, e = hit
        m = {"f": True, "cs": e.checksum, "gen": e.generation, "ver": e.version}
        return Reply(_ow(m, overwritable(req.ns)), [view], e.length)

    return encode


def encode_get_many(overwritable: Callable[[str], bool]) -> Encoder:
    def encode(req: Request, result: list[Any]) -> Reply:
        lens: list[int] = []
        sums: list[int] = []
        gens: list[int] = []
        vers: list[int] = []
        views: list[Buffer] = []
        total = 0
        for hit in result:
            if hit is None:
                lens.append(-1)
                sums.append(0)
                gens.append(0)
                vers.append(0)
                continue
            view, e = hit
            lens.append(e.length)
            sums.append(e.checksum)
            gens.append(e.generation)
            vers.append(e.version)
            views.append(view)
            total += e.length
        meta = {"ls": lens, "cs": sums, "gens": gens, "vers": vers}
        tombs = req.tombs  # type: ignore[attr-defined]
        if tombs is not None:  # misses of deleted keys: their tombstones' versions (0: none)
            meta["dvs"] = [tombs.get(i, 0) for i in range(len(result))]
        return Reply(_ow(meta, overwritable(req.ns)), views, total)

    return encode


def _all(meta: dict[str, Any], every_owner: bool) -> dict[str, Any]:
    if every_owner:
        meta["all"] = True  # acks = "all": acknowledged once every live owner has it (client/core/dispatch.py)
    return meta


def encode_delete(overwritable: Callable[[str], bool], every_owner: Callable[[str], bool]) -> Encoder:
    def encode(req: Request, result: list[bool]) -> Reply:
        # "ow" without "all": the client may skip an owner that failed
        return Reply(_all(_ow({"d": result[0]}, overwritable(req.ns)), every_owner(req.ns)))
    return encode


def encode_delete_many(req: Request, result: list[bool]) -> Reply:
    return Reply({"ds": result})


def encode_count(req: Request, result: int) -> Reply:
    return Reply({"n": result})


def encode_report_corrupt(req: Request, result: bool) -> Reply:
    return Reply({"dropped": result})


def encode_put(every_owner: Callable[[str], bool]) -> Encoder:
    def encode(req: Request, result: list[Any]) -> Reply:
        entry = result[0][0]
        meta = {"gen": 0, "ver": 0} if entry is None else {"gen": entry.generation, "ver": entry.version}
        return Reply(_all(meta, every_owner(req.ns)))

    return encode


def encode_put_many(every_owner: Callable[[str], bool]) -> Encoder:
    def encode(req: Request, result: list[Any]) -> Reply:
        gens: list[int] = []
        vers: list[int] = []
        errs: list[list[Any] | None] = []
        for entry, err, _old in result:
            gens.append(0 if entry is None else entry.generation)
            vers.append(0 if entry is None else entry.version)
            errs.append(None if err is None else [err.code, err.message])
        return Reply(_all({"gens": gens, "vers": vers, "errs": errs}, every_owner(req.ns)))

    return encode


def encode_reply(req: Request, result: Reply) -> Reply:
    return result


@dataclass(frozen=True)
class BinaryOp:
    """How the binary protocol serves one opcode."""

    kind: str
    decode: Decoder
    encode: Encoder


def core_ops(overwritable: Callable[[str], bool], every_owner: Callable[[str], bool]) -> dict[int, BinaryOp]:
    """The opcodes of the node's own operations. ``overwritable(ns)``, ``every_owner(ns)``: what the
    replies tell a cluster client of the namespace (``ow``: replicas may disagree; ``all``: a write
    needs every live owner)."""
    return {
        Op.PING: BinaryOp("PING", decode_ping, encode_ping),
        Op.HELLO: BinaryOp("HELLO", decode_hello, encode_hello),
        Op.AUTH: BinaryOp("AUTH", decode_auth, encode_auth),
        Op.STATS: BinaryOp("STATS", decode_stats, encode_stats),
        Op.GET: BinaryOp("GET", decode_get, encode_get(overwritable)),
        Op.GET_MANY: BinaryOp("GET", decode_get_many, encode_get_many(overwritable)),
        Op.EXISTS_MANY: BinaryOp("PEEK", decode_exists_many, encode_peek),
        Op.DELETE: BinaryOp("DELETE", decode_delete, encode_delete(overwritable, every_owner)),
        Op.DELETE_MANY: BinaryOp("DELETE", decode_delete_many, encode_delete_many),
        Op.PIN: BinaryOp("PIN", decode_pin, encode_count),
        Op.UNPIN: BinaryOp("UNPIN", decode_unpin, encode_count),
        Op.LOOKUP_PREFIX: BinaryOp("LOOKUP_PREFIX", decode_lookup_prefix, encode_count),
        Op.REPORT_CORRUPT: BinaryOp("REPORT_CORRUPT", decode_report_corrupt, encode_report_corrupt),
        Op.PUT: BinaryOp("PUT", decode_put, encode_put(every_owner)),
        Op.PUT_MANY: BinaryOp("PUT", decode_put_many, encode_put_many(every_owner)),
    }


def encode_peek(req: Request, result: list[Any]) -> Reply:
    """EXISTS_MANY: which keys exist; with ``v`` the version of each instead (0: absent) and, for
    absent keys that were deleted, their tombstones' versions (``dvs``), so that a cluster client can
    compare replicas without moving their values (client/core/repair.py)."""
    if req.versions:  # type: ignore[attr-defined]
        out: dict[str, Any] = {"vers": [0 if e is None else e.version for e in result]}
        tombs = req.tombs  # type: ignore[attr-defined]
        if tombs is not None:  # absent keys that were deleted: their tombstones' versions (0: none)
            out["dvs"] = [tombs.get(i, 0) for i in range(len(result))]
        return Reply(out)
    return Reply({"ex": [e is not None for e in result]})
