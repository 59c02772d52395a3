"""The memcached peer: a private ``memcached`` on a free loopback port and a pymemcache adapter.

pymemcache reads replies in ``RECV_SIZE`` chunks (4 KiB by default), which makes a 1 MiB GET cost 256
``recv`` calls in Python; the adapter raises that module constant to 1 MiB, the setting a user who
stores megabyte values would choose, so the comparison is with memcached and not with a default.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Self

from bench.procs import PeerServers

RECV_SIZE = 1 << 20
MAX_ITEM = "16m"  # the benchmark stores up to 4 MiB values (memcached's default item limit is 1 MiB)


class MemcachedServer(PeerServers):
    """``memcached`` bound to 127.0.0.1 on a free port, 4 GiB of memory, 2 worker threads."""

    def start(self) -> Self:
        exe = shutil.which("memcached")
        if exe is None:
            raise RuntimeError("memcached not found (apt-get install memcached)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "-l", self.host, "-p", str(self.port), "-U", "0", "-m", "4096", "-I", MAX_ITEM, "-t", "2"]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # (memcached refuses to run as root unless told which user to be)
        self.spawn(cmd, self.port, self.workdir / "memcached.log", timeout=15.0)
        return self


class MemcachedAdapter:
    """Benchmark operations on one pymemcache connection (text protocol, ``get_many`` is one ``get``)."""

    name = "memcached"
    ops = frozenset({"put", "get", "get_many"})

    def __init__(self, host: str, port: int) -> None:
        import pymemcache.client.base as base

        base.RECV_SIZE = RECV_SIZE  # (the module's documented read size; see the module docstring)
        self.c: Any = base.Client((host, port), no_delay=True, default_noreply=False)
        self.c.version()

    def put(self, key: bytes, value: bytes) -> None:
        if not self.c.set(key, value):
            raise RuntimeError("memcached set failed")

    def get(self, key: bytes) -> bytes | None:
        return self.c.get(key)  # type: ignore[no-any-return]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        got = self.c.get_many(keys)
        return [got.get(k) for k in keys]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        failed = self.c.set_many(dict(items))
        if failed:
            raise RuntimeError(f"memcached set_many failed for {len(failed)} keys")

    def delete_many(self, keys: list[bytes]) -> None:
        self.c.delete_many(keys)

    def reset(self) -> None:
        self.c.flush_all()

    def close(self) -> None:
        self.c.close()
