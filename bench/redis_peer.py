"""The Redis peer: a private redis-server on a free loopback port and a redis-py (hiredis) adapter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import free_port, stop_process, wait_for_tcp


class RedisServer:
    """``redis-server`` with persistence off, bound to 127.0.0.1 on a free port."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (make install / apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            exe, "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--daemonize", "no", "--dir", str(self.workdir), "--loglevel", "warning",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for_tcp(self.host, self.port, self.proc, timeout, self.log)
        return self

    def version(self) -> str:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
