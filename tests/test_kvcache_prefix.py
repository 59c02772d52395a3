"""Prefix hashing (client/prefix.py): stable, chained, model/salt-scoped block keys."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from memkv.client import SyncClient
from memkv.client.prefix import PrefixHasher, load_chain, save_chain, token_bytes
from memkv.errors import InvalidArgument

TOKENS = list(range(1000, 1100))


def test_blocks_and_chain_property():
    h = PrefixHasher("llama-test", block_tokens=16)
    keys = h.block_keys(TOKENS)
    assert len(keys) == 100 // 16  # only full blocks
    assert all(len(k) == 16 for k in keys)
    assert len(set(keys)) == len(keys)
    # same prefix -> same leading keys; a change in block 3 changes keys 3.. only
    other = TOKENS[:50] + [7] + TOKENS[51:]
    k2 = h.block_keys(other)
    assert k2[:3] == keys[:3] and all(a != b for a, b in zip(k2[3:], keys[3:], strict=True))
    # extending a prompt keeps its keys
    assert h.block_keys(TOKENS + [1, 2, 3] * 20)[: len(keys)] == keys
    # inputs: list, numpy, torch-like 2D batch of one
    assert h.block_keys(np.array(TOKENS, dtype=np.int64)) == keys
    assert h.block_keys(np.array([TOKENS])) == keys


def test_scoping_by_model_salt_block_size_and_hash():
    base = PrefixHasher("m", block_tokens=16).block_keys(TOKENS)
    assert PrefixHasher("m2", block_tokens=16).block_keys(TOKENS)[0] != base[0]
    assert PrefixHasher("m", block_tokens=16, salt="tenant-a").block_keys(TOKENS)[0] != base[0]
    assert PrefixHasher("m", block_tokens=16, salt=b"tenant-a").block_keys(TOKENS)[0] == \
        PrefixHasher("m", block_tokens=16, salt="tenant-a").block_keys(TOKENS)[0]
    assert PrefixHasher("m", block_tokens=32).block_keys(TOKENS)[0] != base[0]
    b2 = PrefixHasher("m", block_tokens=16, hash="blake2b").block_keys(TOKENS)
    assert len(b2[0]) == 16 and b2[0] != base[0]


def test_lmcache_key_strings():
    h = PrefixHasher("meta-llama/Llama-3-8B", block_tokens=256, key_format="lmcache", world_size=2,
                     worker_id=1, dtype="bfloat16")
    keys = h.block_keys(list(range(600)))
    assert len(keys) == 2
    model, world, worker, digest, dtype = keys[0].decode().split("@")
    assert (model, world, worker, dtype) == ("meta-llama/Llama-3-8B", "2", "1", "bfloat16")
    assert bytes.fromhex(digest) == PrefixHasher("meta-llama/Llama-3-8B", block_tokens=256).block_keys(
        list(range(600)))[0]


def test_stable_across_processes():
    """Keys are the same in a fresh interpreter with another hash seed (never Python's hash())."""
    here = [k.hex() for k in PrefixHasher("m", block_tokens=16, salt="s").block_keys(TOKENS)]
    code = ("from memkv.client.prefix import PrefixHasher\n"
            f"print(','.join(k.hex() for k in PrefixHasher('m', block_tokens=16, salt='s').block_keys({TOKENS!r})))")
    for seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        assert out.stdout.strip().split(",") == here


def test_known_vector():
    """Pin the key derivation: changing it silently would orphan every stored cache."""
    assert token_bytes([1, 2]) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    k = PrefixHasher("m", block_tokens=4).block_keys([1, 2, 3, 4])[0]
    import struct

    import xxhash

    def lp(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    root = xxhash.xxh3_128(b"memkv-prefix-v1" + lp(b"m") + lp(b"") + struct.pack("<I", 4)).digest()
    assert k == xxhash.xxh3_128(root + b"\0" * 16 + token_bytes([1, 2, 3, 4])).digest()


def test_bad_arguments():
    with pytest.raises(InvalidArgument):
        PrefixHasher("m", block_tokens=0)
    with pytest.raises(InvalidArgument):
        PrefixHasher("m", hash="md5")
    with pytest.raises(InvalidArgument):
        PrefixHasher("m").block_keys([-1] * 16)


def test_save_and_load_chain_on_a_node(memkv_node):
    h = PrefixHasher("m", block_tokens=16)
    keys = h.block_keys(TOKENS)  # 6 blocks
    values = [bytes([i]) * 1000 for i in range(len(keys))]
    with SyncClient.connect(memkv_node.url) as c:
        assert save_chain(c, keys[:4], values[:4]) == 4
        assert save_chain(c, keys, values) == 2  # only the new tail is sent
        bufs = [bytearray(1000) for _ in keys]
        assert load_chain(c, keys, bufs) == 6
        assert [bytes(b) for b in bufs] == values
        other = h.block_keys(TOKENS[:40] + [0] * 60)
        assert load_chain(c, other, [bytearray(1000) for _ in other]) == 2
