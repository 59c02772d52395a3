"""The self-describing header of engine KV blocks: what the vLLM connector writes, what a node reads.

The vLLM connector (client/vllm.py, client/vllm_block.py) stores each vLLM KV
block as one value: this header, then the block's pages. A node never needs
the header to store or serve a value; it reads it only to announce the block
in KV events (memkv/events/): the engine's block hash, its parent's, the
block's token ids, its size, the model and the LoRA adapter are all here, so
every copy of the value (a replica, a slot migration, a read repair, the
flash log a restarted node recovers from) carries them with it. The format is
shared by both ends through this module::

    offset 0   b"MKVV"                       magic
           4   u16 FORMAT_VERSION
           6   u16 0                          reserved
           8   u32 H                          header length: the payload starts at H (multiple of 256)
          12   u32 M                          length of the msgpack map that follows
          16   msgpack map (M bytes), zero padding up to H:
                 "block_hash":  bytes         the engine's hash of this block (vLLM: 32 bytes)
                 "parent_hash": bytes | nil   the previous block's (nil for a prompt's first block)
                 "hash_algo":   str           vLLM's prefix_caching_hash_algo ("sha256", ...)
                 "index":       int           position of the block in its prompt (0-based)
                 "tokens":      int           tokens per block
                 "token_ids":   [int]         the block's token ids (what routers that hash tokens need)
                 "model":       str           model id
                 "lora":        str | nil     LoRA adapter name
                 ... and what the writer adds for itself (the vLLM connector: page layout)

:func:`read_block` is strict: anything that is not a well-formed header of
this version is "not a block" (``None``), never an error, because a node looks
at values of every kind and must never fail a write over one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"MKVV"
FORMAT_VERSION = 2  # 2: "token_ids" in the map (1 had none)
PREFIX = struct.Struct("<4sHHII")
HEADER_ALIGN = 256
MAX_HEADER = 64 << 10  # a header longer than this is not one of ours


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a node announces of one stored engine block."""

    block_hash: bytes
    parent_hash: bytes | None
    block_size: int
    token_ids: tuple[int, ...]
    model: str
    lora: str | None
    hash_algo: str
    index: int


def pack(meta: dict[str, Any], header_len: int) -> bytes:
    """The header bytes for ``meta`` (msgpack map), padded to ``header_len``."""
    body = msgpack.packb(meta, use_bin_type=True)
    raw = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, header_len, len(body)) + body
    if len(raw) > header_len:
        raise ValueError(f"block header of {len(raw)} bytes exceeds {header_len}")
    return raw.ljust(header_len, b"\0")


def header_length(meta_len: int) -> int:
    """The aligned header length that holds a map of ``meta_len`` bytes."""
    return -(-(PREFIX.size + meta_len) // HEADER_ALIGN) * HEADER_ALIGN


def prefix_of(value: Any) -> tuple[bytes, int, int, int] | None:
    """(magic, version, header length, map length) of a value's first bytes, None if too short."""
    if len(value) < PREFIX.size:
        return None
    magic, version, _, hlen, mlen = PREFIX.unpack(bytes(value[:PREFIX.size]))
    return magic, version, hlen, mlen


def unpack_map(value: Any, mlen: int) -> dict[str, Any]:
    """The header's msgpack map (raises ValueError / msgpack errors on garbage)."""
    meta = msgpack.unpackb(bytes(value[PREFIX.size:PREFIX.size + mlen]), raw=False)
    if not isinstance(meta, dict):
        raise ValueError("block header map is not a map")
    return meta


def read_block(value: Any) -> BlockHeader | None:
    """The block a value describes, or None when the value is not a block header of this format.

    ``value`` is any buffer holding at least the header (a region view, the
    first bytes read back from flash).
    """
    if len(value) < PREFIX.size or bytes(value[:4]) != MAGIC:
        return None
    _, version, _, hlen, mlen = PREFIX.unpack(bytes(value[:PREFIX.size]))
    if version != FORMAT_VERSION or hlen > MAX_HEADER or PREFIX.size + mlen > hlen or hlen > len(value):
        return None
    try:
        meta = unpack_map(value, mlen)
    except Exception:  # noqa: BLE001 - any garbage means "not a block"
        return None
    block_hash, parent = meta.get("block_hash"), meta.get("parent_hash")
    size, tokens, model, lora = meta.get("tokens"), meta.get("token_ids", ()), meta.get("model"), meta.get("lora")
    algo, index = meta.get("hash_algo", ""), meta.get("index", 0)
    if (not isinstance(block_hash, bytes) or not block_hash or not (parent is None or isinstance(parent, bytes))
            or not isinstance(size, int) or size <= 0 or not isinstance(model, str)
            or not (lora is None or isinstance(lora, str)) or not isinstance(algo, str)
            or not isinstance(index, int) or not isinstance(tokens, list | tuple)
            or not all(isinstance(t, int) for t in tokens) or len(tokens) not in (0, size)):
        return None
    return BlockHeader(block_hash, parent, size, tuple(tokens), model, lora, algo, index)
