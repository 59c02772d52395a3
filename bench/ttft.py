"""TTFT benchmark: recompute vs memkv (TCP, shared memory) vs Redis, through the same transformers integration.

    python -m bench.ttft [--quick] [--out bench/results] [--stores recompute,memkv-tcp,memkv-shm,redis]

A Llama-architecture model (seeded random weights, no downloads) sized so that
CPU prefill of an 8k-token prompt takes several seconds. The benchmark starts
its own memkv node and redis-server on free loopback ports, then measures the
time to first token (load of the cached prefix + prefill of the rest; saving
happens after the first token and is not counted) for three workloads:

  (a) resume: multi-turn conversations whose turn 1 (an 8k-token context) was
      answered by replica A; replica B (its own long-lived client, no local
      KV state) answers turn 2 by loading it,
  (b) system prompt: many requests sharing one long system prompt,
  (c) concurrent: 8 sessions resumed at the same time (8 threads).

Stores: ``recompute`` (no cache: full prefill), ``memkv-tcp``, ``memkv-shm``
(shared-memory transport, when this build has it; else reported as pending)
and ``redis`` (bench/redis_kv.py behind the same KVCacheConnector). Each store
gets its own keys (a per-store salt). Writes ``ttft.json`` and ``ttft.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STORES = ("recompute", "memkv-tcp", "memkv-shm", "redis")
MODEL_ID = "bench/llama-6L-384d"
BLOCK_TOKENS = 256


@dataclass
class Sizes:
    resume_ctx: int = 8192  # turn-1 context of (a)
    resume_convs: int = 3
    turn2_new: int = 128  # answer + next user message
    sys_prompt: int = 6144  # (b)
    sys_requests: int = 8
    sys_recompute: int = 3  # recompute samples in (b) (each costs seconds)
    user_tokens: int = 64
    conc_sessions: int = 8  # (c)
    conc_ctx: int = 2048


QUICK = Sizes(
    resume_ctx=2048, resume_convs=2, sys_prompt=1536, sys_requests=4, sys_recompute=2, conc_sessions=4, conc_ctx=1024
)


def bench_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=16384,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (n,), generator=g).tolist()


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Stores:
    """Opens a store client (one per thread that asks) for each store name."""

    def __init__(self, memkv_url: str | None, redis_addr: tuple[str, int] | None) -> None:
        self.memkv_url = memkv_url
        self.redis_addr = redis_addr
        self._opened: list[Any] = []
        self._lock = threading.Lock()

    def client(self, store: str) -> Any:
        if store.startswith("memkv-"):
            from memkv.client import SyncClient

            c: Any = SyncClient.connect(self.memkv_url, transport=store.removeprefix("memkv-"))
        elif store == "redis":
            from bench.redis_kv import RedisKVStore

            c = RedisKVStore(*self.redis_addr)
        else:
            raise ValueError(store)
        with self._lock:
            self._opened.append(c)
        return c

    def connector(self, store: str, client: Any = None) -> Any:
        """A connector for ``store``: on ``client`` (a replica's long-lived client) or on a new one."""
        if store == "recompute":
            return None
        from memkv.client.kvcache import KVCacheConnector

        return KVCacheConnector(client if client is not None else self.client(store), MODEL_ID,
                                block_tokens=BLOCK_TOKENS, salt=store)

    def replica(self, store: str) -> Any:
        """A replica's client: opened once and kept, as a serving process keeps its connections."""
        return None if store == "recompute" else self.client(store)

    def close(self) -> None:
        for c in self._opened:
            with contextlib.suppress(Exception):
                c.close()


def shm_works(url: str) -> str | None:
    """None when transport="shm" connects and reads a value through the mapping; else why not."""
    try:
        from memkv.client import SyncClient

        with SyncClient.connect(url, transport="shm") as c:
            c.put(b"ttft-shm-probe", b"x" * 4096)
            buf = bytearray(4096)
            if c.get_into(b"ttft-shm-probe", buf) != 4096 or bytes(buf) != b"x" * 4096:
                return "probe read returned wrong bytes"
            st = c.stats()
            ops = st.get("ops", {}) if isinstance(st, dict) else {}
            if ops and not any("LOCATE" in str(k) for k in ops):
                return "node does not serve one-sided (LOCATE) reads"
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available in this build"
        return f"{type(exc).__name__}: {exc}"


def measure(model: Any, prompt: list[int], conn: Any) -> dict[str, Any]:
    from memkv.client.kvcache import prefill

    c0 = time.process_time()
    r = prefill(model, prompt, conn, save=False)
    cpu = time.process_time() - c0
    out = {
        "ttft_s": r.ttft_s,
        "load_s": r.load_s,
        "prefill_s": r.prefill_s,
        "cached": r.cached_tokens,
        "computed": r.computed_tokens,
        "cpu_s": cpu,
        "first_token": int(r.logits.argmax()),
    }
    if conn is not None:
        out["fetch_s"] = conn.last_load.fetch_seconds
        out["loaded_bytes"] = conn.last_load.bytes
    return out


def kv_of(model: Any, prompt: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1).cache


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from bench.machine import machine_info

    console = Console(width=None if sys.stdout.isatty() else 160)
    # One intra-op thread per replica: on a small shared machine, 2 OpenMP threads that lose a core to
    # a neighbour stall at every barrier (measured: 5.8 s vs 2.5 s for a 2k prefill, 0.8 s vs 0.2 s for
    # a 128-token suffix). 1 thread makes recompute and cached runs comparable and repeatable.
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    stores = [s for s in args.stores.split(",") if s]
    out: dict[str, Any] = {
        "model": MODEL_ID,
        "block_tokens": BLOCK_TOKENS,
        "sizes": sizes.__dict__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stores": stores,
        "pending": {},
        "workloads": {},
    }
    with contextlib.suppress(Exception):
        out["machine"] = machine_info()
    out["loadavg_start"] = os.getloadavg()
    t_start = time.perf_counter()
    model = bench_model()
    from memkv.client.kvcache import KVLayout

    lay = KVLayout.from_config(model.config, block_tokens=BLOCK_TOKENS)
    out["layout"] = {**lay.__dict__, "block_bytes": lay.block_bytes, "kv_bytes_per_token": lay.bytes_per_token}
    console.print(
        f"[bold]TTFT benchmark[/bold]: {MODEL_ID}, KV {lay.bytes_per_token / 1024:.0f} KiB/token, "
        f"blocks of {BLOCK_TOKENS} tokens ({lay.block_bytes / 2**20:.2f} MiB), "
        f"torch {torch.__version__} on {os.cpu_count()} CPUs ({torch.get_num_threads()} threads)"
    )

    with tempfile.TemporaryDirectory(prefix="memkv-ttft-") as tmp, contextlib.ExitStack() as stack:
        memkv_url, redis_addr = None, None
        if any(s.startswith("memkv-") for s in stores):
            from bench.memkv_peer import MemkvNode

            node = stack.enter_context(MemkvNode(Path(tmp) / "memkv", memory=args.memory))
            memkv_url = node.url
        if "redis" in stores:
            from bench.redis_peer import RedisServer

            rs = stack.enter_context(RedisServer(Path(tmp) / "redis"))
            redis_addr = (rs.host, rs.port)
            out["redis_version"] = rs.version()
        if "memkv-shm" in stores:
            why = shm_works(memkv_url)
            if why is not None:
                console.print(f"[yellow]memkv-shm: pending ({why})[/yellow]")
                out["pending"]["memkv-shm"] = why
                stores.remove("memkv-shm")
        S = Stores(memkv_url, redis_addr)
        stack.callback(S.close)
        store_conns = [s for s in stores if s != "recompute"]

        # Replica A saves, replica B loads: each with its own long-lived client per store (a serving
        # process keeps its connections and, for shm, its mapping of the node's region).
        rep_a = {s: S.replica(s) for s in stores}
        rep_b = {s: S.replica(s) for s in stores}
        # warm-up: first-call overheads of the model and of each store path
        warm = tokens(2 * BLOCK_TOKENS + 5, 999)
        measure(model, warm, None)
        for s in store_conns:
            S.connector(s, rep_a[s]).save(warm, kv_of(model, warm))
            measure(model, warm, S.connector(s, rep_b[s]))

        # (a) resume a conversation on another replica -----------------------------------------
        console.print(f"(a) resume: {sizes.resume_convs} conversations, {sizes.resume_ctx}-token turn 1")
        res: dict[str, list[dict[str, Any]]] = {s: [] for s in stores}
        for i in range(sizes.resume_convs):
            turn1 = tokens(sizes.resume_ctx, 100 + i)
            turn2 = turn1 + tokens(sizes.turn2_new, 200 + i)
            kv = kv_of(model, turn1)  # replica A answered turn 1 ...
            for s in store_conns:
                S.connector(s, rep_a[s]).save(turn1, kv)  # ... and saved it (to each store)
            del kv
            for s in stores:  # replica B answers turn 2
                res[s].append(measure(model, turn2, S.connector(s, rep_b[s])))
        out["workloads"]["a_resume"] = res

        # (b) many requests sharing a long system prompt ----------------------------------------
        console.print(f"(b) system prompt: {sizes.sys_requests} requests sharing {sizes.sys_prompt} tokens")
        system = tokens(sizes.sys_prompt, 300)
        kv = kv_of(model, system)
        for s in store_conns:
            S.connector(s, rep_a[s]).save(system, kv)
        del kv
        res = {s: [] for s in stores}
        for j in range(sizes.sys_requests):
            req = system + tokens(sizes.user_tokens, 400 + j)
            for s in stores:
                if s == "recompute" and j >= sizes.sys_recompute:
                    continue
                res[s].append(measure(model, req, S.connector(s, rep_b[s])))
        out["workloads"]["b_system_prompt"] = res

        # (c) 8 concurrent sessions --------------------------------------------------------------
        console.print(f"(c) concurrent: {sizes.conc_sessions} sessions of {sizes.conc_ctx} tokens at once")
        ctxs = [tokens(sizes.conc_ctx, 500 + k) for k in range(sizes.conc_sessions)]
        for k, ctx in enumerate(ctxs):
            kv = kv_of(model, ctx)
            for s in store_conns:
                S.connector(s, rep_a[s]).save(ctx, kv)
            del kv
            console.print(f"    session {k} saved", end="\r")
        res = {s: [] for s in stores}
        walls: dict[str, float] = {}
        for s in stores:
            conns = [S.connector(s, S.replica(s)) for _ in ctxs]  # 8 replicas (threads), a client each
            for c in conns:  # warm each replica's client (connections, shm mapping)
                if c is not None:
                    c.load(warm, model.config)
            prompts = [ctx + tokens(sizes.user_tokens, 600 + k) for k, ctx in enumerate(ctxs)]
            results: list[Any] = [None] * len(ctxs)
            barrier = threading.Barrier(len(ctxs))

            def one(
                k: int,
                conns: list[Any] = conns,
                prompts: list[list[int]] = prompts,
                results: list[Any] = results,
                barrier: threading.Barrier = barrier,
            ) -> None:
                barrier.wait()
                try:
                    results[k] = measure(model, prompts[k], conns[k])
                except BaseException as exc:  # noqa: BLE001
                    results[k] = exc

            c0, w0 = time.process_time(), time.perf_counter()
            threads = [threading.Thread(target=one, args=(k,)) for k in range(len(ctxs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls[s] = time.perf_counter() - w0
            cpu_total = time.process_time() - c0
            for r in results:
                if isinstance(r, BaseException):
                    raise r
                r["cpu_s"] = cpu_total / len(ctxs)  # process CPU of the batch, shared out
            res[s] = results
        out["workloads"]["c_concurrent"] = res
        out["c_wall_s"] = walls
        out["node_stats"] = None
        if memkv_url:
            from memkv.client import SyncClient

            with SyncClient.connect(memkv_url, transport="tcp") as c:
                out["node_stats"] = c.stats()
    out["wall_s"] = time.perf_counter() - t_start
    out["loadavg_end"] = os.getloadavg()
    summarize(out, console)
    return out


def summarize(out: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    summary: dict[str, Any] = {}
    table = Table(title="TTFT (ms): p50 / p99, speed-up vs recompute (p50), load ms p50, CPU-s per request")
    for col in ("workload", "store", "n", "TTFT p50", "TTFT p99", "speed-up", "load p50", "cached tok", "CPU-s/req"):
        table.add_column(col, justify="right")
    for wl, res in out["workloads"].items():
        base = [r["ttft_s"] for r in res.get("recompute", [])]
        base_cpu = statistics.mean(r["cpu_s"] for r in res["recompute"]) if res.get("recompute") else None
        summary[wl] = {}
        for s, rs in res.items():
            if not rs:
                continue
            tt = [r["ttft_s"] for r in rs]
            loads = [r["load_s"] for r in rs]
            cpu = statistics.mean(r["cpu_s"] for r in rs)
            row = {
                "n": len(rs),
                "ttft_p50_s": pct(tt, 50),
                "ttft_p99_s": pct(tt, 99),
                "ttft_mean_s": statistics.mean(tt),
                "load_p50_s": pct(loads, 50),
                "cpu_s_per_request": cpu,
                "cached_tokens": statistics.mean(r["cached"] for r in rs),
                "computed_tokens": statistics.mean(r["computed"] for r in rs),
            }
            if rs and "fetch_s" in rs[0]:
                row["fetch_p50_s"] = pct([r["fetch_s"] for r in rs], 50)
                row["loaded_bytes"] = rs[0].get("loaded_bytes", 0)
            if base and s != "recompute":
                row["speedup_p50"] = pct(base, 50) / row["ttft_p50_s"]
                row["prefill_cpu_s_avoided_per_request"] = base_cpu - cpu
                row["prefill_cpu_s_avoided_total"] = (base_cpu - cpu) * len(rs)
            summary[wl][s] = row
            table.add_row(
                wl,
                s,
                str(len(rs)),
                f"{row['ttft_p50_s'] * 1e3:.0f}",
                f"{row['ttft_p99_s'] * 1e3:.0f}",
                f"{row['speedup_p50']:.1f}x" if "speedup_p50" in row else "",
                f"{row['load_p50_s'] * 1e3:.1f}" if s != "recompute" else "",
                f"{row['cached_tokens']:.0f}",
                f"{cpu:.2f}",
            )
        # first tokens must agree across stores (the cache changes nothing)
        firsts = {s: [r["first_token"] for r in rs] for s, rs in res.items()}
        ref = firsts.get("recompute")
        summary[wl]["same_first_tokens"] = all(v[: len(ref)] == ref for v in firsts.values()) if ref else None
    out["summary"] = summary
    a = summary.get("a_resume", {})
    targets: dict[str, Any] = {}
    for s in ("memkv-tcp", "memkv-shm"):
        if s in a and "speedup_p50" in a[s]:
            targets[f"{s} TTFT speed-up vs recompute, cached {out['sizes']['resume_ctx']}-token prefix (>= 10x)"] = {
                "value": round(a[s]["speedup_p50"], 2),
                "met": a[s]["speedup_p50"] >= 10,
            }
        for wl, per in summary.items():
            if s in per and "redis" in per:
                ratio = per["redis"]["load_p50_s"] / per[s]["load_p50_s"]
                targets[f"{s} prefix load vs redis ({wl}): redis time / memkv time >= 1.5"] = {
                    "value": round(ratio, 2),
                    "met": ratio >= 1.5,
                }
    out["targets"] = targets
    console.print(table)
    for name, t in targets.items():
        console.print(f"  {'[green]met[/green]' if t['met'] else '[red]NOT met[/red]'}  {name}: {t['value']}x")
    for s, why in out["pending"].items():
        console.print(f"  [yellow]pending[/yellow]  {s}: {why}")
    console.print(f"done in {out['wall_s']:.0f} s (load average {out.get('loadavg_start')} -> "
                  f"{out.get('loadavg_end')})")


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = out["summary"]
    wls = list(summary)
    stores = [s for s in STORES if any(s in summary[w] for w in wls)]
    colors = {"recompute": "#999999", "memkv-tcp": "#1f77b4", "memkv-shm": "#2ca02c", "redis": "#d62728"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(stores))
    for i, s in enumerate(stores):
        xs = [k + i * width for k, w in enumerate(wls) if s in summary[w]]
        p50 = [summary[w][s]["ttft_p50_s"] * 1e3 for w in wls if s in summary[w]]
        p99 = [summary[w][s]["ttft_p99_s"] * 1e3 for w in wls if s in summary[w]]
        ax1.bar(xs, p50, width, label=s, color=colors.get(s))
        ax1.errorbar(
            xs,
            p50,
            yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=3,
            lw=1,
        )
        if s != "recompute":
            lx = [k + i * width for k, w in enumerate(wls) if s in summary[w]]
            ax2.bar(
                lx,
                [summary[w][s]["load_p50_s"] * 1e3 for w in wls if s in summary[w]],
                width,
                label=s,
                color=colors.get(s),
            )
    for ax in (ax1, ax2):
        ax.set_xticks([k + width * (len(stores) - 1) / 2 for k in range(len(wls))], wls)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT ms (bar p50, whisker p99), log scale")
    ax1.set_title(f"TTFT, {out['model']}, {out['sizes']['resume_ctx']}-token context (a)")
    ax2.set_ylabel("load of the cached prefix, ms (p50)")
    ax2.set_title("KV load time: memkv vs Redis (same connector)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ttft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small contexts (a smoke run of ~1 minute)")
    ap.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    ap.add_argument("--stores", default=",".join(STORES), help=f"comma-separated subset of {','.join(STORES)}")
    ap.add_argument("--memory", default="2GiB", help="memkv node region size")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one core/replica)")
    args = ap.parse_args(argv)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        out = run(args)
    except Exception:
        traceback.print_exc()
        return 1
    name = "ttft_quick" if args.quick else "ttft"
    json_path, png_path = write_results(out, outdir, name, plot)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
