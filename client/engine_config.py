"""Where an inference-engine integration finds its memkv store, read one way for every engine.

vLLM's KV connector and offloading tier, the LMCache plugin and the SGLang
HiCache backend are each configured by a dict that belongs to the engine
(``kv_connector_extra_config``, a tier config, LMCache's ``extra_config``,
SGLang's ``--hicache-storage-backend-extra-config``). They
all carry the same few settings; only ``url`` is required. Tenant and token may
come from the environment instead (``MEMKV_TENANT`` / ``MEMKV_TOKEN``), so a
secret need not sit in a command line that every ``ps`` shows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memkv.errors import InvalidArgument


@dataclass(frozen=True)
class EngineStoreConfig:
    url: str
    tenant: str | None = None
    token: str | None = None
    namespace: str = "shared"
    transport: str = "auto"
    timeout: float = 5.0  # seconds; a dead node becomes a miss within this, never a hang
    lease: float = 30.0  # seconds a looked-up block stays leased for the load that follows

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], *, prefix: str = "") -> EngineStoreConfig:
        """Read ``{prefix}url``, ``{prefix}tenant``, ... from an engine's config dict."""

        def get(name: str) -> Any:
            return config.get(prefix + name)

        url = get("url")
        if not url or not isinstance(url, str):
            raise InvalidArgument(f"memkv: the engine config needs '{prefix}url' (memkv://HOST:PORT or "
                                  f"etcd://HOST:PORT/CLUSTER); got {url!r}")
        out = cls(url=url, tenant=get("tenant") or os.environ.get("MEMKV_TENANT") or None,
                  token=get("token") or os.environ.get("MEMKV_TOKEN") or None)
        overrides: dict[str, Any] = {}
        for name, kind in (("namespace", str), ("transport", str), ("timeout", float), ("lease", float)):
            value = get(name)
            if value is not None:
                try:
                    overrides[name] = kind(value)
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(f"memkv: '{prefix}{name}' = {value!r} is not a {kind.__name__}") from exc
        return cls(**{**out.__dict__, **overrides})

    def connect(self) -> Any:
        """A connected ``SyncClient`` (raises ``MemKVError`` if the store cannot be reached)."""
        from memkv.client.sync_client import SyncClient

        return SyncClient.connect(self.url, tenant=self.tenant, token=self.token, transport=self.transport,
                                  timeout=self.timeout)
