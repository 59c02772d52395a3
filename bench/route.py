"""Routing benchmark: ``memkv route`` (GPU + memkv events) vs round-robin vs GPU-local events only.

    flock /tmp/memkv-heavy.lock python -m bench.route [--quick] [--repeats N] [--out bench/results]

Two ``vllm serve`` CPU replicas (bench/vllm_serve.py: a Llama-architecture
model with seeded random weights, float32, token-id prompts, prefix caching,
vLLM's own KV events), both with memkv's connector (they save every full block
to memkv and load what memkv has), one memkv node with KV events
(``--kv-events``). Three ``memkv route`` processes front the same replicas,
one per policy:

  prefix       the default: GPU events of the replicas + the node's events
               (a store hit counts for every replica, at its load cost);
  gpu-only     the replicas' own (vLLM's) events alone;
  round-robin  no index.

Workload, per pass: ``systems`` shared system prompts; ``convs``
conversations, each on one system prompt, with ``turns`` turns (turn 1 =
system prompt + a long first user message, its own ``document``; turn t =
system prompt + the earlier turns' user messages and the model's own greedy
answers + a new user message); ``concurrency`` client threads, each running
its conversations turn by turn, interleaved. TTFT is measured at the client,
through the router (streamed: time to the first token chunk). Every pass sends
the same token ids with its own ``cache_salt`` (vLLM folds it into its block
hashes, memkv keys blocks by them), so a pass finds nothing cached by an
earlier one and the policies' greedy answers can be compared token by token.
Passes rotate the policy order from repeat to repeat, after one unmeasured
warm-up pass.

Prefill tokens: per request, vLLM's usage (``prompt_tokens_details.cached_tokens``
counts GPU and connector hits); per pass, vLLM's
``vllm:prompt_tokens_by_source`` counters (local_compute, local_cache_hit,
external_kv_transfer) summed over both replicas. Writes ``route.json`` and
``route.png`` (``route_quick.*`` with ``--quick``) and prints a Markdown table
(docs/benchmarks.md). The caller holds the machine's heavy-work lock (two
vLLM processes run at once).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.memkv_peer import MemkvNode, memkv_command
from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp
from bench.report import write_results
from bench.ttft import pct
from bench.vllm import tokens
from bench.vllm_serve import VllmServer

POLICIES = ("prefix", "gpu-only", "round-robin")
LABELS = {"prefix": "memkv route (GPU + memkv events)", "gpu-only": "GPU-local events only (vLLM's)",
          "round-robin": "round-robin"}
SHORT = {"prefix": "memkv route", "gpu-only": "GPU events only", "round-robin": "round-robin"}
COLORS = {"prefix": "#2ca02c", "gpu-only": "#1f77b4", "round-robin": "#999999"}
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
MODEL = "bench"


@dataclass
class Sizes:
    systems: int = 2  # shared system prompts
    system_tokens: int = 512
    document: int = 768  # the first user message of each conversation (its own context: a document, code)
    convs: int = 8  # conversations per pass (conversation c uses system prompt c % systems)
    turns: int = 4
    user: int = 128  # tokens of each later user message
    answer: int = 32  # tokens generated per turn (greedy)
    concurrency: int = 2  # client threads
    repeats: int = 3  # passes per policy
    max_model_len: int = 4096
    model: dict[str, Any] = field(default_factory=lambda: {
        "layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1024, "vocab": 4096,
        "max_positions": 4096, "init_std": 0.1})


QUICK = Sizes(systems=2, system_tokens=256, document=256, convs=4, turns=2, user=32, answer=4, repeats=1,
              max_model_len=2048,
              model={"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 2048,
                     "max_positions": 2048, "init_std": 0.1})


class Conversation:
    """One conversation of a pass: its system prompt, user messages, and the answers it got."""

    def __init__(self, c: int, sizes: Sizes) -> None:
        v = sizes.model["vocab"]
        self.c = c
        self.system = c % sizes.systems
        self.prefix = tokens(sizes.system_tokens, f"system-{self.system}", v)
        self.messages = [tokens(sizes.document if t == 0 and sizes.document else sizes.user, f"conv-{c}-turn-{t}", v)
                         for t in range(sizes.turns)]
        self.history: list[int] = []

    def prompt(self, t: int) -> list[int]:
        return self.prefix + self.history + self.messages[t]


def complete(url: str, prompt: list[int], max_tokens: int, salt: str) -> dict[str, Any]:
    """One streamed completion through ``url``: TTFT at the client, the backend chosen, usage, token ids."""
    host, _, port = url.removeprefix("http://").partition(":")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, "cache_salt": salt,
            "ignore_eos": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    ttft = None
    ids: list[int] = []
    usage: dict[str, Any] = {}
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        backend = resp.getheader("x-memkv-backend")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or []:
                if ch.get("token_ids"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    ids += ch["token_ids"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    finally:
        conn.close()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"backend": backend, "ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "tokens": ids,
            "prompt_tokens": usage.get("prompt_tokens", len(prompt)), "cached_tokens": cached}


class Router:
    """``memkv route --policy P`` in front of the replicas, the node found by ``--store memkv://``."""

    def __init__(self, policy: str, replicas: list[VllmServer], store_url: str, log: Path) -> None:
        self.policy = policy
        self.port = free_port()
        cmd = [*memkv_command(), "route", "--listen", f"127.0.0.1:{self.port}", "--store", store_url,
               "--policy", policy]
        for i, s in enumerate(replicas, 1):
            cmd += ["--backend", f"{s.url}?events={s.events}&replay={s.replay}&topic={s.topic}&name=r{i}"
                                 f"&model={MODEL}"]
        self.log = log
        with open(log, "ab") as out:
            self.proc = popen_tied(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_for_tcp("127.0.0.1", self.port, self.proc, 60, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, workdir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.workdir = workdir
        self.samples: list[dict[str, Any]] = []
        self.warmup: list[dict[str, Any]] = []  # the warm-up pass: vLLM CPU's first prompts of a length are slow
        self.warmup_passes: list[dict[str, Any]] = []
        self.passes: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    def run_pass(self, router: Router, replicas: list[VllmServer], rep: int, run_id: str,
                 record: bool = True) -> None:
        """One policy's pass: every conversation, ``concurrency`` client threads, fresh cache_salt
        (``record=False``: the warm-up pass, kept apart)."""
        sizes = self.sizes
        policy = router.policy
        salt = f"{run_id}-{rep}-{policy}-{record}"
        samples = self.samples if record else self.warmup
        convs = [Conversation(c, sizes) for c in range(sizes.convs)]
        # conversation c -> thread (c // systems) % concurrency: every thread mixes the system prompts
        mine = [[cv for cv in convs if (cv.c // sizes.systems) % sizes.concurrency == w]
                for w in range(sizes.concurrency)]
        before = [s.metrics() for s in replicas]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()

        def client(w: int) -> None:
            for t in range(sizes.turns):
                for cv in mine[w]:
                    prompt = cv.prompt(t)
                    try:
                        out = complete(router.url, prompt, sizes.answer, salt)
                    except Exception as exc:  # recorded; the pass goes on
                        with self.lock:
                            self.errors.append(f"{policy} repeat {rep} conv {cv.c} turn {t}: {exc}")
                        return
                    cv.history += cv.messages[t] + out["tokens"]
                    with self.lock:
                        samples.append({"policy": policy, "repeat": rep, "conv": cv.c, "turn": t,
                                             "system": cv.system, **out})

        threads = [threading.Thread(target=client, args=(w,)) for w in range(sizes.concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)  # vLLM's metrics are published after the step that finished the request
        after = [s.metrics() for s in replicas]
        by_source = {src: sum(_by_source(a, src) - _by_source(b, src) for a, b in zip(after, before, strict=True))
                     for src in SOURCES}
        rows = [s for s in samples if s["policy"] == policy and s["repeat"] == rep]
        per_backend = {b: sum(1 for s in rows if s["backend"] == b) for b in sorted({s["backend"] for s in rows})}
        info = {"policy": policy, "repeat": rep, "wall_s": wall, "loadavg": [load0, os.getloadavg()[0]],
                "prompt_tokens_by_source": by_source, "requests_per_backend": per_backend,
                "ttft_p50_s": pct([s["ttft_s"] for s in rows if s["ttft_s"] is not None], 50)}
        (self.passes if record else self.warmup_passes).append(info)
        self.log(f"  {policy:12s}{'' if record else ' (warm-up)'} repeat {rep}: {len(rows)} requests in {wall:.1f} s, "
                 f"TTFT p50 "
                 f"{1e3 * info['ttft_p50_s']:.0f} ms, prompt tokens {by_source}, backends {per_backend}")

    def run(self) -> dict[str, Any]:
        from bench.machine import machine_info
        from memkv.vllm_engine import kv_transfer_config, run_make_model, vllm_python

        sizes = self.sizes
        out: dict[str, Any] = {"command": "flock /tmp/memkv-heavy.lock python -m bench.route " + " ".join(sys.argv[1:]),
                               "sizes": asdict(sizes), "policies": list(POLICIES)}
        with contextlib.suppress(Exception):
            out["machine"] = machine_info()
        t_start = time.perf_counter()
        python = vllm_python()
        model = run_make_model(python, self.workdir / "model", **sizes.model)
        events_port = free_port()
        node = MemkvNode(self.workdir / "memkv", memory=self.args.memory,
                         extra_args=("--kv-events", f"tcp://127.0.0.1:{events_port}"))
        replicas: list[VllmServer] = []
        routers: dict[str, Router] = {}
        try:
            node.start()
            connector = kv_transfer_config(node.url, model_id=MODEL)
            replicas = [VllmServer(model, free_port(), free_port(), free_port(), f"kv@r{i}@{MODEL}",
                                   self.workdir / f"vllm-r{i}.log", kv_transfer=connector, python=python,
                                   served_name=MODEL, max_model_len=sizes.max_model_len)
                        for i in (1, 2)]
            for s in replicas:
                s.wait_ready(timeout=600)
            out["startup_s"] = time.perf_counter() - t_start
            self.log(f"node and 2 replicas up in {out['startup_s']:.0f} s")
            for i, s in enumerate(replicas):  # the first forward passes cost seconds: not in any pass
                complete(s.url, tokens(300, f"warm-up-{i}", sizes.model["vocab"]), 2, f"warm-up-{i}")
            routers = {p: Router(p, replicas, node.url, self.workdir / f"route-{p}.log") for p in POLICIES}
            time.sleep(2.0)  # the routers subscribe and replay what the replicas and the node announced
            run_id = f"{os.getpid()}-{int(time.time())}"
            self.run_pass(routers["round-robin"], replicas, -1, run_id, record=False)
            for rep in range(sizes.repeats):
                order = POLICIES[rep % 3:] + POLICIES[:rep % 3]
                self.log(f"repeat {rep + 1}/{sizes.repeats}: {', '.join(order)}")
                for p in order:
                    self.run_pass(routers[p], replicas, rep, run_id)
                self.collect(out, t_start)
                write_results(out, Path(self.args.out), self.name(), plot)
            out["router_metrics"] = {p: _router_metrics(r.url) for p, r in routers.items()}
        finally:
            for r in routers.values():
                r.stop()
            for s in replicas:
                s.stop()
            node.stop()
            if self.args.keep_logs:
                import shutil

                shutil.copytree(self.workdir, self.args.keep_logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("model", "memkv-data"))
        self.collect(out, t_start)
        return out

    def name(self) -> str:
        return "route_quick" if self.args.quick else "route"

    def collect(self, out: dict[str, Any], t_start: float) -> None:
        out.update(wall_s=time.perf_counter() - t_start, samples=self.samples, passes=self.passes,
                   warmup_passes=self.warmup_passes, errors=self.errors)
        out["summary"] = summarize(out)


def _by_source(metrics: dict[str, float], source: str) -> float:
    """vLLM's ``vllm:prompt_tokens_by_source_total{...,source="S"}`` (whatever its other labels)."""
    return sum(v for k, v in metrics.items()
               if k.startswith("vllm:prompt_tokens_by_source_total{") and f'source="{source}"' in k)


def _router_metrics(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {ln.rpartition(" ")[0]: float(ln.rpartition(" ")[2]) for ln in text.splitlines()
            if ln.startswith("memkv_route_") and not ln.startswith("#")}


# -- the report ------------------------------------------------------------------------------------------
def summarize(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per policy: medians over passes of each pass's TTFT p50 / p99 and prefill tokens by source."""
    samples, passes = out["samples"], out["passes"]
    ref: dict[tuple[int, int], list[int]] = {}  # (conv, turn) -> greedy tokens (first seen)
    for s in samples:
        ref.setdefault((s["conv"], s["turn"]), s["tokens"])
    summary: dict[str, dict[str, Any]] = {}
    for p in POLICIES:
        ps = [x for x in passes if x["policy"] == p]
        ss = [s for s in samples if s["policy"] == p and s["ttft_s"] is not None]
        if not ps or not ss:
            continue
        p50s, p99s = [], []
        for x in ps:
            tt = [s["ttft_s"] for s in ss if s["repeat"] == x["repeat"]]
            p50s.append(pct(tt, 50))
            p99s.append(pct(tt, 99))
        computed = [x["prompt_tokens_by_source"]["local_compute"] for x in ps]
        prompt = [sum(x["prompt_tokens_by_source"].values()) for x in ps]
        row: dict[str, Any] = {
            "passes": len(ps), "requests": len(ss),
            "ttft_p50_s": statistics.median(p50s), "ttft_p99_s": statistics.median(p99s),
            "ttft_p50_by_pass_s": p50s, "ttft_p99_by_pass_s": p99s,
            "ttft_p50_pooled_s": pct([s["ttft_s"] for s in ss], 50),
            "ttft_p99_pooled_s": pct([s["ttft_s"] for s in ss], 99),
            "prompt_tokens_per_pass": statistics.median(prompt),
            "computed_tokens_per_pass": statistics.median(computed),
            "gpu_hit_tokens_per_pass": statistics.median(x["prompt_tokens_by_source"]["local_cache_hit"] for x in ps),
            "memkv_tokens_per_pass": statistics.median(
                x["prompt_tokens_by_source"]["external_kv_transfer"] for x in ps),
            "computed_tokens_usage_per_pass": statistics.median(
                sum(s["prompt_tokens"] - s["cached_tokens"] for s in ss if s["repeat"] == x["repeat"]) for x in ps),
            "requests_per_backend": {b: sum(x["requests_per_backend"].get(b, 0) for x in ps)
                                     for b in sorted({b for x in ps for b in x["requests_per_backend"]})},
            "same_tokens": all(s["tokens"] == ref[(s["conv"], s["turn"])] for s in ss),
        }
        summary[p] = row
    return summary


def markdown(out: dict[str, Any]) -> str:
    lines = ["| policy | passes | TTFT p50 ms | TTFT p99 ms | prefill tokens computed / prompt tokens per pass |"
             " of which GPU hits / memkv loads | requests r1 / r2 | same greedy tokens |",
             "|---|--:|--:|--:|--:|--:|--:|:-:|"]
    for p, row in out["summary"].items():
        b = row["requests_per_backend"]
        lines.append(f"| {LABELS[p]} | {row['passes']} | {1e3 * row['ttft_p50_s']:.0f} | "
                     f"{1e3 * row['ttft_p99_s']:.0f} | {row['computed_tokens_per_pass']:.0f} / "
                     f"{row['prompt_tokens_per_pass']:.0f} | {row['gpu_hit_tokens_per_pass']:.0f} / "
                     f"{row['memkv_tokens_per_pass']:.0f} | {b.get('r1', 0)} / {b.get('r2', 0)} | "
                     f"{'yes' if row['same_tokens'] else '**no**'} |")
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = out["summary"]
    pols = [p for p in POLICIES if p in summary]
    if not pols:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = range(len(pols))
    p50 = [1e3 * summary[p]["ttft_p50_s"] for p in pols]
    p99 = [1e3 * summary[p]["ttft_p99_s"] for p in pols]
    ax1.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color=[COLORS[p] for p in pols])
    ax1.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color=[COLORS[p] for p in pols], alpha=0.5)
    for p in pols:  # every pass's p50, so the spread between passes shows
        k = pols.index(p)
        ax1.plot([k - 0.2] * len(summary[p]["ttft_p50_by_pass_s"]),
                 [1e3 * v for v in summary[p]["ttft_p50_by_pass_s"]], "k.", ms=4)
    ax1.set_xticks(list(xs), [SHORT[p] for p in pols])
    ax1.set_ylabel("TTFT ms (median over passes; dots: each pass's p50)")
    ax1.legend()
    bottom = [0.0] * len(pols)
    for key, label, color in (("computed_tokens_per_pass", "computed", "#d62728"),
                              ("gpu_hit_tokens_per_pass", "GPU prefix-cache hit", "#1f77b4"),
                              ("memkv_tokens_per_pass", "loaded from memkv", "#2ca02c")):
        vals = [summary[p][key] for p in pols]
        ax2.bar(list(xs), vals, 0.6, bottom=bottom, label=label, color=color)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax2.set_xticks(list(xs), [SHORT[p] for p in pols])
    ax2.set_ylim(0, max(bottom) * 1.3)
    ax2.set_ylabel("prompt tokens per pass (vLLM prompt_tokens_by_source)")
    ax2.legend(fontsize=8)
    s = out["sizes"]
    fig.suptitle(f"2 vLLM CPU replicas + memkv: {s['convs']} conversations x {s['turns']} turns on "
                 f"{s['systems']} shared {s['system_tokens']}-token system prompts, {s.get('document', 0)}-token "
                 f"first messages, {s['concurrency']} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 conversations x 2 turns each (plumbing)")
    ap.add_argument("--repeats", type=int, help="passes per policy (default 3; --quick 1)")
    for f in ("system_tokens", "document", "user", "answer", "convs", "turns", "concurrency"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, help=f"workload size (default {getattr(Sizes(), f)})")
    ap.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    ap.add_argument("--memory", default="2GiB", help="memkv node memory")
    ap.add_argument("--keep-logs", help="copy the replicas', routers' and node's logs to this folder")
    args = ap.parse_args(argv)
    given = {f: getattr(args, f) for f in ("repeats", "system_tokens", "document", "user", "answer", "convs", "turns",
                                           "concurrency") if getattr(args, f) is not None}
    sizes = replace(QUICK if args.quick else Sizes(), **given)
    # `timeout` and the like stop a run with SIGTERM: unwind, so the replicas, routers and node are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="memkv-bench-route-") as tmp:
        bench = Bench(args, sizes, Path(tmp))
        out = bench.run()
    json_path, png_path = write_results(out, Path(args.out), bench.name(), plot)
    print(markdown(out))
    for e in out["errors"]:
        print(f"error: {e}")
    print(f"done in {out['wall_s'] / 60:.1f} min; wrote {json_path} and {png_path}")
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
