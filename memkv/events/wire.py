"""vLLM's KV-event wire format, byte for byte (vLLM 0.32, ``vllm/distributed/kv_events.py``).

A published message is three ZMQ frames::

    [topic (utf-8), seq (8-byte big-endian unsigned), payload]

and the payload is a msgpack ``EventBatch``: an array ``[ts, events]`` or
``[ts, events, data_parallel_rank]`` (``array_like``, trailing defaults
omitted). Each event is a msgpack *map* tagged with ``"type"`` (the class
name): ``BlockStored``, ``BlockRemoved`` or ``AllBlocksCleared``. The structs
below declare the same names, fields, order, defaults and msgspec options as
vLLM's, so vLLM's own ``msgspec.msgpack.Decoder(KVEventBatch)`` decodes what we
encode and we decode what vLLM publishes (tests/test_kv_events.py checks both
directions against the installed vLLM).

Replay protocol (vLLM's ``ZmqEventPublisher._service_replay``): a ROUTER socket;
a client (DEALER, or REQ for a single reply) sends ``[b"", start_seq]``; the
ROUTER answers every buffered batch with ``seq >= start_seq`` as
``[b"", topic, seq, payload]`` and ends with ``[b"", b"", END_SEQ, b""]`` where
``END_SEQ`` is -1 as a signed 8-byte big-endian integer. memkv accepts one
optional extra frame, ``[b"", start_seq, topic]``, to pick one of a node's
streams; the two-frame form serves the node's first stream, as vLLM's does.

memkv adds two requests of its own, both with a topic frame (vLLM's routers
never send either): a topic ending in ``*`` replays every stream whose topic
starts with what precedes it (a router learns all of a node's scopes with one
request), and the start ``RESYNC_SEQ`` asks the publisher to announce that
stream's contents again, live (``AllBlocksCleared`` in sequence, then a
``BlockStored`` for every block): what a router does when a replay cannot
reach back far enough (the buffer is bounded), so that it learns everything
instead of under-claiming forever. The reply to it is the end marker alone.

Block hashes (``ExternalBlockHash``) are ``bytes`` or ``int``: vLLM publishes
the low 64 bits of its 32-byte block hash as an unsigned int by default
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), the raw bytes otherwise.
:func:`external_block_hash` applies the same rule.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Media vLLM 0.32 itself publishes (vllm.distributed.kv_events.MEDIUM_*).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

# How memkv describes its blocks (docs/routing.md, "medium"): vLLM's own
# storage-tier medium, REMOTE relative to every engine, and "memkv" as the
# secondary-tier identifier (vLLM's ``ownership`` field).
STORE_MEDIUM = MEDIUM_STORAGE
STORE_LOCALITY = "REMOTE"
STORE_OWNERSHIP = "memkv"

END_SEQ = (-1).to_bytes(8, "big", signed=True)
SEQ_BYTES = 8
RESYNC_SEQ = (1 << 63) - 1  # replay "start" that asks for the stream's contents again (memkv only)

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    """Base of the three event kinds; the msgpack map carries ``type`` = class name."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: list[KVEvent]  # type: ignore[assignment]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


class WireError(ValueError):
    """A frame or payload that is not vLLM's KV-event format."""


def encode_batch(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"not a KV event batch: {exc}") from None


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def parse_seq(data: bytes) -> int:
    """A sequence frame as an int; END_SEQ reads as -1."""
    if len(data) != SEQ_BYTES:
        raise WireError(f"sequence frame of {len(data)} bytes, expected {SEQ_BYTES}")
    return int.from_bytes(data, "big", signed=True)


def pub_frames(topic: bytes, seq: int, payload: bytes) -> tuple[bytes, bytes, bytes]:
    return (topic, seq_bytes(seq), payload)


def parse_pub_frames(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """``[topic, seq, payload]`` -> (topic, seq, payload)."""
    if len(frames) != 3:
        raise WireError(f"published message of {len(frames)} frames, expected 3")
    topic, seq, payload = frames
    return topic, parse_seq(seq), payload


def replay_request(start_seq: int, topic: bytes | None = None) -> list[bytes]:
    """The frames a DEALER sends to ask for batches from ``start_seq`` on."""
    frames = [b"", seq_bytes(start_seq)]
    if topic is not None:
        frames.append(topic)
    return frames


def parse_replay_request(frames: list[bytes]) -> tuple[bytes, int, bytes | None]:
    """ROUTER side: ``[identity, b"", start_seq(, topic)]`` -> (identity, start_seq, topic)."""
    if len(frames) not in (3, 4) or frames[1] != b"":
        raise WireError(f"replay request of {len(frames)} frames")
    start = parse_seq(frames[2])
    if start < 0:
        raise WireError("negative replay start")
    return frames[0], start, frames[3] if len(frames) == 4 else None


def parse_replay_reply(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """DEALER side: ``[b"", topic, seq, payload]``; seq -1 marks the end of the replay."""
    if len(frames) != 4 or frames[0] != b"":
        raise WireError(f"replay reply of {len(frames)} frames")
    return frames[1], parse_seq(frames[2]), frames[3]


def external_block_hash(block_hash: bytes, *, as_int: bool = True) -> ExternalBlockHash:
    """An engine block hash as vLLM publishes it (``maybe_convert_block_hash``)."""
    if not as_int:
        return bytes(block_hash)
    return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)


def hash_key(h: ExternalBlockHash) -> int:
    """One key for both representations: the int vLLM would publish for these bytes."""
    if isinstance(h, int):
        return h & ((1 << 64) - 1)
    return int.from_bytes(h, "big") & ((1 << 64) - 1)


# -- topics of a memkv node's streams ------------------------------------------------
# A node publishes one *node stream*, topic ``BASE@NODE@``, and one stream per scope
# (model, namespace, tenant), topic ``BASE@NODE@MODEL@NAMESPACE@TENANT``, with "%" and
# "@" percent-escaped inside each part. The node stream is the publisher's default (vLLM's
# two-frame replay request serves it); its AllBlocksCleared (seq 0 of every start of the
# node) voids every claim the node made on any scope. A scope's tenant is empty unless the
# namespace keeps one key space per tenant. A router subscribing to ``BASE@NODE@`` (the
# node topic is also the prefix of every scope's) receives all of them and tells them apart.

Scope = tuple[str, str, str]  # (model, namespace, tenant)


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace("@", "%40")


def _unesc(part: str) -> str:
    return part.replace("%40", "@").replace("%25", "%")


def node_topic(base: str, node: str) -> str:
    """The node stream's topic, which is also the subscription prefix of all the node's streams."""
    return f"{_esc(base)}@{_esc(node)}@"


def store_topic(base: str, node: str, scope: Scope) -> str:
    model, namespace, tenant = scope
    return "@".join(_esc(p) for p in (base, node, model, namespace, tenant))


def parse_store_topic(topic: bytes | str) -> tuple[str, str, Scope | None]:
    """``BASE@NODE@`` -> (base, node, None); ``BASE@NODE@MODEL@NAMESPACE@TENANT`` -> (base, node, scope)."""
    text = topic.decode("utf-8") if isinstance(topic, bytes) else topic
    parts = text.split("@")
    if len(parts) == 3 and parts[2] == "":
        return _unesc(parts[0]), _unesc(parts[1]), None
    if len(parts) != 5:
        raise WireError(f"store topic {text!r} is neither BASE@NODE@ nor BASE@NODE@MODEL@NAMESPACE@TENANT")
    base, node, model, namespace, tenant = (_unesc(p) for p in parts)
    return base, node, (model, namespace, tenant)
