"""memkv as a vLLM KV connector: any vLLM process loads the KV cache another one saved.

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"MemKVConnector",
        "kv_connector_module_path":"memkv.client.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"url":"etcd://HOST:2379/prod"}}'

(``pip install memkv[vllm]``; no patch of vLLM.) ``kv_connector_extra_config`` keys:

    url          memkv://HOST:PORT or etcd://HOST:PORT[,HOST:PORT]/CLUSTER        (required)
    tenant, token    credentials (default: $MEMKV_TENANT, $MEMKV_TOKEN)
    namespace    memkv namespace of the blocks (default "shared")
    transport    auto | tcp | shm | rdma (default auto: shared memory when the node is on this host)
    timeout      seconds a memkv call may take before it counts as failed (default 5)
    lease        seconds a prefix lookup keeps the blocks it found from eviction (default 30)
    model_id     the model's identity in keys (default: vLLM's model name or path, and revision);
                 set it when replicas load the same checkpoint from different paths
    save_decode  also save blocks filled by generated tokens (default true: a conversation's next
                 turn finds its previous answer)
    ttl          seconds saved blocks live (default: the namespace's policy)
    load_failure recompute | fail (default recompute; see "Failures")
    max_inflight_mb  saves queued behind the network before a step waits (default 256)
    lookup_wait_ms   how long the scheduler waits for a lookup before asking again next step (default 50)

How it works (vLLM's ``KVConnectorBase_V1``, both halves in this file):

* **Scheduler** (engine core process). When a request arrives (``on_new_request``)
  one ``lookup_prefix`` over the keys of its full blocks runs on a background
  thread; it answers how many leading blocks memkv holds and *leases* them, so
  they cannot be evicted before the worker reads them.
  ``get_num_new_matched_tokens`` turns that into whole vLLM blocks beyond the
  local prefix-cache hit (partial hits included; at least the last prompt token
  is always computed). If the lookup has not answered yet it returns ``None``
  (vLLM asks again next step) instead of stalling the scheduler.
  ``build_connector_meta`` tells the workers which blocks to load into which
  pages, and which blocks become full in this step and are not in memkv yet.
* **Worker** (model runner). ``start_load_kv`` fetches the blocks to load with
  one ``get_many_into`` into a staging buffer, checks each header and copies
  whole pages into the allocated blocks before the forward pass runs.
  ``save_kv_layer`` copies, after each attention layer, that layer's pages of
  the blocks to save into the values being built (page copies, never tokens);
  ``wait_for_save`` hands the finished values to a sender thread that writes
  them with ``put_many`` while the engine goes on with the next step (bounded by
  ``max_inflight_mb``). Source pages are never held past the step.

Keys and values: client/vllm_block.py (derived from vLLM's own block hash, the
model, the KV page layout including the CPU kernel's instruction set, LoRA and
``cache_salt``; a self-describing header keeps vLLM's block hash and its
parent's).

Failures. A lookup that fails or times out is a miss. A block that cannot be
loaded (node down, timeout, corrupt value dropped by the node, evicted, another
layout or model) is reported through ``get_block_ids_with_load_errors``: vLLM
recomputes from the first such block (the connector sets vLLM's
``kv_load_failure_policy`` to ``recompute`` unless ``load_failure`` is
``fail``), and the blocks computed in that step are not saved. A failed save is
counted and dropped. Nothing waits longer than the client timeout. Two engines
saving the same block both succeed (first writer wins).

Counters (``stats()`` on either half; per step through vLLM's connector stats,
logged as "KV Transfer metrics" and exported as ``vllm:memkv_*`` Prometheus
metrics): lookups, lookup failures, hit tokens, loaded/saved blocks and bytes,
load/save failures, save conflicts, load/save/lookup latency.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.logger import init_logger

from memkv.client.core.api import check_transport
from memkv.client.engine_config import EngineStoreConfig
from memkv.client.url import parse_url
from memkv.client.vllm_block import BlockFormat, BlockMismatch, PageLayout, block_key
from memkv.errors import InvalidArgument, KeyExists

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# vLLM configures handlers for its own logger tree only: be a child of it, so our lines appear in its log.
logger = init_logger("vllm.memkv")

RECONNECT_S = 2.0  # after a failed connect, the next attempt waits this long (calls meanwhile are misses)
MAX_HASH_BYTES = 64  # header room for vLLM's block hashes (sha256: 32 bytes)
SEND_CHUNK_BYTES = 64 * 2**20  # one put_many / get_many_into carries at most this much ...
SEND_CHUNK_BLOCKS = 512  # ... and this many blocks (the node refuses batches over 4096 keys)


# -- settings ---------------------------------------------------------------------------------------
STORE_KEYS = tuple(f.name for f in fields(EngineStoreConfig))  # url, tenant, token, namespace, ...


@dataclass(frozen=True)
class Settings:
    """``kv_connector_extra_config``: where the store is (read as every engine integration reads it,
    ``EngineStoreConfig``: url, tenant/token or ``$MEMKV_TENANT``/``$MEMKV_TOKEN``, namespace,
    transport, timeout, lease) and what this connector does with it."""

    store: EngineStoreConfig
    model_id: str | None = None
    save_decode: bool = True
    ttl: float | None = None
    load_failure: str = "recompute"
    max_inflight_mb: float = 256.0
    lookup_wait_ms: float = 50.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Settings:
        own = {f.name for f in fields(cls)} - {"store"}
        known = own | set(STORE_KEYS)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"MemKVConnector: unknown kv_connector_extra_config keys {unknown} "
                             f"(known: {sorted(known)})")
        try:
            store = EngineStoreConfig.from_mapping(extra)
            # The connector connects lazily (vLLM starts without its store), so a malformed URL or
            # transport is caught here, at start, rather than as a miss at every request.
            parse_url(store.url)
            check_transport(store.transport)
        except InvalidArgument as exc:
            raise ValueError(f"MemKVConnector: kv_connector_extra_config: {exc}") from exc
        s = cls(store=store, **{k: v for k, v in extra.items() if k in own})
        if s.load_failure not in ("recompute", "fail"):
            raise ValueError(f"MemKVConnector: load_failure must be recompute or fail, not {s.load_failure!r}")
        return s


class _Store:
    """The memkv client of one connector half, connected on first use.

    A node or cluster that cannot be reached does not stop vLLM: calls are
    misses (``None``) and the connection is tried again after ``RECONNECT_S``.
    """

    def __init__(self, config: EngineStoreConfig) -> None:
        self.config = config
        self._client: Any = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._warned = False

    def client(self) -> Any:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._client = self.config.connect()
            except Exception as exc:  # unreachable store: misses until it is back
                self._retry_at = time.monotonic() + RECONNECT_S
                if not self._warned:
                    logger.warning("memkv: cannot connect to %s (%s: %s); serving without it, retrying every "
                                   "%.0f s", self.config.url, type(exc).__name__, exc, RECONNECT_S)
                    self._warned = True
                return None
            if self._warned:
                logger.info("memkv: connected to %s", self.config.url)
                self._warned = False
            return self._client

    def warm(self) -> None:
        """Connect in the background now, so the first request does not pay for it: the connection,
        and the first read, which sets up the one-sided path (maps a same-host node's region)."""
        def run() -> None:
            client = self.client()
            if client is not None:
                with contextlib.suppress(Exception):
                    client.get(b"memkv-vllm-connector-warm-up", namespace=self.config.namespace)

        threading.Thread(target=run, name="memkv-connect", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                finally:
                    self._client = None


# -- counters ---------------------------------------------------------------------------------------
COUNTERS = ("lookups", "lookup_failures", "hit_tokens", "loaded_blocks", "loaded_bytes", "load_failures",
            "saved_blocks", "saved_bytes", "save_failures", "save_conflicts")
LATENCIES = ("lookup_seconds", "load_seconds", "save_seconds")


@dataclass
class MemKVConnectorStats(KVConnectorStats):
    """One interval's counters (sums) and latencies (lists of seconds), scheduler and workers aggregated."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {**{k: 0 for k in COUNTERS}, **{k: [] for k in LATENCIES}}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*COUNTERS, *LATENCIES))

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            if k in LATENCIES:
                self.data.setdefault(k, []).extend(v)
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data.get(k, 0) for k in COUNTERS}
        for k in LATENCIES:
            xs = sorted(self.data.get(k, []))
            name = k.removesuffix("_seconds")
            out[f"{name} avg ms"] = round(1e3 * sum(xs) / len(xs), 3) if xs else 0
            out[f"{name} p90 ms"] = round(1e3 * xs[int(0.9 * (len(xs) - 1))], 3) if xs else 0
        return out


class _Counters:
    """Thread-safe counters: per-interval (for vLLM) and cumulative (for ``stats()``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = MemKVConnectorStats()
        self._total = MemKVConnectorStats()

    def add(self, **values: float) -> None:
        with self._lock:
            for st in (self._interval, self._total):
                for k, v in values.items():
                    if k in LATENCIES:
                        st.data[k].append(v)
                    else:
                        st.data[k] += v

    def take_interval(self) -> MemKVConnectorStats | None:
        with self._lock:
            if self._interval.is_empty():
                return None
            out, self._interval = self._interval, MemKVConnectorStats()
            return out

    def totals(self) -> dict[str, int | float]:
        with self._lock:
            return MemKVConnectorStats(data={k: (list(v) if isinstance(v, list) else v)
                                             for k, v in self._total.data.items()}).reduce()


class MemKVPromMetrics(KVConnectorPromMetrics):
    """``vllm:memkv_*`` counters and latency histograms on vLLM's Prometheus endpoint."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        from vllm.v1.metrics.utils import create_metric_per_engine

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {k: create_metric_per_engine(
            self._counter_cls(name=f"vllm:memkv_{k}", documentation=f"memkv connector: {k.replace('_', ' ')}",
                              labelnames=labelnames), per_engine_labelvalues) for k in COUNTERS}
        buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
        self.histograms = {k: create_metric_per_engine(
            self._histogram_cls(name=f"vllm:memkv_{k}", documentation=f"memkv connector: {k.replace('_', ' ')}",
                                buckets=buckets, labelnames=labelnames), per_engine_labelvalues)
            for k in LATENCIES}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k, metric in self.counters.items():
            if transfer_stats_data.get(k):
                metric[engine_idx].inc(transfer_stats_data[k])
        for k, metric in self.histograms.items():
            for v in transfer_stats_data.get(k, ()):
                metric[engine_idx].observe(v)


# -- what the scheduler tells the workers -------------------------------------------------------------
@dataclass
class BlockRef:
    index: int  # position of the block in the request's token sequence
    block_id: int  # vLLM block id (page) it is loaded into / saved from
    block_hash: bytes
    parent_hash: bytes | None
    token_ids: list[int] = field(default_factory=list)  # saves only: they go into the value's header


@dataclass
class Transfer:
    req_id: str
    lora: str | None  # name (in the header)
    lora_key: str | None  # name@path (in the key, as in vLLM's block hash)
    salt: str | None
    blocks: list[BlockRef]


@dataclass
class MemKVMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class MemKVHandshake(KVConnectorHandshakeMetadata):
    """A worker's page layout, sent to the scheduler at start-up (it derives the workers' keys)."""

    layout_fp: bytes
    layout: dict[str, Any]


def _model_id(vllm_config: VllmConfig, settings: Settings) -> str:
    if settings.model_id:
        return settings.model_id
    mc = vllm_config.model_config
    return f"{mc.model}@{mc.revision or ''}"


def _identity(request: Request) -> tuple[str | None, str | None, str | None]:
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return None, None, request.cache_salt
    return lora.lora_name, f"{lora.lora_name}@{lora.lora_path}", request.cache_salt


# -- scheduler half ---------------------------------------------------------------------------------
@dataclass
class _Req:
    request: Request
    lookup: Future[int] | None = None
    lookup_at: float = 0.0
    lookup_preemptions: int = 0
    in_store: int = 0  # leading blocks memkv held at lookup time: not saved again
    local_tokens: int = 0  # block-aligned local prefix-cache hit when the load was planned
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks below this were saved or planned for saving
    pending_load: Transfer | None = None
    last_load: Transfer | None = None


class _SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: Settings,
                 counters: _Counters) -> None:
        self.settings = settings
        self.counters = counters
        self.store = _Store(settings.store)
        self.store.warm()
        cfg = vllm_config.kv_transfer_config
        self.consumer = bool(cfg.is_kv_consumer)
        self.producer = bool(cfg.is_kv_producer)
        self.model_id = _model_id(vllm_config, settings)
        self.block_tokens = int(vllm_config.cache_config.block_size)
        hash_block = kv_cache_config.hash_block_size or self.block_tokens
        if self.block_tokens % hash_block:
            raise ValueError(f"MemKVConnector: block size {self.block_tokens} is not a multiple of vLLM's hash "
                             f"block size {hash_block}")
        self.ratio = self.block_tokens // hash_block
        self.layout_fps: list[bytes] = []  # one per worker rank, from the handshake
        self.reqs: dict[str, _Req] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memkv-lookup")
        algo = vllm_config.cache_config.prefix_caching_hash_algo
        if algo.startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
            logger.warning("memkv: prefix_caching_hash_algo=%s without PYTHONHASHSEED gives every vLLM process "
                           "its own block hashes, so no process finds another's blocks; set PYTHONHASHSEED "
                           "to the same value everywhere or use sha256", algo)

    # vLLM hashes every hash_block_size tokens; a vLLM block's hash is the last one inside it.
    def _hashes(self, request: Request, n_blocks: int) -> list[bytes]:
        hs = request.block_hashes
        return [bytes(hs[(i + 1) * self.ratio - 1]) for i in range(n_blocks)]

    def _full_blocks(self, request: Request, n_tokens: int) -> int:
        return min(n_tokens // self.block_tokens, len(request.block_hashes) // self.ratio)

    def set_layouts(self, by_rank: dict[tuple[int, int], Any]) -> None:
        self.layout_fps = [m.layout_fp for _, m in sorted(by_rank.items()) if isinstance(m, MemKVHandshake)]
        if not self.layout_fps:
            logger.warning("memkv: the workers sent no page layout; lookups are disabled (saves still run)")

    def _state(self, request: Request) -> _Req:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _Req(request)
        return st

    # -- lookup
    def _start_lookup(self, st: _Req) -> None:
        request = st.request
        # Whole blocks only, and never the last token: vLLM computes at least one token of a prompt.
        n = self._full_blocks(request, max(0, request.num_tokens - 1))
        hashes = self._hashes(request, n)  # copied here: the engine thread appends to block_hashes
        _, lora_key, salt = _identity(request)
        st.lookup_at = time.monotonic()
        st.lookup_preemptions = request.num_preemptions
        st.lookup = self.pool.submit(self._lookup, hashes, lora_key, salt)

    def _lookup(self, hashes: list[bytes], lora_key: str | None, salt: str | None) -> int:
        if not hashes or not self.layout_fps:
            return 0
        t0 = time.perf_counter()
        client = self.store.client()
        if client is None:
            self.counters.add(lookups=1, lookup_failures=1)
            return 0
        s = self.settings.store
        try:
            found = len(hashes)
            for fp in self.layout_fps:  # every worker rank must hold the block (one lookup with TP=PP=1)
                keys = [block_key(model_id=self.model_id, layout_fp=fp, lora=lora_key, salt=salt, block_hash=h)
                        for h in hashes[:found]]
                found = min(found, int(client.lookup_prefix(keys, lease=s.lease, namespace=s.namespace)))
                if found == 0:
                    break
        except Exception as exc:  # node down, timeout, refused: a miss
            logger.warning("memkv: prefix lookup failed (%s: %s); computing the prompt", type(exc).__name__, exc)
            self.counters.add(lookups=1, lookup_failures=1, lookup_seconds=time.perf_counter() - t0)
            return 0
        self.counters.add(lookups=1, lookup_seconds=time.perf_counter() - t0)
        return found

    def on_new_request(self, request: Request) -> None:
        if self.consumer:
            self._start_lookup(self._state(request))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.consumer:
            return 0, False
        st = self._state(request)
        stale = (st.lookup is None or st.lookup_preemptions != request.num_preemptions
                 or time.monotonic() - st.lookup_at > self.settings.store.lease / 2)
        if stale:  # new, resumed after preemption, or queued so long that the lease may be gone
            self._start_lookup(st)
        try:
            found = st.lookup.result(timeout=self.settings.lookup_wait_ms / 1e3)
        except FutureTimeout:
            return None, False  # vLLM asks again at its next step; the scheduler is not held up
        st.in_store = found
        st.local_tokens = num_computed_tokens
        return max(0, found * self.block_tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        first = st.local_tokens // self.block_tokens
        n = num_external_tokens // self.block_tokens
        hashes = self._hashes(request, first + n)
        lora, lora_key, salt = _identity(request)
        refs = [BlockRef(i, block_ids[i], hashes[i], hashes[i - 1] if i > 0 else None)
                for i in range(first, first + n)]
        st.pending_load = Transfer(request.request_id, lora, lora_key, salt, refs)
        self.counters.add(hit_tokens=num_external_tokens)

    # -- per step
    def build_connector_meta(self, so: SchedulerOutput) -> MemKVMetadata:
        meta = MemKVMetadata()
        for st in self.reqs.values():
            if st.pending_load is not None:
                meta.loads.append(st.pending_load)
                st.last_load, st.pending_load = st.pending_load, None
        if not self.producer:
            return meta
        for new in so.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan_save(st, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id], meta)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after preemption: the whole block table again
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_save(st, cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id], meta)
        return meta

    def _plan_save(self, st: _Req, tokens_after_step: int, meta: MemKVMetadata) -> None:
        """Save the blocks that are full once this step ran and that memkv did not hold at lookup time."""
        request = st.request
        limit = tokens_after_step if self.settings.save_decode else min(tokens_after_step, request.num_prompt_tokens)
        full = min(self._full_blocks(request, limit), len(st.block_ids))
        start = max(st.saved_upto, st.in_store)
        if full > start:
            hashes = self._hashes(request, full)
            lora, lora_key, salt = _identity(request)
            tokens, bt = request.all_token_ids, self.block_tokens
            refs = [BlockRef(i, st.block_ids[i], hashes[i], hashes[i - 1] if i > 0 else None,
                             list(tokens[i * bt:(i + 1) * bt])) for i in range(start, full)]
            meta.saves.append(Transfer(request.request_id, lora, lora_key, salt, refs))
        st.saved_upto = max(st.saved_upto, full)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        bad = output.invalid_block_ids
        if not bad:
            return
        # vLLM recomputes from the first block that failed to load; those blocks are saved again then.
        for st in self.reqs.values():
            if st.last_load is None:
                continue
            failed = [b.index for b in st.last_load.blocks if b.block_id in bad]
            if failed:
                st.in_store = min(st.in_store, failed[0])
                st.saved_upto = min(st.saved_upto, failed[0])

    def request_finished(self, request: Request) -> None:
        self.reqs.pop(request.request_id, None)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


# -- worker half ------------------------------------------------------------------------------------
@dataclass
class _Batch:
    keys: list[bytes]
    values: torch.Tensor  # [n, value_len] uint8
    parents: list[bytes | None]

    @property
    def nbytes(self) -> int:
        return self.values.numel()


class _Sender:
    """One thread that writes finished block values with ``put_many``, oldest first.

    ``submit`` returns at once unless more than ``limit`` bytes are already
    queued; then it waits (at most the client timeout per batch ahead of it), so
    a slow store bounds memory instead of growing it.
    """

    def __init__(self, store: _Store, settings: Settings, counters: _Counters) -> None:
        self.store = store
        self.settings = settings
        self.counters = counters
        self.limit = int(settings.max_inflight_mb * 2**20)
        self._queue: deque[_Batch] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="memkv-save", daemon=True)
        self._thread.start()

    def submit(self, batch: _Batch) -> None:
        with self._cond:
            deadline = time.monotonic() + self.settings.store.timeout * (1 + len(self._queue))
            while self._queued and self._queued + batch.nbytes > self.limit and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._queue.append(batch)
            self._queued += batch.nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[0]
            self._send(batch)
            with self._cond:
                self._queue.popleft()
                self._queued -= batch.nbytes
                self._cond.notify_all()

    def _send(self, batch: _Batch) -> None:
        """``put_many`` in chunks of at most ``SEND_CHUNK_BYTES`` / ``SEND_CHUNK_BLOCKS``: under the
        node's frame limits, and each call short next to the client timeout."""
        per = max(1, min(SEND_CHUNK_BLOCKS, SEND_CHUNK_BYTES // max(1, batch.values.shape[1])))
        for lo in range(0, len(batch.keys), per):
            self._send_chunk(batch.keys[lo:lo + per], batch.values[lo:lo + per], batch.parents[lo:lo + per])

    def _send_chunk(self, keys: list[bytes], values: torch.Tensor, parents: list[bytes | None]) -> None:
        n, nbytes = len(keys), values.numel()
        t0 = time.perf_counter()
        client = self.store.client()
        if client is None:
            self.counters.add(save_failures=n)
            return
        s = self.settings
        try:
            client.put_many(list(zip(keys, values, strict=True)), namespace=s.store.namespace, ttl=s.ttl,
                            parents=parents)
        except KeyExists:
            # Another engine stored (a bitwise different computation of) some of these blocks first: they are
            # in memkv all the same; the others of the chunk were written.
            self.counters.add(saved_blocks=n, saved_bytes=nbytes, save_conflicts=1,
                              save_seconds=time.perf_counter() - t0)
            return
        except Exception as exc:  # node down, timeout, out of room: those blocks are not saved
            logger.warning("memkv: saving %d blocks failed (%s: %s)", n, type(exc).__name__, exc)
            self.counters.add(save_failures=n, save_seconds=time.perf_counter() - t0)
            return
        self.counters.add(saved_blocks=n, saved_bytes=nbytes, save_seconds=time.perf_counter() - t0)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closed = True
            self._cond.notify_all()


class _WorkerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: Settings,
                 counters: _Counters) -> None:
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.settings = settings
        self.counters = counters
        self.model_id = _model_id(vllm_config, settings)
        self.store = _Store(settings.store)
        self.store.warm()
        self.sender = _Sender(self.store, settings, counters)
        self.layers: list[tuple[str, torch.Tensor]] = []
        self.layer_index: dict[str, int] = {}
        self.layout: PageLayout | None = None
        self.format: BlockFormat | None = None
        self._load_buf = torch.empty(0, dtype=torch.uint8)
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # a load failed in this step: this step's KV of them is garbage
        self._save: tuple[list[BlockRef], list[Transfer], torch.Tensor, torch.Tensor] | None = None

    # -- set-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"MemKVConnector supports models with one KV cache group, this one has {len(groups)}")
        names = [n for n in groups[0].layer_names if n in kv_caches]
        if not names:
            raise ValueError("MemKVConnector: no KV cache tensors were registered")
        first = kv_caches[names[0]]
        for n in names:
            t = kv_caches[n]
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"MemKVConnector: layer {n} has KV cache {tuple(t.shape)} {t.dtype}, layer "
                                 f"{names[0]} {tuple(first.shape)} {first.dtype}: mixed layouts are not supported")
        num_blocks = int(self.kv_cache_config.num_blocks)
        block_dim = next((d for d, s in enumerate(first.shape) if s >= num_blocks and s % num_blocks == 0), None)
        if block_dim is None:
            raise ValueError(f"MemKVConnector: cannot find the block dimension of KV cache {tuple(first.shape)} "
                             f"({num_blocks} blocks)")
        self.layers = [(n, kv_caches[n]) for n in names]
        self.layer_index = {n: i for i, n in enumerate(names)}
        self.layout = self._layout(names, first, block_dim, first.shape[block_dim] // num_blocks)
        self.format = BlockFormat(self.layout, model_id=self.model_id, hash_len=MAX_HASH_BYTES,
                                  hash_algo=self.vllm_config.cache_config.prefix_caching_hash_algo)
        logger.info("memkv: KV page layout %s; one block = %d bytes (header %d)", self.layout.describe(),
                    self.format.value_len, self.format.header_len)

    def _layout(self, names: list[str], t: torch.Tensor, block_dim: int, per_block: int) -> PageLayout:
        import vllm
        from vllm.config import get_layers_from_vllm_config
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.layers.attention import Attention

        attn = get_layers_from_vllm_config(self.vllm_config, Attention, names)
        layer = attn.get(names[0])
        backend = layer.attn_backend.get_name() if layer is not None else "unknown"
        isa = str(getattr(layer, "isa", "") or "")  # set by vLLM's CPU backend: it decides the page packing
        pc = self.vllm_config.parallel_config
        shape = tuple(int(s) for d, s in enumerate(t.shape) if d != block_dim)
        return PageLayout(backend=backend, isa=isa, dtype=str(t.dtype).removeprefix("torch."),
                          cache_dtype=str(self.vllm_config.cache_config.cache_dtype), page_shape=shape,
                          block_dim=block_dim, pages_per_block=per_block,
                          block_tokens=int(self.vllm_config.cache_config.block_size), layers=len(names),
                          itemsize=t.element_size(),
                          tp=(get_tensor_model_parallel_rank(), pc.tensor_parallel_size),
                          pp=(get_pp_group().rank_in_group, pc.pipeline_parallel_size),
                          engine=f"vllm-{vllm.__version__}")

    def handshake(self) -> MemKVHandshake | None:
        if self.layout is None:
            return None
        return MemKVHandshake(self.layout.fingerprint, self.layout.descriptor())

    def _keys(self, t: Transfer) -> list[bytes]:
        assert self.layout is not None
        fp = self.layout.fingerprint
        return [block_key(model_id=self.model_id, layout_fp=fp, lora=t.lora_key, salt=t.salt,
                          block_hash=b.block_hash) for b in t.blocks]

    def _kernel_ids(self, block_ids: list[int]) -> torch.Tensor:
        assert self.layout is not None
        r = self.layout.pages_per_block
        ids = torch.tensor(block_ids, dtype=torch.long)
        return ids if r == 1 else (ids[:, None] * r + torch.arange(r)).flatten()

    def _pages(self, values: torch.Tensor, layer: int) -> torch.Tensor:
        """``values`` rows' page of ``layer``, viewed as [rows * pages_per_block, *page_shape]."""
        assert self.layout is not None and self.format is not None
        lay, pb = self.layout, self.layout.page_bytes
        off = self.format.header_len + layer * pb
        return values[:, off:off + pb].view(self.layers[0][1].dtype).unflatten(
            1, (lay.pages_per_block, *lay.page_shape))

    # -- load
    def start_load_kv(self, meta: MemKVMetadata) -> None:
        """Fetch, check and copy into place every block this step loads, before the forward pass.

        Loads are synchronous (``get_num_new_matched_tokens`` never asks for async loading), so vLLM
        calls this before the forward of a step that loads. Whole-request loading measured as fast as
        layer-wise loading here (a fetch thread, each layer's pages copied in ``wait_for_layer_load``):
        a value holds all layers of a block, so layer 0 needs the whole fetch anyway (README numbers).
        """
        if not meta.loads or self.format is None:
            return
        t0 = time.perf_counter()
        total = sum(len(t.blocks) for t in meta.loads)
        vlen = self.format.value_len
        if self._load_buf.numel() < total * vlen:
            self._load_buf = torch.empty(total * vlen, dtype=torch.uint8)
        staging = self._load_buf[:total * vlen].view(total, vlen)
        row = 0
        for t in meta.loads:
            part = staging[row:row + len(t.blocks)]
            row += len(t.blocks)
            ok = self._fetch(t, part)
            if ok:
                self._scatter(t, part[:ok])
        self.counters.add(load_seconds=time.perf_counter() - t0)

    def _fetch(self, t: Transfer, staging: torch.Tensor) -> int:
        """Read ``t``'s blocks into ``staging`` and check them; how many leading blocks are usable."""
        assert self.format is not None
        n = len(t.blocks)
        got: list[int | None] = []
        client = self.store.client()
        if client is not None:
            try:
                keys, bufs = self._keys(t), list(staging)
                per = max(1, min(SEND_CHUNK_BLOCKS, SEND_CHUNK_BYTES // max(1, staging.shape[1])))
                for lo in range(0, n, per):
                    got += client.get_many_into(keys[lo:lo + per], bufs[lo:lo + per],
                                                namespace=self.settings.store.namespace)
            except Exception as exc:  # node down, timeout: the blocks from there on are recomputed
                logger.warning("memkv: loading %d blocks of %s failed (%s: %s)", n, t.req_id, type(exc).__name__,
                               exc)
        got += [None] * (n - len(got))
        ok = n
        rows = staging.numpy()  # header checks slice bytes: numpy does that without a Python loop
        for i, (b, length) in enumerate(zip(t.blocks, got, strict=True)):
            try:
                self.format.check(rows[i], length, block_hash=b.block_hash)
            except BlockMismatch as exc:
                if length is not None:
                    logger.warning("memkv: block %d of %s not loaded: %s", b.index, t.req_id, exc)
                ok = i
                break
        if ok < n:  # vLLM recomputes from the first block that did not load
            logger.warning("memkv: %d of %d blocks of %s not loaded: vLLM recomputes them", n - ok, n, t.req_id)
            self._load_errors.update(b.block_id for b in t.blocks[ok:])
            self._failed_reqs.add(t.req_id)
        self.counters.add(loaded_blocks=ok, loaded_bytes=ok * self.format.value_len, load_failures=n - ok)
        return ok

    def _scatter(self, t: Transfer, values: torch.Tensor) -> None:
        """Copy every layer's pages of the leading ``len(values)`` blocks of ``t`` into their vLLM blocks."""
        assert self.layout is not None
        d = self.layout.block_dim
        idx = self._kernel_ids([b.block_id for b in t.blocks[:len(values)]])
        with torch.no_grad():
            for li, (_, kv) in enumerate(self.layers):
                src = self._pages(values, li).flatten(0, 1)
                kv.index_copy_(d, idx, src if d == 0 else src.movedim(0, d))

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    # -- save
    def save_kv_layer(self, meta: MemKVMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        li = self.layer_index.get(layer_name)
        if li is None or not meta.saves or self.format is None or self.layout is None:
            return
        if self._save is None:
            saves = [t for t in meta.saves if t.req_id not in self._failed_reqs]
            refs = [b for t in saves for b in t.blocks]
            if not refs:
                return
            values = torch.empty((len(refs), self.format.value_len), dtype=torch.uint8)
            self._save = (refs, saves, values, self._kernel_ids([b.block_id for b in refs]))
        refs, _, values, idx = self._save
        d = self.layout.block_dim
        with torch.no_grad():
            pages = kv_layer.index_select(d, idx)
            if d != 0:
                pages = pages.movedim(d, 0)
            self._pages(values, li).copy_(pages.unflatten(0, (len(refs), self.layout.pages_per_block)))

    def wait_for_save(self) -> None:
        self._failed_reqs.clear()  # end of the step: the next one recomputes those requests' blocks
        if self._save is None:
            return
        refs, saves, values, _ = self._save
        self._save = None
        assert self.format is not None
        keys: list[bytes] = []
        parents: list[bytes | None] = []
        row = 0
        hdr = values[:, :self.format.header_len].numpy()
        for t in saves:
            tkeys = self._keys(t)
            for j, b in enumerate(t.blocks):
                hdr[row] = np.frombuffer(self.format.header(block_hash=b.block_hash, parent_hash=b.parent_hash,
                                                            index=b.index, lora=t.lora, token_ids=b.token_ids),
                                         dtype=np.uint8)
                keys.append(tkeys[j])
                # the chain's parent (so memkv evicts tails before heads); block 0 has none
                parents.append(tkeys[j - 1] if j > 0 else (
                    block_key(model_id=self.model_id, layout_fp=self.format.layout_fp, lora=t.lora_key,
                              salt=t.salt, block_hash=b.parent_hash) if b.parent_hash is not None else None))
                row += 1
        del refs
        self.sender.submit(_Batch(keys, values, parents))

    def shutdown(self) -> None:
        self.sender.close(self.settings.store.timeout)
        self.store.close()


# -- the connector vLLM loads ------------------------------------------------------------------------
class MemKVConnector(KVConnectorBase_V1):
    """memkv as vLLM's KV connector (module docstring: configuration, protocol, failures, counters)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self.settings = Settings.from_extra(dict(cfg.kv_connector_extra_config or {}))
        self.counters = _Counters()
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self.settings.load_failure == "recompute" and cfg.kv_load_failure_policy != "recompute":
                # vLLM's default fails a request whose KV did not load; for a cache the right answer is to
                # recompute those tokens. The scheduler reads this field right after creating its connector.
                cfg.kv_load_failure_policy = "recompute"
                logger.info("memkv: kv_load_failure_policy set to 'recompute' (load_failure=recompute)")
            self._scheduler = _SchedulerSide(vllm_config, kv_cache_config, self.settings, self.counters)
        else:
            self._worker = _WorkerSide(vllm_config, kv_cache_config, self.settings, self.counters)
        logger.info("memkv connector (%s) for %s, namespace %s, transport %s", role.name, self.settings.store.url,
                    self.settings.store.namespace, self.settings.store.transport)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that did not happen is a later miss, never a wrong answer

    def stats(self) -> dict[str, int | float]:
        """Cumulative counters of this half (scheduler: lookups, hits; worker: loads, saves)."""
        return self.counters.totals()

    # -- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.handshake() if self._worker is not None else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, MemKVMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every loaded page is in place before the forward pass (_WorkerSide.start_load_kv)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, MemKVMetadata)
        self._worker.save_kv_layer(meta, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.counters.take_interval()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # -- scheduler side
    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata],
                                             ) -> None:
        if self._scheduler is not None:
            self._scheduler.set_layouts(metadata)

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            self._scheduler.request_finished(request)
        return False, None  # saves copy the pages within the step: the blocks can be freed now

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return MemKVConnectorStats(data=data) if data else MemKVConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]],
                           ) -> KVConnectorPromMetrics | None:
        return MemKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
