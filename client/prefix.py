"""Prefix hashing: a prompt's token ids -> a chain of block keys (docs/engines.md).

A prompt is cut into blocks of ``block_tokens`` tokens (16 and 256 are common);
only full blocks get a key. Block key *i* is::

    key_i = H(root, key_{i-1}, token bytes of block i)
    root  = H("memkv-prefix-v1", model id, tenant salt, block_tokens)

so a key names the whole prefix up to and including its block: two prompts
share block key *i* exactly when they share their first ``(i+1)*B`` tokens
(same model, salt and block size). Token ids are hashed as little-endian
``uint32``; H is xxh3-128 (default) or blake2b-128. Both are stable across
processes, machines and Python versions; Python's ``hash()`` is never used.

``key_format="lmcache"`` turns each binary key into an LMCache-style string
``model@world_size@worker_id@hash@dtype`` (hash in hex), encoded as UTF-8.

:func:`save_chain` and :func:`load_chain` are the store side (blocking; the
operations themselves are ``client/core/chains.py``): a chain of blocks is
written with ``put_many(..., parents=...)`` so the node knows it is a chain
(it then evicts tails before heads); a read asks ``lookup_prefix`` (which
leases the leading blocks so they cannot be evicted before the fetch) and
fetches them with ``get_many_into`` into the caller's preallocated buffers.
Any object with the client surface (``SyncClient``, or an adapter such as the
Redis one in ``bench/``) works.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from memkv.client.core import chains
from memkv.client.core.chains import DirectSurface, run_direct
from memkv.client.sync_client import SyncClient
from memkv.errors import InvalidArgument

HASHES = ("xxh3", "blake2b")
KEY_FORMATS = ("binary", "lmcache")
DIGEST_SIZE = 16


def _h(algo: str, *parts: bytes) -> bytes:
    if algo == "xxh3":
        h = xxhash.xxh3_128()
    else:
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for p in parts:
        h.update(p)
    return h.digest()


def _lp(data: bytes) -> bytes:
    """Length-prefixed, so that ("ab", "c") and ("a", "bc") hash differently."""
    return struct.pack("<I", len(data)) + data


def token_bytes(token_ids: Any) -> bytes:
    """Token ids (list, tuple, numpy array, torch tensor) as little-endian uint32 bytes."""
    if hasattr(token_ids, "detach"):  # torch tensor
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise InvalidArgument(f"token ids must be one sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
        raise InvalidArgument("token ids must lie in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


@dataclass(frozen=True)
class PrefixHasher:
    """Computes the block-key chain of token sequences for one model (and tenant salt)."""

    model_id: str
    block_tokens: int = 16
    salt: bytes | str | None = None
    hash: str = "xxh3"
    key_format: str = "binary"
    world_size: int = 1
    worker_id: int = 0
    dtype: str = "float32"
    _root: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise InvalidArgument("block_tokens must be >= 1")
        if self.hash not in HASHES:
            raise InvalidArgument(f"hash must be one of {HASHES}")
        if self.key_format not in KEY_FORMATS:
            raise InvalidArgument(f"key_format must be one of {KEY_FORMATS}")
        if not self.model_id:
            raise InvalidArgument("model_id is required")
        salt = self.salt.encode() if isinstance(self.salt, str) else (self.salt or b"")
        root = _h(self.hash, b"memkv-prefix-v1", _lp(self.model_id.encode()), _lp(bytes(salt)),
                  struct.pack("<I", self.block_tokens))
        object.__setattr__(self, "_root", root)

    def n_blocks(self, n_tokens: int) -> int:
        return n_tokens // self.block_tokens

    def digests(self, token_ids: Any) -> list[bytes]:
        """The 16-byte chained digests of every full block."""
        data = token_bytes(token_ids)
        step = 4 * self.block_tokens
        out: list[bytes] = []
        prev = b"\0" * DIGEST_SIZE
        for i in range(len(data) // step):
            prev = _h(self.hash, self._root, prev, data[i * step:(i + 1) * step])
            out.append(prev)
        return out

    def format_key(self, digest: bytes) -> bytes:
        if self.key_format == "binary":
            return digest
        return f"{self.model_id}@{self.world_size}@{self.worker_id}@{digest.hex()}@{self.dtype}".encode()

    def block_keys(self, token_ids: Any) -> list[bytes]:
        """One key per full block of ``token_ids``, in order."""
        return [self.format_key(d) for d in self.digests(token_ids)]


def operations_of(client: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(store, run)`` for the chain operations of ``client/core/chains.py``: a ``SyncClient``
    runs them with its executor; any other object with the client surface runs them directly."""
    if isinstance(client, SyncClient):
        return client.core, client.execute
    return DirectSurface(client), run_direct


def save_chain(client: Any, keys: Sequence[bytes], values: Sequence[Any], *, namespace: str = "shared",
               ttl: float | None = None, skip_existing: bool = True) -> int:
    """Store ``values[i]`` under ``keys[i]`` as one chain (parent of key i is key i-1).

    Blocks that already exist are not sent again (another replica saved them,
    or this prompt extends a cached one); a concurrent writer of the same block
    (``KeyExists``) is not an error: that block is stored. Returns how many
    blocks were written.
    """
    if len(keys) != len(values):
        raise InvalidArgument("save_chain needs one value per key")
    store, run = operations_of(client)
    return run(chains.save_chain(store, keys, lambda todo: [values[i] for i in todo], namespace=namespace,
                                 ttl=ttl, skip_existing=skip_existing))


def load_chain(client: Any, keys: Sequence[bytes], buffers: Sequence[Any], *, namespace: str = "shared",
               lease: float = 10.0) -> int:
    """Fetch the longest cached leading run of ``keys`` into ``buffers``; its length.

    ``lookup_prefix`` leases the run so that eviction cannot take it between
    the lookup and the fetch. A block that still goes missing (node failure,
    checksum mismatch) shortens the run: blocks are used only up to the first
    hole, never past it.
    """
    store, run = operations_of(client)
    _n, got = run(chains.load_chain(store, keys, lambda n: buffers[:n], namespace=namespace, lease=lease))
    return chains.first_hole(got)
