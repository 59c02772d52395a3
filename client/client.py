"""The trio client: ``Client.connect(url)`` -> put/get/... (the client API in README "Using it").

Each method asks the client core (``client/core/api.py``) for an operation
and runs it with the trio executor (``client/executors/trio_executor.py``);
many tasks may share one client.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

import trio

from memkv.client.core.api import ClientBase, ClientCore, check_transport
from memkv.client.core.requests import Op
from memkv.client.executors.trio_connection import TrioPool
from memkv.client.executors.trio_executor import TrioExecutor
from memkv.client.tls import client_context
from memkv.client.url import parse_url


class _Connecting:
    """``await Client.connect(...)`` or ``async with Client.connect(...) as c``."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._factory().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._factory()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()


class Client(ClientBase):
    """A trio client. Every method is a coroutine; many tasks may share one client."""

    _executor: TrioExecutor
    CLOSE_TIMEOUT_S = 2.0  # closing sends the last one-sided touches: never wait on a dead node for long

    @classmethod
    def connect(cls, url: str, *, tenant: str | None = None, token: str | None = None,
                transport: str = "auto", timeout: float = 5.0, pool_size: int = 2, tls: Any = None) -> _Connecting:
        check_transport(transport)

        async def factory() -> Client:
            parsed = parse_url(url)
            ctx = client_context(tls if tls is not None else parsed.tls)  # memkvs:// or tls=...
            pool = TrioPool(size=pool_size, tenant=tenant, token=token, connect_timeout=min(timeout, 2.0), tls=ctx)
            executor = TrioExecutor(pool, timeout=timeout)
            try:
                core = await executor.run(ClientCore.connect(parsed, transport=transport))
            except BaseException:
                pool.close()
                raise
            return cls(core, executor)

        return _Connecting(factory)

    async def execute(self, op: Op) -> Any:
        """Run an operation of the client core (``client.core``) — e.g. one of ``client/core/chains.py``."""
        return await self._executor.run(op)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.CLOSE_TIMEOUT_S):
                await self._executor.run(self.core.close())  # (sends the last one-sided touches)
        finally:
            self.pool.close()

    async def close(self) -> None:
        await self.aclose()

    # -- the API (README "Using it")
    async def put(self, key: bytes | str, value: Any, *, namespace: str = "shared", ttl: float | None = None,
                  pin: bool = False, parent: bytes | None = None, model: str | None = None,
                  no_store: bool = False) -> None:
        await self._executor.run(self.core.put(key, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent,
                                               model=model, no_store=no_store))

    async def get(self, key: bytes | str, *, namespace: str = "shared") -> bytes | None:
        return await self._executor.run(self.core.get(key, namespace=namespace))

    async def get_into(self, key: bytes | str, buffer: Any, *, namespace: str = "shared") -> int | None:
        return await self._executor.run(self.core.get_into(key, buffer, namespace=namespace))

    async def put_many(self, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *,
                       namespace: str = "shared", ttl: float | None = None, pin: bool = False,
                       parents: list[bytes | None] | None = None, model: str | None = None,
                       no_store: bool = False) -> None:
        await self._executor.run(self.core.put_many(items, namespace=namespace, ttl=ttl, pin=pin, parents=parents,
                                                    model=model, no_store=no_store))

    async def get_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bytes | None]:
        return await self._executor.run(self.core.get_many(keys, namespace=namespace))

    async def get_many_into(self, keys: Iterable[bytes | str], buffers: list[Any], *,
                            namespace: str = "shared") -> list[int | None]:
        return await self._executor.run(self.core.get_many_into(keys, buffers, namespace=namespace))

    async def exists_many(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> list[bool]:
        return await self._executor.run(self.core.exists_many(keys, namespace=namespace))

    async def delete(self, key: bytes | str, *, namespace: str = "shared") -> bool:
        return await self._executor.run(self.core.delete(key, namespace=namespace))

    async def pin(self, keys: Iterable[bytes | str], *, ttl: float | None = None,
                  namespace: str = "shared") -> int:
        return await self._executor.run(self.core.pin(keys, ttl=ttl, namespace=namespace))

    async def unpin(self, keys: Iterable[bytes | str], *, namespace: str = "shared") -> int:
        return await self._executor.run(self.core.unpin(keys, namespace=namespace))

    async def lookup_prefix(self, keys: Iterable[bytes | str], *, lease: float = 5.0,
                            namespace: str = "shared") -> int:
        return await self._executor.run(self.core.lookup_prefix(keys, lease=lease, namespace=namespace))

    async def stats(self) -> dict[str, Any]:
        return await self._executor.run(self.core.stats())

    async def ping(self) -> list[Any]:
        return await self._executor.run(self.core.ping())
