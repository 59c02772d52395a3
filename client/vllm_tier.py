"""memkv as a secondary tier of vLLM's native KV offloading (``TieringOffloadingSpec``).

vLLM offloads KV pages from the GPU into a CPU primary tier it manages itself
(an mmap'd region of fixed-size chunks) and cascades every chunk it stores there
to each configured secondary tier; when the CPU tier has evicted a chunk that a
later prompt needs, a secondary tier that holds it copies it back into a primary
slot ("promotion"). This module is such a tier, loaded by configuration alone::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8589934592,
        "secondary_tiers": [{"type": "MemKVTier", "module_path": "memkv.client.vllm_tier",
                             "url": "etcd://HOST:2379/prod"}]}}'

Tier settings (besides ``type`` and ``module_path``): ``url`` (required),
``tenant``, ``token`` (or ``MEMKV_TENANT`` / ``MEMKV_TOKEN``), ``namespace``,
``transport``, ``timeout``, ``lease``, ``io_threads``, ``enable_kv_events``,
``locality``, and vLLM's own ``backpressure``.

Why it is shaped like this (vLLM's ``SecondaryTierManager`` contract, 0.32):
every method runs on the scheduler thread and must not block, so lookups go
through vLLM's ``AsyncLookupManager`` (one batched round trip per request per
scheduler step, ``RETRY`` until it answers) and stores and loads run on a small
thread pool, reporting through ``get_finished_jobs``. Values are whole primary
chunks, sent from and received into the primary tier's own memory (no staging
copy). A chunk's memkv key is the name vLLM's file-system tier would give it
(``FileMapper``): the model, dtype, block and chunk geometry, parallel layout
and KV-cache groups are hashed into it, so engines with a different layout never
share a value. Every failure — node down, timeout, a value of the wrong size —
becomes a failed job or a miss, never an exception into the scheduler: vLLM then
recomputes those tokens.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, ClassVar

from vllm.logger import init_logger
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobId, JobResult, SecondaryTierManager, TransferJob
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from memkv.client.engine_config import EngineStoreConfig
from memkv.errors import KeyExists

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

logger = init_logger(__name__)

KEY_ROOT = "vllm-tier"  # first component of every key this tier writes


class _MemKVLookups(AsyncLookupManager):
    """One memkv round trip per request per step: the leading run is leased, the rest probed."""

    def __init__(self, tier: MemKVTier) -> None:
        super().__init__(tier_type=tier.tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        # Runs on vLLM's lookup thread. An exception here is logged by vLLM and counts as a miss.
        return self._tier.exists(keys)


class MemKVTier(SecondaryTierManager):
    """vLLM secondary offloading tier backed by a memkv store (node or cluster)."""

    medium: ClassVar[Medium] = Medium.STORAGE  # outside this host's memory, as vLLM's fs and obj tiers
    cache_hit_source: ClassVar[CacheHitSource] = CacheHitSource.EXTERNAL_UNSPECIFIED  # a remote store

    def __init__(self, offloading_spec: OffloadingSpec, primary_kv_view: memoryview, tier_type: str, *,
                 url: str, tenant: str | None = None, token: str | None = None, namespace: str | None = None,
                 transport: str | None = None, timeout: float | None = None, lease: float | None = None,
                 io_threads: int = 4, enable_kv_events: bool = False, locality: str | None = "REMOTE",
                 backpressure_detector: BackpressureDetector | None = None) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        self.store = EngineStoreConfig.from_mapping({
            "url": url, "tenant": tenant, "token": token, "namespace": namespace, "transport": transport,
            "timeout": timeout, "lease": lease})
        # Fail at start-up, with the reason, when the store cannot be reached at all; later
        # failures only turn into misses and failed jobs.
        self.client = self.store.connect()
        self._names = FileMapper.from_offloading_spec(KEY_ROOT, offloading_spec,
                                                      blocks_per_file=offloading_spec.blocks_per_chunk,
                                                      parallel_agnostic=True)
        # The primary region is (num_chunks, chunk bytes); a flat byte view lets each chunk be sliced
        # out without copying (a 2-D memoryview cannot be indexed by row).
        self._flat = primary_kv_view.cast("B")
        self._events: list[OffloadingEvent] | None = None
        if enable_kv_events:
            if offloading_spec.kv_events_config.enable_kv_cache_events:
                self._events = []
            else:
                logger.warning("MemKVTier: enable_kv_events is set but vLLM's KV cache events are off")
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(io_threads)), thread_name_prefix="memkv-tier")
        self._inflight: dict[JobId, Future[None]] = {}  # scheduler thread only
        self._finished: queue.SimpleQueue[tuple[JobResult, list[OffloadKey], list[OffloadKey]]] = (
            queue.SimpleQueue())  # (result, stored keys for events, keys that failed to load)
        self._lookups = _MemKVLookups(self)
        self._closed = threading.Event()

    # -- naming -------------------------------------------------------------------------------
    def key_name(self, key: OffloadKey) -> bytes:
        """The memkv key of one vLLM chunk (layout identity + rank + group + vLLM's block hash)."""
        return self._names.get_file_name(key).encode()

    def _chunk(self, chunk_id: int) -> memoryview:
        size = self.block_size_bytes
        start = int(chunk_id) * size
        return self._flat[start:start + size]

    # -- lookups (lookup thread) --------------------------------------------------------------
    def exists(self, keys: list[OffloadKey]) -> list[bool]:
        """Per key: does memkv hold it. The leading run is also leased, so the promotion that
        follows a hit finds it even if the node is evicting meanwhile."""
        names = [self.key_name(k) for k in keys]
        n = self.client.lookup_prefix(names, lease=self.store.lease, namespace=self.store.namespace)
        hits = [True] * n
        if n < len(names):
            hits.append(False)
            rest = names[n + 1:]
            if rest:  # a later chunk can still matter (sliding-window groups look up from the end)
                hits.extend(self.client.exists_many(rest, namespace=self.store.namespace))
        return hits

    # -- SecondaryTierManager ---------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, self._store)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, self._load)

    def _submit(self, job: TransferJob, work: Any) -> None:
        keys = list(job.keys)
        chunk_ids = [int(c) for c in job.chunk_ids]
        if len(keys) != len(chunk_ids):
            raise ValueError(f"MemKVTier: job {job.job_id} has {len(keys)} keys for {len(chunk_ids)} chunks")
        self._inflight[job.job_id] = self._pool.submit(self._run, work, job.job_id, keys, chunk_ids)

    def _run(self, work: Any, job_id: JobId, keys: list[OffloadKey], chunk_ids: list[int]) -> None:
        """Pool thread: do one job and queue its result; nothing escapes to the scheduler."""
        t0 = time.monotonic()
        try:
            result = work(job_id, keys, chunk_ids, t0)
        except Exception as exc:  # a node failure, a timeout, a refused value: the whole job failed
            logger.warning("MemKVTier: job %d (%d chunks) failed: %s: %s", job_id, len(keys),
                           type(exc).__name__, exc)
            result = (JobResult(job_id=job_id, success=False), [], keys if work == self._load else [])
        self._finished.put(result)

    def _store(self, job_id: JobId, keys: list[OffloadKey], chunk_ids: list[int],
               t0: float) -> tuple[JobResult, list[OffloadKey], list[OffloadKey]]:
        names = [self.key_name(k) for k in keys]
        ns = self.store.namespace
        present = self.client.exists_many(names, namespace=ns)  # never resend what the store has
        todo = [i for i, p in enumerate(present) if not p]
        if todo:
            try:
                self.client.put_many([(names[i], self._chunk(chunk_ids[i])) for i in todo], namespace=ns)
            except KeyExists:
                # Another engine stored one of these chunks first (first writer wins). The others
                # of the batch were written; count the job as stored only if all are there now.
                if not all(self.client.exists_many([names[i] for i in todo], namespace=ns)):
                    raise
        result = JobResult(job_id=job_id, success=True, transfer_time=time.monotonic() - t0,
                           transfer_bytes=len(todo) * self.block_size_bytes)
        return result, keys, []

    def _load(self, job_id: JobId, keys: list[OffloadKey], chunk_ids: list[int],
              t0: float) -> tuple[JobResult, list[OffloadKey], list[OffloadKey]]:
        names = [self.key_name(k) for k in keys]
        got = self.client.get_many_into(names, [self._chunk(c) for c in chunk_ids], namespace=self.store.namespace)
        size = self.block_size_bytes
        # A missing value (evicted since the lookup, corrupt, node gone) or one of another size
        # (another layout under the same name should be impossible, but is never loaded) fails.
        ok = [k for k, n in zip(keys, got, strict=True) if n == size]
        failed = [k for k, n in zip(keys, got, strict=True) if n != size]
        elapsed = time.monotonic() - t0
        if failed:
            logger.warning("MemKVTier: %d of %d chunks could not be loaded (job %d)", len(failed), len(keys), job_id)
            return (JobResult(job_id=job_id, success=False, successful_keys=tuple(ok) or None,
                              transfer_time=elapsed, transfer_bytes=len(ok) * size), [], failed)
        return JobResult(job_id=job_id, success=True, transfer_time=elapsed, transfer_bytes=len(ok) * size), [], []

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results = []
        while True:
            try:
                result, stored, failed = self._finished.get_nowait()
            except queue.Empty:
                return results
            self._inflight.pop(result.job_id, None)
            if failed:  # stop this request from retrying a doomed promotion; it recomputes instead
                self._lookups.mark_miss(failed)
            if self._events is not None and result.success and stored:
                self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False,
                                                    locality=self.locality))
            results.append(result)

    def has_pending_work(self) -> bool:
        return bool(self._inflight)

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self._events:
            events, self._events = self._events, []
            yield from events

    def drain_jobs(self) -> None:
        """Wait for every submitted job; each ends within the client timeout (a dead node fails fast)."""
        wait_futures(list(self._inflight.values()))

    def shutdown(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._lookups.shutdown()
        self._pool.shutdown(wait=True)
        self.client.close()
        self._flat.release()  # vLLM unmaps the primary region next; no view of it may remain
