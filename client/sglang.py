"""memkv as an SGLang HiCache storage backend (the L3 tier behind SGLang's host memory pool).

Loaded by configuration alone::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "memkv", "module_path": "memkv.client.sglang",
        "class_name": "MemKVHiCacheStorage", "url": "etcd://HOST:2379/prod", "interface_v1": 1}'

``interface_v1: 1`` makes SGLang call the zero-copy ``batch_get_v1`` /
``batch_set_v1`` (without it SGLang copies every page through a staging tensor
and calls ``batch_get`` / ``batch_set``, which work too). Optional keys:
``tenant``, ``token`` (or ``MEMKV_TENANT`` / ``MEMKV_TOKEN``), ``namespace``,
``transport``, ``timeout``, ``lease``.

How a page is stored: SGLang's host pool describes each page as one or more
contiguous buffers (``get_page_buffer_meta``: K and V for an MHA page in the
``page_first`` layouts, one buffer for MLA, one per layer and K/V in
``layer_first``). Each buffer is one memkv value, sent from and received into
the pool's own memory — no copy. Keys are SGLang's page hash under a prefix
that names the model, the parallel shard (TP/PP/CP rank and size; MLA pages are
shared by all TP ranks, as SGLang's own backends do), the host-pool layout,
dtype and page size: engines with another layout never read a page.

Every call answers within the client timeout: a dead node, a missing or
short value becomes "not there" (``batch_exists`` counts only the leading
pages whose every buffer is present; the getters report per page), and SGLang
recomputes those tokens.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
import xxhash
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from memkv.client.engine_config import EngineStoreConfig
from memkv.errors import KeyExists, MemKVError

logger = logging.getLogger(__name__)


def _host_view(ptr: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes of the host pool at ``ptr`` (the pool outlives it)."""
    return memoryview((ctypes.c_char * size).from_address(ptr)).cast("B")


class MemKVHiCacheStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over a memkv ``SyncClient``."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        self.store = EngineStoreConfig.from_mapping(storage_config.extra_config or {})
        self.client = self.store.connect()
        # SGLang's own switch: with interface_v1 it calls the zero-copy getters/setters (pages as
        # host-pool buffers), without it the generic ones (pages as flat staging tensors).
        self.zero_copy = bool((storage_config.extra_config or {}).get("interface_v1", 0))
        self.mem_pool_host: Any = None
        self.prefix = ""  # set when SGLang registers its host pool (the layout is part of it)

    # -- identity ---------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        cfg = self.storage_config
        shard = ("mla" if cfg.is_mla_model else f"tp{cfg.tp_rank}of{cfg.tp_size}") + \
            f"-pp{cfg.pp_rank}of{cfg.pp_size}-cp{cfg.attn_cp_rank}of{cfg.attn_cp_size}-dcp{cfg.dcp_rank}of{cfg.dcp_size}"
        layout = (f"{type(mem_pool_host).__name__}-{mem_pool_host.layout}-{mem_pool_host.dtype}-"
                  f"page{mem_pool_host.page_size}-{mem_pool_host.size_per_token}B/token")
        model = (cfg.model_name or "model").replace("/", "-")[:120]
        identity = xxhash.xxh3_64_hexdigest(f"{model}|{shard}|{layout}".encode())
        self.prefix = f"sglang/{model}/{identity}/"

    def _page_buffers(self, host_indices: torch.Tensor, n_pages: int) -> list[list[memoryview]]:
        """Per page, the host-pool buffers that hold it (as SGLang's zero-copy backends read them)."""
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if n_pages == 0 or len(ptrs) % n_pages:
            raise ValueError(f"host pool gave {len(ptrs)} buffers for {n_pages} pages")
        per = len(ptrs) // n_pages
        views = [_host_view(int(p), int(s)) for p, s in zip(ptrs, sizes, strict=True)]
        return [views[i * per:(i + 1) * per] for i in range(n_pages)]

    def _names(self, key: str, n_buffers: int) -> list[bytes]:
        return [f"{self.prefix}{key}/{j}".encode() for j in range(n_buffers)]

    def _values_per_page(self) -> int:
        if not self.zero_copy:
            return 1
        one_page = torch.arange(self.mem_pool_host.page_size, dtype=torch.int64)
        return len(self.mem_pool_host.get_page_buffer_meta(one_page)[0])

    def _page_names(self, key: str, per: int) -> list[bytes]:
        return self._names(key, per) if self.zero_copy else [self._flat_name(key)]

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages memkv holds whole; they are leased for the load that follows."""
        if not keys:
            return 0
        per = self._values_per_page()
        names = [n for k in keys for n in self._page_names(k, per)]
        try:
            found = self.client.lookup_prefix(names, lease=self.store.lease, namespace=self.store.namespace)
        except MemKVError as exc:
            logger.warning("memkv: batch_exists of %d pages failed: %s", len(keys), exc)
            return 0
        return found // per

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- zero-copy interface (interface_v1) ------------------------------------------------
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pages = self._page_buffers(host_indices, len(keys))
        names = [n for k, bufs in zip(keys, pages, strict=True) for n in self._names(k, len(bufs))]
        bufs = [b for page in pages for b in page]
        try:
            got = self.client.get_many_into(names, bufs, namespace=self.store.namespace)
        except MemKVError as exc:
            logger.warning("memkv: batch_get_v1 of %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        ok = [n == len(b) for n, b in zip(got, bufs, strict=True)]
        per = len(pages[0])
        return [all(ok[i * per:(i + 1) * per]) for i in range(len(keys))]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not self.storage_config.is_storage_writer:  # MLA: one writer per shard stores the shared pages
            return [True] * len(keys)
        pages = self._page_buffers(host_indices, len(keys))
        per = len(pages[0])
        names = [n for k in keys for n in self._names(k, per)]
        bufs = [b for page in pages for b in page]
        ns = self.store.namespace
        try:
            present = self.client.exists_many(names, namespace=ns)  # never resend a page memkv has
            todo = [i for i, p in enumerate(present) if not p]
            if todo:
                try:
                    self.client.put_many([(names[i], bufs[i]) for i in todo], namespace=ns)
                except KeyExists:  # another engine stored it first (first writer wins)
                    present = self.client.exists_many(names, namespace=ns)
                else:
                    present = [True] * len(names)
        except MemKVError as exc:
            logger.warning("memkv: batch_set_v1 of %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        return [all(present[i * per:(i + 1) * per]) for i in range(len(keys))]

    # -- the generic interface (SGLang copies pages through flat staging tensors) ---------
    def _flat_name(self, key: str) -> bytes:
        return f"{self.prefix}{key}/flat".encode()

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        targets = list(target_locations)
        try:
            got = self.client.get_many_into([self._flat_name(k) for k in keys], targets, namespace=self.store.namespace)
        except MemKVError as exc:
            logger.warning("memkv: batch_get of %d pages failed: %s", len(keys), exc)
            return [None] * len(keys)
        return [t if n == t.numel() * t.element_size() else None for t, n in zip(targets, got, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        items = [(self._flat_name(k), v.contiguous()) for k, v in zip(keys, values, strict=True)]
        try:
            self.client.put_many(items, namespace=self.store.namespace)
        except KeyExists:
            return all(self.client.exists_many([n for n, _ in items], namespace=self.store.namespace))
        except MemKVError as exc:
            logger.warning("memkv: batch_set of %d pages failed: %s", len(keys), exc)
            return False
        return True

    def close(self) -> None:
        self.client.close()
