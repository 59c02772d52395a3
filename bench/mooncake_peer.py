"""The Mooncake Store peer, over its TCP transport: ``mooncake_master`` (with its HTTP metadata
server), one ``mooncake_client`` process that holds the store's memory (its global segment), and
``MooncakeDistributedStore`` clients that hold none (segment 0) and fetch values over TCP.

Mooncake runs from its own venv (``.venv-mooncake``: ``pip install mooncake-transfer-engine-non-cuda``,
with Debian's ``libibverbs1 ibverbs-providers librdmacm1``; ``MEMKV_MOONCAKE_VENV`` names another):
the adapter adds that venv's site-packages to the path of the benchmark's worker process (same
CPython 3.11). Clients need ``MC_TCP_BIND_ADDRESS=127.0.0.1``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Self

from bench.procs import PeerServers, free_port

ROOT = Path(__file__).resolve().parent.parent
SEGMENT = "3GB"
LOCAL_BUFFER = 256 << 20


def mooncake_venv() -> Path:
    return Path(os.environ.get("MEMKV_MOONCAKE_VENV") or ROOT / ".venv-mooncake")


class MooncakeServer(PeerServers):
    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        super().__init__(workdir, host)  # self.port: the master's RPC port (what PeerSpec carries)
        self.http_port = free_port(host)
        self.holder_port = free_port(host)

    def start(self) -> Self:
        bin_ = mooncake_venv() / "bin"
        if not (bin_ / "mooncake_master").exists():
            raise RuntimeError(f"no {bin_}/mooncake_master (pip install mooncake-transfer-engine-non-cuda there)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MC_TCP_BIND_ADDRESS=self.host)
        master = [str(bin_ / "mooncake_master"), f"-rpc_port={self.port}", "-enable_http_metadata_server=true",
                  f"-http_metadata_server_port={self.http_port}", f"-http_metadata_server_host={self.host}"]
        holder = [str(bin_ / "mooncake_client"), f"-host={self.host}", f"-port={self.holder_port}",
                  f"-global_segment_size={SEGMENT}", "-local_buffer_size=64MB",
                  f"-master_server_address={self.host}:{self.port}", f"-metadata_server={self.metadata}",
                  "-protocol=tcp"]
        self.spawn(master, self.port, self.workdir / "mooncake-master.log", timeout=30.0, env=env)
        self.spawn(holder, self.holder_port, self.workdir / "mooncake-holder.log", timeout=30.0, env=env)
        return self

    @property
    def metadata(self) -> str:
        return f"http://{self.host}:{self.http_port}/metadata"


class MooncakeAdapter:
    name = "mooncake"
    ops = frozenset({"put", "get", "get_into", "get_many", "get_many_into"})

    def __init__(self, host: str, port: int, metadata: str) -> None:
        site = next((mooncake_venv() / "lib").glob("python3*/site-packages"))
        if str(site) not in sys.path:
            sys.path.append(str(site))
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", host)
        import numpy as np
        from mooncake.store import MooncakeDistributedStore

        self.np = np
        self.s: Any = MooncakeDistributedStore()
        rc = self.s.setup(host, metadata, 0, LOCAL_BUFFER, "tcp", "", f"{host}:{port}")
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup failed ({rc})")
        # get_into/batch_get_into copy into memory registered with the transfer engine
        self.staging = np.empty(LOCAL_BUFFER // 2, dtype=np.uint8)
        self.s.register_buffer(self.staging.ctypes.data, self.staging.nbytes)

    def put(self, key: bytes, value: bytes) -> None:
        rc = self.s.put(key.decode(), value)
        if rc != 0:
            raise RuntimeError(f"mooncake put failed ({rc})")

    def get(self, key: bytes) -> bytes | None:
        v = self.s.get(key.decode())
        return v if v else None

    def get_into(self, key: bytes, buf: bytearray) -> int | None:
        n = self.s.get_into(key.decode(), self.staging.ctypes.data, len(buf))
        if n <= 0:
            return None
        memoryview(buf)[:n] = self.staging[:n]  # (the caller's buffer is not registered memory)
        return int(n)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return [v if v else None for v in self.s.get_batch([k.decode() for k in keys])]

    def get_many_into(self, keys: list[bytes], bufs: list[bytearray]) -> list[int | None]:
        size = len(bufs[0])
        addrs = [self.staging.ctypes.data + i * size for i in range(len(keys))]
        got = self.s.batch_get_into([k.decode() for k in keys], addrs, [size] * len(keys))
        out: list[int | None] = []
        for i, (n, buf) in enumerate(zip(got, bufs, strict=True)):
            if n <= 0:
                out.append(None)
                continue
            memoryview(buf)[:n] = self.staging[i * size:i * size + n]
            out.append(int(n))
        return out

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            self.put(k, v)

    def delete_many(self, keys: list[bytes]) -> None:
        for k in keys:
            self.s.remove(k.decode())

    def reset(self) -> None:
        self.s.remove_all()

    def close(self) -> None:
        self.s.close()
