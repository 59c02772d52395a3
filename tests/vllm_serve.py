"""Real ``vllm serve`` CPU processes for tests: a tiny Llama with seeded random weights, no downloads.

vLLM runs in its own venv (``.venv-vllm``, scripts/engine-venv.sh; ``$MEMKV_VLLM_PYTHON``
overrides it: memkv.vllm_engine.vllm_python), never in the test's interpreter.
``tiny_llama(dir)`` writes the model (config + safetensors) with that venv's transformers;
``VllmServer`` (bench/vllm_serve.py, shared with bench/route.py) starts vLLM's
OpenAI server on it with vLLM's own KV events enabled and token-id prompts,
optionally with memkv's connector.
Callers hold the shared heavy-work lock (``heavy_lock``) while vLLM runs:
other engineers' tests start vLLM too and two at once exhaust the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.vllm_serve import VllmServer
from memkv.vllm_engine import run_make_model, vllm_python

# Engine processes need ~3 GB and both cores: on a machine shared by several test runs
# (developers' worktrees), one run's engines go at a time. Alone (CI) the lock is free at once.
HEAVY_LOCK = os.environ.get("MEMKV_HEAVY_LOCK", "/tmp/memkv-heavy.lock")
__all__ = ["VllmServer", "engine_python", "heavy_lock", "tiny_llama"]


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
