"""The memkv LMCache plugin, loaded and driven by LMCache's own storage manager (real objects, CPU).

Engine A stores chunks through LMCache (LocalCPUBackend + the memkv remote
backend); engine B — a fresh StorageManager with an empty CPU cache, as another
vLLM process would have — finds them with LMCache's batched contains and
retrieves them from memkv into its own memory objects.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from lmcache_harness import CHUNK, Managers, chunk_keys, fill, free_port, plugin_config

REMOTE = "RemoteBackend-memkv"
DEADLINE_S = 15.0


@pytest.fixture
def lmcache_manager():
    managers = Managers()
    yield managers.make
    managers.close()


def wait_stored(manager, keys) -> None:
    """LMCache's remote puts are asynchronous: wait until memkv reports them all (bounded)."""
    deadline = time.monotonic() + DEADLINE_S
    while manager.batched_contains(keys, search_range=[REMOTE])[0] < len(keys):
        assert time.monotonic() < deadline, "LMCache's puts to memkv did not finish"
        time.sleep(0.02)


def release(objs) -> None:
    for obj in objs:
        if obj is not None:
            obj.ref_count_down()


def test_plugin_is_loaded_by_configuration(memkv_node, lmcache_manager) -> None:
    manager = lmcache_manager(plugin_config(memkv_node.url))
    assert list(manager.storage_backends) == ["LocalCPUBackend", REMOTE]
    assert "MemKVRemoteConnector" in repr(manager.storage_backends[REMOTE].connection)


def test_store_then_another_engine_retrieves_bytes_intact(memkv_node, lmcache_manager) -> None:
    a = lmcache_manager(plugin_config(memkv_node.url))
    keys = chunk_keys(1000, 4)
    objs, data = fill(a, 3, seed=1)
    last, last_data = fill(a, 1, tokens=CHUNK // 2, seed=2)  # a prompt's last, partial chunk
    a.batched_put(keys, objs + last)
    wait_stored(a, keys)

    b = lmcache_manager(plugin_config(memkv_node.url))
    assert b.batched_contains(keys, search_range=["LocalCPUBackend"])[0] == 0  # B computed nothing itself
    hits, mapping = b.batched_contains(keys)
    assert hits == 4 and list(mapping) == [REMOTE]
    got = b.batched_get(keys, location=REMOTE)
    try:
        assert [bytes(g.byte_array) for g in got] == data + last_data
        assert got[3].meta.shape[2] == CHUNK // 2  # the partial chunk comes back with its token count
    finally:
        release(got)


def test_contains_counts_the_leading_run_only(memkv_node, lmcache_manager) -> None:
    a = lmcache_manager(plugin_config(memkv_node.url))
    stored = chunk_keys(2000, 2) + chunk_keys(2003, 1)  # chunks 0, 1 and 3 of a prompt: 2 is missing
    objs, _ = fill(a, 3)
    a.batched_put(stored, objs)
    wait_stored(a, stored)
    b = lmcache_manager(plugin_config(memkv_node.url))
    assert b.batched_contains(chunk_keys(2000, 4), search_range=[REMOTE])[0] == 2
    assert b.batched_contains(chunk_keys(2003, 1), search_range=[REMOTE])[0] == 1
    assert b.batched_contains(chunk_keys(5000, 3), search_range=[REMOTE])[0] == 0


def test_same_chunk_stored_by_two_engines(memkv_node, lmcache_manager) -> None:
    a, b = lmcache_manager(plugin_config(memkv_node.url)), lmcache_manager(plugin_config(memkv_node.url))
    keys = chunk_keys(3000, 2)
    objs_a, data = fill(a, 2, seed=7)
    objs_b, _ = fill(b, 2, seed=7)  # same content, as two engines computing the same prefix
    a.batched_put(keys, objs_a)
    b.batched_put(keys, objs_b)
    wait_stored(a, keys)
    c = lmcache_manager(plugin_config(memkv_node.url))
    got = c.batched_get(keys, location=REMOTE)
    try:
        assert [bytes(g.byte_array) for g in got] == data
    finally:
        release(got)


def test_ping(memkv_node, lmcache_manager) -> None:
    manager = lmcache_manager(plugin_config(memkv_node.url, timeout=2.0))
    conn = manager.storage_backends[REMOTE].connection
    assert conn.support_ping()
    assert asyncio.run_coroutine_threadsafe(conn.ping(), manager.loop).result(DEADLINE_S) == 0
    memkv_node.kill()
    assert asyncio.run_coroutine_threadsafe(conn.ping(), manager.loop).result(DEADLINE_S) != 0


def test_node_down_is_a_miss_not_a_hang(start_node, lmcache_manager) -> None:
    node = start_node()
    a = lmcache_manager(plugin_config(node.url, timeout=2.0))
    keys = chunk_keys(4000, 3)
    objs, _ = fill(a, 3)
    a.batched_put(keys, objs)
    wait_stored(a, keys)
    b = lmcache_manager(plugin_config(node.url, timeout=2.0))
    node.kill()
    t0 = time.monotonic()
    assert b.batched_contains(keys, search_range=[REMOTE])[0] == 0
    got = b.batched_get(keys, location=REMOTE)
    assert got == [None] * 3 or got is None
    more, _ = fill(b, 1)
    b.batched_put(chunk_keys(4100, 1), more)  # a put while the node is down fails quietly
    assert time.monotonic() - t0 < DEADLINE_S


def test_unreachable_store_at_start_is_a_miss(lmcache_manager) -> None:
    manager = lmcache_manager(plugin_config(f"memkv://127.0.0.1:{free_port()}", timeout=1.0))
    assert manager.batched_contains(chunk_keys(1, 2), search_range=[REMOTE])[0] == 0
