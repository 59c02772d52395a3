"""memkv as an LMCache remote storage plugin (LMCache's ``remote_storage_plugins``).

LMCache loads it by configuration alone (LMCache 0.5.x, YAML or the
``lmcache.*`` keys of vLLM's ``kv_connector_extra_config``)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5
    remote_storage_plugins: ["memkv"]
    extra_config:
      remote_storage_plugin.memkv.module_path: memkv.client.lmcache
      remote_storage_plugin.memkv.class_name: MemKVConnectorAdapter
      remote_storage_plugin.memkv.url: etcd://HOST:2379/prod      # or memkv://HOST:PORT
      # optional: .tenant .token (or MEMKV_TENANT / MEMKV_TOKEN) .namespace .transport .timeout .lease

The plugin name must be ``memkv`` (or ``memkv.<instance>``): LMCache hands the
adapter the URL ``plugin://<name>`` and the adapter claims its own type only.

Why a ``RemoteConnector``: LMCache's ``RemoteBackend`` wraps it with what every
remote store needs and memkv should not reimplement — staging through the
local CPU backend's allocator, (de)serialisation, put-task bookkeeping, the
health monitor that calls ``ping``. The connector does the I/O:

- values are LMCache memory objects sent from and received into their own
  buffers (``put_many`` of ``byte_array`` views, ``get_many_into`` them): no
  intermediate copy; a shorter value (the last, partial chunk of a prompt) is
  reshaped with LMCache's own ``reshape_partial_chunk``;
- ``batched_contains`` / ``batched_async_contains`` are one ``lookup_prefix``,
  which also leases the chunks it reports so they are still there when
  LMCache's retrieve follows (the exists -> get race);
- keys are LMCache's own chunk keys (model, world size, worker, chunk hash,
  dtype, tags) under a fingerprint of the chunk layout (shapes, dtypes, memory
  format), so a deployment with another chunk size or KV layout never reads them;
- the client is blocking with a timeout, run on a small thread pool so LMCache's
  event loop never waits on a socket; a dead node raises within the timeout and
  LMCache's ``RemoteBackend`` turns that into a miss.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import xxhash
from lmcache.logging import init_logger
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from memkv.client.engine_config import EngineStoreConfig
from memkv.errors import KeyExists, MemKVError

logger = init_logger(__name__)

PLUGIN_TYPE = "memkv"
T = TypeVar("T")


def _byte_view(obj: MemoryObj) -> memoryview:
    view = obj.byte_array
    view = view if isinstance(view, memoryview) else memoryview(view)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class MemKVConnectorAdapter(ConnectorAdapter):
    """What ``remote_storage_plugin.memkv.class_name`` names: builds the connector for ``plugin://memkv``."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        name = context.plugin_name or PLUGIN_TYPE
        store = EngineStoreConfig.from_mapping(context.config.extra_config or {},
                                               prefix=f"remote_storage_plugin.{name}.")
        return MemKVRemoteConnector(store, context)


class MemKVRemoteConnector(RemoteConnector):
    """LMCache ``RemoteConnector`` over a memkv ``SyncClient``."""

    def __init__(self, store: EngineStoreConfig, context: ConnectorContext, *, io_threads: int = 4) -> None:
        super().__init__(context.config, context.metadata)
        self.store = store
        self.loop = context.loop
        self.local_cpu_backend = context.local_cpu_backend
        self.client = store.connect()
        # The chunk layout is part of every key: another chunk size, model geometry or format
        # under the same LMCache key string must never be read as this one.
        layout = repr((list(self.meta_shapes), list(self.meta_dtypes), str(self.meta_fmt)))
        self.prefix = f"lmcache/{xxhash.xxh3_64_hexdigest(layout.encode())}/"
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="memkv-lmcache")

    def key_name(self, key: CacheEngineKey) -> bytes:
        return (self.prefix + key.to_string()).encode()

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call off LMCache's event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- contains ---------------------------------------------------------------------------
    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        """How many leading chunks memkv holds; those are leased for the retrieve that follows."""
        if not keys:
            return 0
        return self.client.lookup_prefix([self.key_name(k) for k in keys], lease=self.store.lease,
                                         namespace=self.store.namespace)

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        return await self._io(self.batched_contains, keys)

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self.client.exists_many([self.key_name(key)], namespace=self.store.namespace)[0]

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._io(self.exists_sync, key)

    # -- get --------------------------------------------------------------------------------
    def support_batched_get(self) -> bool:
        return True

    def _get_many(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        objs: list[MemoryObj] = []
        for _ in keys:  # LMCache's allocator: the buffers the values are received into
            obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
            if obj is None:
                break  # no room: fetch what fits, the rest is a miss
            objs.append(obj)
        try:
            got = self.client.get_many_into([self.key_name(k) for k in keys[:len(objs)]],
                                            [_byte_view(o) for o in objs], namespace=self.store.namespace)
        except BaseException:
            for obj in objs:
                obj.ref_count_down()
            raise
        out: list[MemoryObj | None] = []
        for obj, n in zip(objs, got, strict=True):
            if n is None or n == 0 or n % self.single_token_size:
                obj.ref_count_down()  # missing, corrupt, or not a whole number of tokens of this layout
                out.append(None)
            else:
                out.append(self.reshape_partial_chunk(obj, n))
        return out + [None] * (len(keys) - len(objs))

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        return await self._io(self._get_many, keys)

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return (await self.batched_get([key]))[0]

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        """The leading run of chunks that arrived; any after a hole are released."""
        got = await self.batched_get(keys)
        out: list[MemoryObj] = []
        for i, obj in enumerate(got):
            if obj is None:
                for later in got[i + 1:]:
                    if later is not None:
                        later.ref_count_down()
                break
            out.append(obj)
        return out

    # -- put --------------------------------------------------------------------------------
    def support_batched_put(self) -> bool:
        return True

    def _put_many(self, keys: list[CacheEngineKey], objs: list[MemoryObj]) -> None:
        items = [(self.key_name(k), _byte_view(o)) for k, o in zip(keys, objs, strict=True)]
        try:
            self.client.put_many(items, namespace=self.store.namespace)
        except KeyExists:
            pass  # another worker stored this chunk first (first writer wins); the rest were written

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        await self._io(self._put_many, keys, memory_objs)

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    # -- the rest ---------------------------------------------------------------------------
    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when every node answers (LMCache's health monitor); 1 otherwise."""
        try:
            await self._io(self.client.ping)
            return 0
        except MemKVError as exc:
            logger.warning("memkv ping failed: %s", exc)
            return 1

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return bool(self.client.delete(self.key_name(key), namespace=self.store.namespace))

    async def list(self) -> list[str]:
        """memkv has no key listing in its client API; LMCache uses this only for debugging."""
        return []

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def __repr__(self) -> str:
        return f"<MemKVRemoteConnector {self.store.url} ns={self.store.namespace}>"
