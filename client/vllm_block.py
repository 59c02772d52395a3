"""What one vLLM KV block is in memkv: its key, and the self-describing value that holds it.

The vLLM connector (client/vllm.py) stores one memkv value per vLLM KV-cache
block of one worker (tensor/pipeline rank): a header, then that block's page of
every attention layer, copied whole. Pages are never split into tokens: inside
a page K and V are packed in a layout that depends on the attention backend,
the dtype and, on CPUs, the instruction set vLLM's kernel picked (``vec``,
``amx``, ``neon``, ...) — so two machines of the same model can hold different
bytes for the same tokens.

Identity
--------
``block_key = xxh3-128("memkv-vllm-v1", model id, layout fingerprint, LoRA, cache_salt, vLLM block hash)``

* the **vLLM block hash** is the engine's own chained hash of the block's
  tokens and of every token before it (``Request.block_hashes``; it already
  covers LoRA, ``cache_salt`` and multimodal inputs, which are mixed in again
  so the key does not depend on that detail of vLLM);
* the **layout fingerprint** is xxh3-128 of :class:`PageLayout`'s descriptor
  (backend, ISA, dtype, cache dtype, page shape, block size, layers, ranks,
  vLLM version): a machine whose kernel packs pages differently computes other
  keys, so it never even finds — let alone loads — another machine's pages;
* requests with different ``cache_salt`` never share a key.

Value (format version 2)
------------------------
A header (memkv/protocol/block_header.py: magic, version, lengths, a msgpack
map with vLLM's block hash and parent hash, the block's token ids, position,
block size, model, LoRA), to which this connector adds ``layout`` (the
fingerprint), ``layout_desc`` (the descriptor itself, human-readable),
``pages`` and ``page_bytes``; then the payload: one page per attention layer,
in the layout's layer order. The node reads the same header to announce the
block in KV events (memkv/events/), so every copy of the value carries what
routers need to know about it.

The header holds no time, host or writer identity: two engines that compute
the same bytes store the same value, and memkv's "same bytes again" rule makes
the second write a no-op. (Two engines whose float results differ write
different bytes: the first writer wins, the second gets ``KeyExists``, which
the connector counts and ignores — either copy is the KV of exactly those
tokens in exactly this layout.)

Before a loaded value is used, :meth:`BlockFormat.check` compares its length,
magic, version, layout fingerprint, model and block hash with what this worker
expects; any difference is a load failure (the tokens are recomputed), never
silently used KV.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from memkv.protocol.block_header import FORMAT_VERSION, MAGIC, PREFIX, header_length, pack, prefix_of, unpack_map

# The format version is part of the key: values of another format are never even found.
KEY_DOMAIN = b"memkv-vllm-v%d" % FORMAT_VERSION


class BlockMismatch(Exception):
    """A loaded value is not the block this worker asked for (reason in the message)."""


def _lp(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _canonical(obj: Any) -> bytes:
    """msgpack with sorted map keys: the same descriptor always gives the same bytes."""
    if isinstance(obj, dict):
        return msgpack.packb({k: msgpack.unpackb(_canonical(obj[k]), raw=False) for k in sorted(obj)},
                             use_bin_type=True)
    return msgpack.packb(obj, use_bin_type=True)


@dataclass(frozen=True)
class PageLayout:
    """How one worker's KV cache pages look; equal descriptors mean interchangeable pages."""

    backend: str  # attention backend name, e.g. "CPU_ATTN", "FLASH_ATTN"
    isa: str  # the CPU kernel's instruction set ("vec", "amx", ...), "" on GPUs
    dtype: str  # torch dtype of the cache tensor, e.g. "float32"
    cache_dtype: str  # vLLM cache_dtype ("auto", "fp8", ...)
    page_shape: tuple[int, ...]  # one layer's page of one vLLM block (block dimension removed)
    block_dim: int  # which dimension of a layer's cache tensor indexes blocks
    pages_per_block: int  # kernel blocks per vLLM block (1 unless the kernel splits blocks)
    block_tokens: int
    layers: int
    itemsize: int
    tp: tuple[int, int]  # (rank, size)
    pp: tuple[int, int]
    engine: str  # e.g. "vllm-0.32.0"

    @property
    def page_bytes(self) -> int:
        n = self.itemsize * self.pages_per_block
        for d in self.page_shape:
            n *= d
        return n

    @property
    def payload_bytes(self) -> int:
        return self.layers * self.page_bytes

    def descriptor(self) -> dict[str, Any]:
        return {"backend": self.backend, "isa": self.isa, "dtype": self.dtype, "cache_dtype": self.cache_dtype,
                "page_shape": list(self.page_shape), "block_dim": self.block_dim,
                "pages_per_block": self.pages_per_block, "block_tokens": self.block_tokens,
                "layers": self.layers, "tp": list(self.tp), "pp": list(self.pp), "engine": self.engine}

    @property
    def fingerprint(self) -> bytes:
        return xxhash.xxh3_128(_canonical(self.descriptor())).digest()

    def describe(self) -> str:
        isa = f"/{self.isa}" if self.isa else ""
        return (f"{self.backend}{isa} {self.dtype} ({self.cache_dtype}), {self.layers} layers x page "
                f"{list(self.page_shape)}, {self.block_tokens} tokens/block, tp {self.tp[0]}/{self.tp[1]} "
                f"pp {self.pp[0]}/{self.pp[1]}, {self.engine}")


def block_key(*, model_id: str, layout_fp: bytes, lora: str | None, salt: str | None, block_hash: bytes) -> bytes:
    """The memkv key of one vLLM block of one worker (16 bytes)."""
    h = xxhash.xxh3_128()
    for part in (KEY_DOMAIN, model_id.encode(), layout_fp, (lora or "").encode(), (salt or "").encode(),
                 bytes(block_hash)):
        h.update(_lp(part))
    return h.digest()


class BlockFormat:
    """Packs and checks the header of one layout's block values (all of the same length)."""

    def __init__(self, layout: PageLayout, *, model_id: str, hash_algo: str, hash_len: int) -> None:
        self.layout = layout
        self.model_id = model_id
        self.hash_algo = hash_algo
        self.layout_fp = layout.fingerprint
        # Header length fixed per layout: computed from the largest map it will hold.
        widest = self._meta(b"\xff" * hash_len, b"\xff" * hash_len, 2**32 - 1, "\xff" * 256,
                            [2**32 - 1] * layout.block_tokens)
        self.header_len = header_length(len(msgpack.packb(widest, use_bin_type=True)))
        self.value_len = self.header_len + layout.payload_bytes

    def _meta(self, block_hash: bytes, parent_hash: bytes | None, index: int, lora: str | None,
              token_ids: list[int]) -> dict[str, Any]:
        lay = self.layout
        return {"block_hash": bytes(block_hash), "parent_hash": bytes(parent_hash) if parent_hash is not None else None,
                "hash_algo": self.hash_algo, "index": index, "tokens": lay.block_tokens,
                "token_ids": [int(t) for t in token_ids], "model": self.model_id, "lora": lora,
                "layout": self.layout_fp, "layout_desc": lay.descriptor(), "pages": lay.layers,
                "page_bytes": lay.page_bytes}

    def header(self, *, block_hash: bytes, parent_hash: bytes | None, index: int, lora: str | None,
               token_ids: list[int]) -> bytes:
        if len(token_ids) != self.layout.block_tokens:
            raise ValueError(f"a block of {self.layout.block_tokens} tokens, not {len(token_ids)}")
        return pack(self._meta(block_hash, parent_hash, index, lora, token_ids), self.header_len)

    def check(self, value: Any, length: int | None, *, block_hash: bytes) -> None:
        """Raise :class:`BlockMismatch` unless ``value`` (``length`` bytes read) is this block in this layout."""
        if length is None:
            raise BlockMismatch("not in memkv (evicted, lost with a node, or dropped as corrupt)")
        if length != self.value_len:
            raise BlockMismatch(f"value of {length} bytes, this layout's blocks have {self.value_len}")
        magic, version, hlen, mlen = prefix_of(value) or (b"", 0, 0, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise BlockMismatch(f"not a memkv vLLM block of format {FORMAT_VERSION} (magic {magic!r}, v{version})")
        if hlen != self.header_len or PREFIX.size + mlen > hlen:
            raise BlockMismatch(f"header of {hlen} bytes, this layout's is {self.header_len}")
        try:
            meta = unpack_map(value, mlen)
        except Exception as exc:
            raise BlockMismatch(f"unreadable header: {exc}") from exc
        if meta.get("layout") != self.layout_fp:
            raise BlockMismatch(f"saved with KV layout {meta.get('layout_desc')}, this worker's is "
                                f"{self.layout.descriptor()}")
        if meta.get("model") != self.model_id:
            raise BlockMismatch(f"saved for model {meta.get('model')!r}, not {self.model_id!r}")
        if meta.get("block_hash") != bytes(block_hash):
            raise BlockMismatch("holds another block (its vLLM block hash differs)")


def read_header(value: Any) -> dict[str, Any]:
    """The header map of a stored block (for tools and tests); raises ``BlockMismatch`` if there is none."""
    magic, version, hlen, mlen = prefix_of(value) or (b"", 0, 0, 0)
    if magic != MAGIC:
        raise BlockMismatch(f"not a memkv vLLM block (magic {magic!r})")
    meta = unpack_map(value, mlen)
    meta["format_version"] = version
    meta["header_len"] = hlen
    return meta
