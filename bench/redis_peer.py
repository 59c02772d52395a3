"""The Redis peer: a private redis-server on a free loopback port and a redis-py (hiredis) adapter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Self

from bench.procs import PeerServers


class RedisServer(PeerServers):
    """``redis-server`` bound to 127.0.0.1 on a free port; persistence off, or with ``appendfsync``
    the append-only file on with that fsync policy (``always``, ``everysec``: bench/durable.py)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", *, appendfsync: str | None = None) -> None:
        super().__init__(workdir, host)
        self.appendfsync = appendfsync
        self.log = workdir / "redis.log"

    def start(self, timeout: float = 15.0) -> Self:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (make install / apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        aof = ["no"] if self.appendfsync is None else ["yes", "--appendfsync", self.appendfsync]
        cmd = [
            exe, "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", *aof, "--protected-mode", "no",
            "--daemonize", "no", "--dir", str(self.workdir), "--loglevel", "warning",
        ]  # fmt: skip
        self.spawn(cmd, self.port, self.log, timeout)
        return self

    def version(self) -> str:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()


class RedisAdapter:
    """Benchmark operations on one redis-py connection (RESP2, hiredis parser when installed)."""

    name = "redis"
    ops = frozenset({"put", "get", "get_many"})

    def __init__(self, host: str, port: int) -> None:
        import redis

        self.r: Any = redis.Redis(host=host, port=port, decode_responses=False, single_connection_client=True)
        self.r.ping()

    def put(self, key: bytes, value: bytes) -> None:
        self.r.set(key, value)

    def get(self, key: bytes) -> bytes | None:
        return self.r.get(key)  # type: ignore[no-any-return]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return self.r.mget(keys)  # type: ignore[no-any-return]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self.r.mset(dict(items))

    def delete_many(self, keys: list[bytes]) -> None:
        for i in range(0, len(keys), 512):
            self.r.delete(*keys[i : i + 512])

    def reset(self) -> None:
        self.r.flushdb()

    def close(self) -> None:
        self.r.close()


def hiredis_available() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)
