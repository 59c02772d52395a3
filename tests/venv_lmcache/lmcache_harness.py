"""LMCache's own storage stack on CPU, wired to a memkv node (tests/venv_lmcache/ runs in .venv-lmcache).

``Managers().make(remote)`` builds LMCache's real ``StorageManager`` — its
LocalCPUBackend (the allocator every remote read lands in) and the remote
backend that the configuration names — exactly as LMCache's engine does from a
config, for a tiny model layout (2 layers, 2 KV heads of 32, chunks of 16
tokens, float32). ``remote`` is a dict of LMCache config keys:
``{"remote_storage_plugins": [...], "extra_config": {...}}`` or
``{"remote_url": "redis://..."}``.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from engine_packages import require

require("lmcache", "bash scripts/engine-venv.sh lmcache")

import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402

MODEL = "memkv-test/tiny-llama"
CHUNK = 16  # tokens per LMCache chunk
KV_SHAPE = (2, 2, CHUNK, 2, 32)  # layers, k/v, tokens, heads, head size


def plugin_config(url: str, **extra: Any) -> dict[str, Any]:
    """The configuration the README documents for the memkv plugin."""
    return {
        "remote_storage_plugins": ["memkv"],
        "extra_config": {
            "remote_storage_plugin.memkv.module_path": "memkv.client.lmcache",
            "remote_storage_plugin.memkv.class_name": "MemKVConnectorAdapter",
            "remote_storage_plugin.memkv.url": url,
            **{f"remote_storage_plugin.memkv.{k}": v for k, v in extra.items()},
        },
    }


def make_manager(remote: dict[str, Any]) -> StorageManager:
    config = LMCacheEngineConfig.from_dict({"chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.05,
                                            "blocking_timeout_secs": 10, **remote})
    metadata = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.float32, kv_shape=KV_SHAPE, chunk_size=CHUNK)
    return StorageManager(config, metadata, EventManager())


def chunk_keys(start: int, n: int) -> list[CacheEngineKey]:
    return [CacheEngineKey(MODEL, 1, 0, start + i, torch.float32) for i in range(n)]


def fill(manager: StorageManager, n: int, *, tokens: int = CHUNK, seed: int = 0) -> tuple[list, list[bytes]]:
    """``n`` LMCache memory objects of random KV (``tokens`` per chunk) and their bytes."""
    shapes = [torch.Size([2, 2, tokens, 64])]
    gen = torch.Generator().manual_seed(seed)
    objs, data = [], []
    for _ in range(n):
        obj = manager.allocate(shapes, [torch.float32])
        assert obj is not None, "LocalCPUBackend is full"
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=gen))
        objs.append(obj)
        data.append(bytes(obj.byte_array))
    return objs, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Managers:
    """StorageManagers made by one test, all closed at its end."""

    def __init__(self) -> None:
        self.made: list[tuple[StorageManager, bool]] = []

    def make(self, remote: dict[str, Any], *, close_remote: bool = True) -> StorageManager:
        """``close_remote=False`` leaves the remote backend unclosed: LMCache 0.5.6's
        ``RedisConnector.close`` / ``RESPConnector.close`` await ``pq_executor.shutdown(wait=True)``,
        a blocking wait on a coroutine of the very event loop it blocks — a deadlock with any
        Redis server, so the tests of those connectors must not trigger it."""
        manager = make_manager(remote)
        self.made.append((manager, close_remote))
        return manager

    def close(self) -> None:
        for manager, close_remote in self.made:
            if not close_remote:
                for name in [n for n in manager.storage_backends if n != "LocalCPUBackend"]:
                    manager.storage_backends.pop(name)
            with contextlib.suppress(Exception):
                manager.close()
