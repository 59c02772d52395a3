"""The memkv peer: a node subprocess (``memkv serve``) and an adapter over the §9 SyncClient."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Self

from bench.procs import PeerServers


def memkv_command() -> list[str]:
    """The installed ``memkv`` console script next to this interpreter, else ``python -m memkv.cli``."""
    script = Path(sys.executable).parent / "memkv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memkv.cli"]


class MemkvNode(PeerServers):
    """``memkv serve --listen 127.0.0.1:PORT --memory SIZE`` as a subprocess."""

    def __init__(self, workdir: Path, memory: str = "2GiB", host: str = "127.0.0.1", pythonpath: str = "",
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, host)
        self.extra_args = extra_args  # more `memkv serve` options (bench/route.py: --kv-events)
        self.pythonpath = pythonpath  # another commit's install (bench/baseline.py) runs instead of this tree
        self.memory = memory
        self.log = workdir / "memkv-node.log"

    @property
    def url(self) -> str:
        return f"memkv://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            *([sys.executable, "-m", "memkv.cli"] if self.pythonpath else memkv_command()), "serve",
            "--listen", f"{self.host}:{self.port}",
            "--memory", self.memory,
            "--data-dir", str(self.workdir / "memkv-data"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=self.pythonpath) if self.pythonpath else None
        self.spawn(self.command(), self.port, self.log, timeout, env=env)
        return self


class MemkvAdapter:
    """Benchmark operations on one ``memkv.client.SyncClient`` (the client API in README "Using it")."""

    ops = frozenset({"put", "get", "get_into", "get_many", "get_many_into"})

    def __init__(self, url: str, transport: str = "tcp") -> None:
        from memkv.client import SyncClient

        self.name = "memkv" if transport == "tcp" else f"memkv-{transport}"
        self.c: Any = SyncClient.connect(url, transport=transport)

    def put(self, key: bytes, value: bytes) -> None:
        self.c.put(key, value)

    def get(self, key: bytes) -> bytes | None:
        return self.c.get(key)  # type: ignore[no-any-return]

    def get_into(self, key: bytes, buf: bytearray) -> int | None:
        return self.c.get_into(key, buf)  # type: ignore[no-any-return]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return self.c.get_many(keys)  # type: ignore[no-any-return]

    def get_many_into(self, keys: list[bytes], bufs: list[bytearray]) -> list[int | None]:
        return self.c.get_many_into(keys, bufs)  # type: ignore[no-any-return]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self.c.put_many(items)

    def delete_many(self, keys: list[bytes]) -> None:
        for key in keys:
            self.c.delete(key)

    def reset(self) -> None:
        """memkv has no FLUSHALL; the driver deletes what it wrote instead."""

    def close(self) -> None:
        self.c.close()
