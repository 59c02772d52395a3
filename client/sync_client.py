"""The blocking client: the same methods as ``Client``, usable from plain threads (the client API in README "Using it").

Each method asks the client core (``client/core/api.py``) for an operation
and runs it with the blocking executor (``client/executors/blocking_executor.py``)
on the caller's own thread: there is no event-loop hop per request. Many
threads may share one client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memkv.client.core.api import ClientBase, ClientCore, check_transport
from memkv.client.core.requests import Op
from memkv.client.executors.blocking_connection import BlockingPool
from memkv.client.executors.blocking_executor import BlockingExecutor
from memkv.client.tls import client_context
from memkv.client.url import parse_url


class SyncClient(ClientBase):
    """A blocking client. Many threads may share one client."""

    _executor: BlockingExecutor

    @classmethod
    def connect(cls, url: str, *, tenant: str | None = None, token: str | None = None,
                transport: str = "auto", timeout: float = 5.0, tls: Any = None) -> SyncClient:
        check_transport(transport)
        parsed = parse_url(url)
        ctx = client_context(tls if tls is not None else parsed.tls)  # memkvs:// or tls=...
        pool = BlockingPool(tenant=tenant, token=token, timeout=timeout, connect_timeout=min(timeout, 2.0), tls=ctx)
        executor = BlockingExecutor(pool)
        try:
            core = executor.run(ClientCore.connect(parsed, transport=transport))
        except BaseException:
            pool.close()
            raise
        return cls(core, executor)

    def execute(self, op: Op) -> Any:
        """Run an operation of the client core (``client.core``) — e.g. one of ``client/core/chains.py``."""
        return self._executor.run(op)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._executor.run(self.core.close())  # (sends the last one-sided touches)
        finally:
            self.pool.close()

    # -- the API (README "Using it")
    def put(self, key: bytes | str, value: Any, *, namespace: str = "shared", ttl: float | None = None,
            pin: bool = False, parent: bytes | None = None, model: str | None = None, no_store: bool = False) -> None:
        self._executor.run(self.core.put(key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent,
                                         model=model, no_store=no_store))

    def get(self, key: bytes | str, *, namespace: str = "shared") -> bytes | None:
        return self._executor.run(self.core.get(key, namespace=namespace))

    def get_into(self, key: bytes | str, buffer: Any, *, namespace: str = "shared") -> int | None:
        return self._executor.run(self.core.get_into(key, buffer, namespace=namespace))

    def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str = "shared",
                 ttl: float | None = None, pin: bool = False, parents: list[bytes | None] | None = None,
                 model: str | None = None, no_store: bool = False) -> None:
        self._executor.run(self.core.put_many(items, namespace=namespace, ttl=ttl, pin=pin, parents=parents,
                                              model=model, no_store=no_store))

    def get_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bytes | None]:
        return self._executor.run(self.core.get_many(keys, namespace=namespace))

    def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *,
                      namespace: str = "shared") -> list[int | None]:
        return self._executor.run(self.core.get_many_into(keys, buffers, namespace=namespace))

    def exists_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bool]:
        return self._executor.run(self.core.exists_many(keys, namespace=namespace))

    def delete(self, key: bytes | str, *, namespace: str = "shared") -> bool:
        return self._executor.run(self.core.delete(key, namespace=namespace))

    def pin(self, keys: Iterable[bytes | str], *, ttl: float | None = None, namespace: str = "shared") -> int:
        return self._executor.run(self.core.pin(keys, ttl=ttl, namespace=namespace))

    def unpin(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> int:
        return self._executor.run(self.core.unpin(keys, namespace=namespace))

    def lookup_prefix(self, keys: Iterable[bytes | str], *, lease: float = 5.0, namespace: str = "shared") -> int:
        return self._executor.run(self.core.lookup_prefix(keys, lease=lease, namespace=namespace))

    def stats(self) -> dict[str, Any]:
        return self._executor.run(self.core.stats())

    def ping(self) -> list[Any]:
        return self._executor.run(self.core.ping())
