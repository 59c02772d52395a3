"""KVCacheConnector (client/kvcache.py) with a small seeded Llama model and a real node process.

No downloads: the model is built from a config with random weights (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memkv.client import Client, SyncClient  # noqa: E402
from memkv.client.kvcache import (  # noqa: E402
    HEADER_LEN,
    AsyncKVCacheConnector,
    KVCacheConnector,
    KVLayout,
    greedy_generate,
    prefill,
)
from memkv.errors import KVLayoutMismatch, MemKVError  # noqa: E402

MODEL_ID = "test/tiny-llama"


def tiny_config(**over):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    kw.update(over)
    return transformers.LlamaConfig(**kw)


def tiny_model(seed: int = 0, **over):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(**over)).eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_greedy_decoding_identical_with_and_without_memkv(model, memkv_node):
    ids = prompt(75)
    ref_tokens, ref_logits, _ = greedy_generate(model, ids, 12)
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, MODEL_ID, block_tokens=16)
        # replica A: cold, computes and saves
        t_a, _, pre_a = greedy_generate(model, ids, 12, conn)
        assert pre_a.cached_tokens == 0 and pre_a.saved_blocks == 75 // 16
        # replica B: a fresh connector and client, loads 64 of 75 tokens, prefills 11
        with SyncClient.connect(memkv_node.url) as c2:
            conn_b = KVCacheConnector(c2, MODEL_ID, block_tokens=16)
            t_b, logits_b, pre_b = greedy_generate(model, ids, 12, conn_b)
    assert pre_b.cached_tokens == 64 and pre_b.computed_tokens == 11
    assert t_a == ref_tokens and t_b == ref_tokens
    for a, b in zip(ref_logits, logits_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_multi_turn_resume_and_exact_block_multiple(model, memkv_node):
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, MODEL_ID, block_tokens=16)
        turn1 = prompt(48, seed=2)  # an exact multiple: at most 47 tokens may be loaded -> 32
        toks1, _, _ = greedy_generate(model, turn1, 6, conn)
        again = prefill(model, turn1, conn)
        assert again.cached_tokens == 32 and again.computed_tokens == 16
        turn2 = turn1 + toks1 + prompt(30, seed=3)
        ref, ref_logits, _ = greedy_generate(model, turn2, 8)
        got, logits, pre = greedy_generate(model, turn2, 8, conn)
        assert pre.cached_tokens == 48 and got == ref
        torch.testing.assert_close(torch.stack(logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-5)
        # its blocks were saved: turn 3 finds the whole of turn 2 (84 tokens -> 80)
        n, cache = conn.load(turn2 + got, model.config)
        assert n == 80 and cache.get_seq_length() == 80


def test_load_contract(model, memkv_node):
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, MODEL_ID, block_tokens=16, namespace="session")
        ids = prompt(40, seed=4)
        assert conn.load(ids, model.config) == (0, None)  # miss
        assert len(conn.block_keys(ids)) == 2
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
        assert conn.save(ids, out.cache) == 2
        assert conn.save(ids, out.cache) == 0  # already there
        n, cache = conn.load(ids, model.config)
        assert n == 32
        for layer, ref in zip(cache.layers, out.cache.layers, strict=True):
            assert torch.equal(layer.keys, ref.keys[:, :, :32]) and torch.equal(layer.values, ref.values[:, :, :32])
        # legacy tuple-of-pairs caches are accepted too
        other = prompt(33, seed=5)
        with torch.no_grad():
            out2 = model(input_ids=torch.tensor([other]), use_cache=True)
        assert conn.save(other, [(ly.keys, ly.values) for ly in out2.cache.layers]) == 2
        # the namespace is respected
        assert KVCacheConnector(c, MODEL_ID, block_tokens=16).load(ids, model.config) == (0, None)
        # a different salt (tenant) sees nothing
        assert KVCacheConnector(c, MODEL_ID, block_tokens=16, namespace="session",
                                salt="other").load(ids, model.config) == (0, None)


def test_layout_documented_size():
    lay = KVLayout.from_config(tiny_config(), block_tokens=16)
    assert lay == KVLayout(2, 2, 16, 16, "float32")
    assert lay.block_bytes == HEADER_LEN + 2 * 2 * 2 * 16 * 16 * 4
    assert KVLayout.from_config(tiny_config(), block_tokens=16, dtype=torch.bfloat16).block_bytes == \
        HEADER_LEN + 2 * 2 * 2 * 16 * 16 * 2


def _save_prompt(model, conn, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return conn.save(ids, out.cache)


def test_foreign_layout_is_refused(model, memkv_node):
    """Blocks saved under the same model id with another shape or dtype raise KVLayoutMismatch."""
    ids = prompt(40, seed=6)
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, "shared-name", block_tokens=16)
        assert _save_prompt(model, conn, ids) == 2
        # another number of layers (same block size in bytes would not matter: the header says)
        with pytest.raises(KVLayoutMismatch, match="layers"):
            conn.load(ids, tiny_config(num_hidden_layers=3))
        # same byte size, other shape: 4 kv heads x 8 head_dim vs 2 x 16
        cfg = tiny_config(num_key_value_heads=4, head_dim=8)
        assert KVLayout.from_config(cfg, block_tokens=16).block_bytes == conn.layout(model.config).block_bytes
        with pytest.raises(KVLayoutMismatch, match="kv heads"):
            conn.load(ids, cfg)
        # another dtype (smaller value than expected would also be caught; here bf16 expected, fp32 stored)
        with pytest.raises(KVLayoutMismatch, match="float32"):
            KVCacheConnector(c, "shared-name", block_tokens=16, dtype=torch.bfloat16).load(ids, model.config)
        # a bf16 cache saved under the name, loaded by an fp32 replica: the stored value is smaller
        ids2 = prompt(40, seed=7)
        half = tiny_model().to(torch.bfloat16)
        assert _save_prompt(half, KVCacheConnector(c, "shared-name", block_tokens=16), ids2) == 2
        with pytest.raises(KVLayoutMismatch, match="bfloat16"):
            conn.load(ids2, model.config)
        # and a larger stored value than expected (fp32 stored, fp16 expected): explained from its header
        with pytest.raises(KVLayoutMismatch, match="float32"):
            KVCacheConnector(c, "shared-name", block_tokens=16, dtype=torch.float16).load(ids, model.config)
        # the right replica still loads
        assert conn.load(ids, model.config)[0] == 32
    assert issubclass(KVLayoutMismatch, MemKVError)


def test_garbage_and_misplaced_blocks_are_refused(model, memkv_node):
    ids = prompt(40, seed=8)
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, MODEL_ID + "-g", block_tokens=16)
        keys = conn.block_keys(ids)
        lay = conn.layout(model.config)
        c.put(keys[0], b"x" * lay.block_bytes)
        with pytest.raises(KVLayoutMismatch, match="not a memkv KV block"):
            conn.load(ids, model.config)
        # a real block of another prefix stored under this prefix's key
        other = prompt(40, seed=9)
        assert _save_prompt(model, conn, other) == 2
        okeys = conn.block_keys(other)
        conn2 = KVCacheConnector(c, MODEL_ID + "-g2", block_tokens=16)
        ids3 = prompt(40, seed=10)
        k3 = conn2.block_keys(ids3)
        c.put(k3[0], c.get(okeys[0]))
        with pytest.raises(KVLayoutMismatch, match="another model|wrong key"):
            conn2.load(ids3, model.config)


def test_lmcache_keys_and_blake2b(model, memkv_node):
    ids = prompt(50, seed=11)
    ref, _, _ = greedy_generate(model, ids, 5)
    with SyncClient.connect(memkv_node.url) as c:
        conn = KVCacheConnector(c, MODEL_ID, block_tokens=16, key_format="lmcache", hash="blake2b")
        assert conn.block_keys(ids)[0].startswith(MODEL_ID.encode() + b"@1@0@")
        greedy_generate(model, ids, 5, conn)
        got, _, pre = greedy_generate(model, ids, 5, conn)
    assert pre.cached_tokens == 48 and got == ref


async def test_async_connector(model, memkv_node):
    ids = prompt(70, seed=12)
    ref, _, _ = greedy_generate(model, ids, 4)
    async with Client.connect(memkv_node.url) as c:
        conn = AsyncKVCacheConnector(c, MODEL_ID + "-async", block_tokens=16)
        assert await conn.load(ids, model.config) == (0, None)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
        assert await conn.save(ids, out.cache) == 4
        n, cache = await conn.load(ids, model.config, max_tokens=len(ids) - 1)
    assert n == 64
    with torch.no_grad():
        out2 = model(input_ids=torch.tensor([ids[n:]]), cache=cache, use_cache=True)
    assert int(torch.argmax(out2.logits[0, -1])) == ref[0]
    torch.testing.assert_close(out2.logits[0, -1], out.logits[0, -1], rtol=1e-5, atol=1e-5)


def test_redis_adapter_behind_the_same_connector(model, tmp_path):
    """bench/redis_kv.py (the TTFT benchmark's Redis store) gives the same results through the connector."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    from bench.redis_kv import RedisKVStore
    from bench.redis_peer import RedisServer

    ids = prompt(70, seed=13)
    ref, _, _ = greedy_generate(model, ids, 4)
    with RedisServer(tmp_path / "redis") as rs:
        store = RedisKVStore(rs.host, rs.port)
        conn = KVCacheConnector(store, MODEL_ID, block_tokens=16)
        greedy_generate(model, ids, 4, conn)
        got, _, pre = greedy_generate(model, ids, 4, conn)
        assert pre.cached_tokens == 64 and got == ref
        with pytest.raises(KVLayoutMismatch):
            conn.load(ids, tiny_config(num_hidden_layers=3))
        store.close()
