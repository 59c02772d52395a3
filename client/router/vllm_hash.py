"""vLLM's prefix-cache block hashes, computed from token ids exactly as vLLM 0.32 does.

vLLM (``vllm/v1/core/kv_cache_utils.py``) hashes each *full* block of
``block_size`` tokens as::

    hash_i = H((hash_{i-1} or NONE_HASH, tuple(block_i_token_ids), extra_keys_i))
    NONE_HASH = H(seed)        # seed: PYTHONHASHSEED if set, else "vllm-none-hash"

``H`` is ``prefix_caching_hash_algo``: ``sha256`` (the default: SHA-256 of the
pickle of that tuple, highest protocol), ``sha256_cbor`` (SHA-256 of canonical
CBOR), ``xxhash`` / ``xxhash_cbor`` (xxh3-128; vLLM seeds these with random
bytes per process unless PYTHONHASHSEED is set, so a router can match them
only with that seed). ``extra_keys_i`` is a tuple or None: the LoRA key
``("lora", name, path)`` on every block of a LoRA request, then, on block 0
only, ``("cache_salt", salt)``. Multi-modal and prompt-embedding keys are not
computed here (such prompts are routed on load alone).

KV events carry the low 64 bits of each hash as an unsigned int (default
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``); :meth:`BlockHasher.chain` returns
those ints (:func:`memkv.events.wire.hash_key` maps either representation to
them). tests/test_router_index.py checks this against vLLM's own functions.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from memkv.events.wire import hash_key

DEFAULT_SEED = "vllm-none-hash"
ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")


def _cbor(obj: Any) -> bytes:
    import cbor2  # a vLLM dependency; only needed for the *_cbor algorithms

    return cbor2.dumps(obj, canonical=True)


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def hash_function(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return lambda obj: hashlib.sha256(_pickle(obj)).digest()
    if algo == "sha256_cbor":
        return lambda obj: hashlib.sha256(_cbor(obj)).digest()
    if algo == "xxhash":
        return lambda obj: xxhash.xxh3_128_digest(_pickle(obj))
    if algo == "xxhash_cbor":
        return lambda obj: xxhash.xxh3_128_digest(_cbor(obj))
    raise ValueError(f"unknown prefix_caching_hash_algo {algo!r} (one of {', '.join(ALGORITHMS)})")


class BlockHasher:
    """Block-hash chains of prompts, as one vLLM configuration computes them."""

    def __init__(self, algo: str = "sha256", *, seed: str | None = None) -> None:
        self._fn = hash_function(algo)
        if seed is None:
            seed = os.environ.get("PYTHONHASHSEED")
        if seed is None:
            if algo.startswith("xxhash"):
                raise ValueError("vLLM seeds xxhash block hashes randomly unless PYTHONHASHSEED is set: "
                                 "pass the engines' PYTHONHASHSEED as seed")
            seed = DEFAULT_SEED
        self.algo = algo
        self.none_hash = self._fn(seed)

    def chain_bytes(self, token_ids: Sequence[int], block_size: int, *, cache_salt: str | None = None,
                    lora: tuple[str, str] | None = None) -> list[bytes]:
        """The full 32/16-byte hashes of every full block of ``token_ids``."""
        if block_size < 1:
            raise ValueError("block_size must be positive")
        lora_keys: list[tuple[str, ...]] = [("lora", lora[0], lora[1])] if lora else []
        parent = self.none_hash
        out: list[bytes] = []
        for i in range(len(token_ids) // block_size):
            keys = list(lora_keys)
            if i == 0 and cache_salt:
                keys.append(("cache_salt", cache_salt))
            block = tuple(int(t) for t in token_ids[i * block_size:(i + 1) * block_size])
            parent = self._fn((parent, block, tuple(keys) if keys else None))
            out.append(parent)
        return out

    def chain(self, token_ids: Sequence[int], block_size: int, *, cache_salt: str | None = None,
              lora: tuple[str, str] | None = None) -> list[int]:
        """The block hashes of ``token_ids`` as vLLM's KV events carry them (64-bit ints)."""
        return [hash_key(h) for h in self.chain_bytes(token_ids, block_size, cache_salt=cache_salt, lora=lora)]
