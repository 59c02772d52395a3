"""Redis as the KV-block store behind the same integration (client/kvcache.py), for bench/ttft.py.

``RedisKVStore`` has the slice of the memkv client surface that
``KVCacheConnector`` uses — ``exists_many``, ``put_many``, ``lookup_prefix``,
``get_many_into``, ``get`` — implemented the way a Redis-backed connector
(e.g. LMCache's Redis backend) does it with redis-py: pipelined ``EXISTS`` /
``SET``, and ``MGET`` whose replies are copied into the caller's buffers.
Redis has no leases: ``lookup_prefix`` only counts (a block may be evicted
between the lookup and the fetch; the connector then uses the run before the hole).
Namespaces become key prefixes ``<namespace>:``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memkv.client.buffers import byte_view
from memkv.errors import InvalidArgument


class RedisKVStore:
    def __init__(self, host: str, port: int) -> None:
        import redis

        self.r: Any = redis.Redis(host=host, port=port, decode_responses=False, single_connection_client=True)
        self.r.ping()

    @staticmethod
    def _k(key: bytes, namespace: str) -> bytes:
        return namespace.encode() + b":" + bytes(key)

    def exists_many(self, keys: Iterable[bytes], *, namespace: str = "shared") -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._k(k, namespace))
        return [bool(x) for x in pipe.execute()]

    def put_many(
        self,
        items: Iterable[tuple[bytes, Any]],
        *,
        namespace: str = "shared",
        ttl: float | None = None,
        pin: bool = False,
        parents: list[bytes | None] | None = None,
    ) -> None:
        pipe = self.r.pipeline(transaction=False)
        for k, v in items:
            view = byte_view(v)
            if ttl is not None:
                pipe.set(self._k(k, namespace), view, px=int(ttl * 1000))
            else:
                pipe.set(self._k(k, namespace), view)
        pipe.execute()

    def lookup_prefix(self, keys: Iterable[bytes], *, lease: float = 5.0, namespace: str = "shared") -> int:
        n = 0
        for present in self.exists_many(list(keys), namespace=namespace):
            if not present:
                break
            n += 1
        return n

    def get(self, key: bytes, *, namespace: str = "shared") -> bytes | None:
        return self.r.get(self._k(key, namespace))  # type: ignore[no-any-return]

    def get_many_into(
        self, keys: Iterable[bytes], buffers: list[Any], *, namespace: str = "shared"
    ) -> list[int | None]:
        ks = [self._k(k, namespace) for k in keys]
        if len(ks) != len(buffers):
            raise InvalidArgument("get_many_into needs one buffer per key")
        values = self.r.mget(ks) if ks else []
        out: list[int | None] = []
        for v, buf in zip(values, buffers, strict=True):
            if v is None:
                out.append(None)
                continue
            view = byte_view(buf, writable=True)
            if len(v) > view.nbytes:
                raise InvalidArgument(f"buffer of {view.nbytes} bytes is too small for a value of {len(v)} bytes")
            view[: len(v)] = v
            out.append(len(v))
        return out

    def close(self) -> None:
        self.r.close()
