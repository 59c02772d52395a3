"""memkv as SGLang's HiCache L3 backend, loaded by SGLang's own dynamic-backend factory (CPU).

The host memory pool is SGLang's real ``MHATokenToKVPoolHost`` (built from a
real ``MHATokenToKVPool`` on CPU, as SGLang's own backend tests build it), the
backend comes from ``StorageBackendFactory.create_backend("dynamic", ...)`` with
the extra config the README documents, and the page keys are SGLang's own
storage hashes of a token sequence. Engine A writes pages from its host pool;
engine B (its own pool, its own backend instance) counts and reads them back.
"""

from __future__ import annotations

import time

import pytest
from engine_packages import require

require("sglang", "bash scripts/engine-venv.sh sglang")

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_storage_hash_str  # noqa: E402

PAGE = 16
LAYERS, HEADS, HEAD_DIM = 2, 2, 32
DEADLINE_S = 15.0


def host_pool(layout: str) -> MHATokenToKVPoolHost:
    device = MHATokenToKVPool(256, PAGE, torch.float32, HEADS, HEAD_DIM, LAYERS, "cpu", False,
                              start_layer=0, end_layer=LAYERS - 1)
    return MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2, 0, PAGE, layout,
                                pin_memory=False, device="cpu", device_capacity_tokens=device.size,
                                start_layer=device.start_layer, end_layer=device.end_layer,
                                write_back_staging=device.hicache_write_back_staging)


def backend(url: str, pool: MHATokenToKVPoolHost, **extra):
    """What SGLang's HiCacheController does on attach: factory, then register the host pool."""
    config = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=pool.layout == "page_first",
        model_name="memkv-test/tiny-llama",
        extra_config={"backend_name": "memkv", "module_path": "memkv.client.sglang",
                      "class_name": "MemKVHiCacheStorage", "url": url, "interface_v1": 1, **extra})
    storage = StorageBackendFactory.create_backend("dynamic", config, pool)
    storage.register_mem_pool_host(pool)
    return storage


def page_keys(n_pages: int, seed: int = 0) -> list[str]:
    tokens = torch.randint(0, 32000, (n_pages * PAGE,), generator=torch.Generator().manual_seed(seed)).tolist()
    return get_storage_hash_str(tokens, None, page_size=PAGE)


def written_pages(pool: MHATokenToKVPoolHost, n_pages: int, seed: int) -> tuple[torch.Tensor, list[bytes]]:
    """Allocate ``n_pages`` host pages, fill them with random KV, return indices and page bytes."""
    idx = pool.alloc(n_pages * PAGE)
    gen = torch.Generator().manual_seed(seed)
    for p in range(n_pages):
        page = pool.get_data_page(int(idx[p * PAGE]), flat=True)
        pool.set_from_flat_data_page(int(idx[p * PAGE]), torch.randn(page.shape, generator=gen))
    return idx, page_bytes(pool, idx, n_pages)


def page_bytes(pool: MHATokenToKVPoolHost, idx: torch.Tensor, n_pages: int) -> list[bytes]:
    return [pool.get_data_page(int(idx[p * PAGE]), flat=True).numpy().tobytes() for p in range(n_pages)]


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct", "layer_first"])
def test_pages_round_trip_zero_copy(memkv_node, layout) -> None:
    pool_a = host_pool(layout)
    a = backend(memkv_node.url, pool_a)
    assert type(a).__name__ == "MemKVHiCacheStorage"
    keys = page_keys(3)
    idx_a, data = written_pages(pool_a, 3, seed=1)
    assert a.batch_set_v1(keys, idx_a) == [True] * 3
    assert a.batch_set_v1(keys, idx_a) == [True] * 3  # already there: nothing resent, still a success

    pool_b = host_pool(layout)
    b = backend(memkv_node.url, pool_b)
    assert b.batch_exists(keys + page_keys(1, seed=9)) == 3
    idx_b = pool_b.alloc(3 * PAGE)
    assert b.batch_get_v1(keys, idx_b) == [True] * 3
    assert page_bytes(pool_b, idx_b, 3) == data


def test_batch_exists_counts_consecutive_pages(memkv_node) -> None:
    pool = host_pool("page_first")
    storage = backend(memkv_node.url, pool)
    keys = page_keys(4, seed=2)
    idx, _ = written_pages(pool, 4, seed=2)
    assert storage.batch_set_v1([keys[0], keys[1], keys[3]],
                                torch.cat([idx[:2 * PAGE], idx[3 * PAGE:]])) == [True] * 3
    assert storage.batch_exists(keys) == 2  # page 2 is missing: pages 3.. do not count
    assert storage.batch_exists(keys[3:]) == 1
    assert storage.exists(keys[0]) and not storage.exists(keys[2])


def test_generic_interface_without_interface_v1(memkv_node) -> None:
    pool = host_pool("page_first")
    storage = backend(memkv_node.url, pool, interface_v1=0)
    keys = page_keys(2, seed=3)
    idx, data = written_pages(pool, 2, seed=3)
    # what SGLang's _generic_page_set / _generic_page_get hand the backend
    assert storage.batch_set(keys, [pool.get_data_page(int(idx[p * PAGE])) for p in range(2)])
    assert storage.batch_exists(keys) == 2
    got = storage.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert [g.numpy().tobytes() for g in got] == data
    assert storage.batch_get(page_keys(1, seed=4), [pool.get_dummy_flat_data_page()]) == [None]


def test_node_down_is_a_miss_not_a_hang(start_node) -> None:
    node = start_node()
    pool = host_pool("page_first")
    storage = backend(node.url, pool, timeout=2.0)
    keys = page_keys(2, seed=5)
    idx, _ = written_pages(pool, 2, seed=5)
    assert storage.batch_set_v1(keys, idx) == [True, True]
    node.kill()
    t0 = time.monotonic()
    assert storage.batch_exists(keys) == 0
    assert storage.batch_get_v1(keys, pool.alloc(2 * PAGE)) == [False, False]
    assert storage.batch_set_v1(keys, idx) == [False, False]
    assert time.monotonic() - t0 < DEADLINE_S
    storage.close()


def test_missing_url_is_a_clear_error(memkv_node) -> None:
    config = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="m",
        extra_config={"backend_name": "memkv", "module_path": "memkv.client.sglang",
                      "class_name": "MemKVHiCacheStorage"})
    with pytest.raises(Exception, match="url"):
        StorageBackendFactory.create_backend("dynamic", config, host_pool("page_first"))
