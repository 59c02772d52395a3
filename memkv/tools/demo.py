"""``memkv demo``: stateless serving of a conversation by two model replicas sharing memkv.

It starts a storage node and two replica processes of the same model (a small
Llama-architecture transformer with seeded random weights: no downloads).
Replica A answers turn 1 of a conversation and saves its KV cache to memkv.
Replica B answers turn 2 — with no local state — first by recomputing the
whole context (what a replica without memkv does), then by loading A's
context from memkv and prefilling only the new message. Replica A then answers
turn 3 by loading B's context. The table shows time-to-first-token (TTFT) with
and without memkv, and that the generated tokens are identical.

Each replica is ``python -m memkv.tools.demo replica URL`` reading one JSON request
per line on stdin and answering one JSON line on stdout.

With ``--nodes N`` (default 2) the store is a local cluster started with
``memkv up`` (etcd and N nodes, two replicas per slot); the replicas connect
with its etcd:// URL. ``--nodes 1`` uses one standalone ``memkv serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from memkv.tools.demo_shared import finish, show_stats, start_store, tokenize

MODEL_ID = "memkv-demo/llama-4L-256d"
BLOCK_TOKENS = 64
N_NEW = 16

SYSTEM = ("You are a careful assistant for an airline's operations team. Answer with the relevant rule, "
          "cite the section of the manual and keep the answer short. ")
MANUAL = ("Section {i}: crew duty limits, rest periods, minimum turnaround, de-icing holdover times, "
          "fuel policy, diversion criteria and passenger rebooking rules apply as written in appendix {i}. ")


def demo_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval()


# -- replica process ------------------------------------------------------------------------------
def replica_main(url: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from memkv.client import SyncClient
    from memkv.client.kvcache import KVCacheConnector, greedy_generate

    # One intra-op thread per replica (each replica is one core's worth of "GPU"): on a small shared
    # machine two OpenMP threads that lose a core to a neighbour stall at every barrier.
    torch.set_num_threads(int(os.environ.get("MEMKV_DEMO_THREADS", "1")))
    model = demo_model()
    with SyncClient.connect(url) as client:
        conn = KVCacheConnector(client, MODEL_ID, block_tokens=BLOCK_TOKENS)
        # warm-up: first-call overheads of the model and of the store path (connections, shm mapping)
        warm = list(range(1, 200))
        greedy_generate(model, warm, 2)
        greedy_generate(model, warm, 2, conn)
        greedy_generate(model, warm, 2, conn)
        print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            c0 = time.process_time()
            tokens, _, pre = greedy_generate(model, req["tokens"], req.get("n_new", N_NEW),
                                             conn if req["memkv"] else None)
            print(json.dumps({
                "tokens": tokens, "ttft_ms": pre.ttft_s * 1e3, "load_ms": pre.load_s * 1e3,
                "prefill_ms": pre.prefill_s * 1e3, "save_ms": pre.save_s * 1e3, "cached": pre.cached_tokens,
                "computed": pre.computed_tokens, "saved_blocks": pre.saved_blocks,
                "cpu_s": time.process_time() - c0,
            }), flush=True)
    return 0


class Replica:
    def __init__(self, name: str, url: str) -> None:
        self.name = name
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "memkv.tools.demo", "replica", url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"demo: replica {self.name} exited with {self.proc.wait()}")
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        return self._read()

    def ask(self, tokens: list[int], memkv: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"tokens": tokens, "memkv": memkv}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _conversation() -> list[str]:
    context = SYSTEM + "".join(MANUAL.format(i=i) for i in range(1, 28))
    return [
        context + "\nUser: A flight is delayed 3 hours by de-icing. Does the crew exceed its duty limit?\n",
        "\nUser: And if the flight diverts to the alternate, who rebooks the connecting passengers?\n",
        "\nUser: Summarize both answers in one sentence for the duty manager.\n",
    ]


def run_demo(json_path: str | None = None, nodes: int = 2) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    t_start = time.perf_counter()
    store_kind = f"a local cluster of {nodes} nodes" if nodes > 1 else "a storage node"
    console.print(f"[bold]memkv demo[/bold]: {store_kind} and two replicas of {MODEL_ID} "
                  f"({os.cpu_count()} CPUs here)")
    workdir = tempfile.mkdtemp(prefix="memkv-demo-")
    node = start_store(nodes, workdir)
    results: dict[str, Any] = {"url": node.url, "nodes": nodes, "model": MODEL_ID, "block_tokens": BLOCK_TOKENS,
                               "turns": []}
    replicas: list[Replica] = []
    try:
        console.print(f"store is up at {node.url}; starting replicas A and B (model init)...")
        a, b = Replica("A", node.url), Replica("B", node.url)
        replicas += [a, b]
        a.ready(), b.ready()
        turns = _conversation()
        table = Table(title="TTFT of each turn, with and without memkv")
        for col in ("turn", "replica", "memkv", "prompt tok", "loaded tok", "computed tok", "TTFT ms",
                    "load ms", "prefill ms", "speed-up", "same tokens"):
            table.add_column(col, justify="right")

        history: list[int] = []
        serving = [a, b, a]
        for t, text in enumerate(turns, start=1):
            prompt = history + tokenize(text)
            rep = serving[t - 1]
            if t == 1:
                r = rep.ask(prompt, memkv=True)  # cold: computes everything, saves its blocks
                rows = [("on", r, None)]
            else:
                base = rep.ask(prompt, memkv=False)  # a replica without memkv recomputes everything
                r = rep.ask(prompt, memkv=True)  # loads the other replica's context
                if r["tokens"] != base["tokens"]:
                    raise SystemExit("demo: tokens generated with memkv differ from the recomputed ones")
                rows = [("off", base, None), ("on", r, base["ttft_ms"] / r["ttft_ms"])]
            for mode, res, speed in rows:
                table.add_row(str(t), rep.name, mode, str(len(prompt)), str(res["cached"]), str(res["computed"]),
                              f"{res['ttft_ms']:.0f}", f"{res['load_ms']:.1f}", f"{res['prefill_ms']:.0f}",
                              f"{speed:.1f}x" if speed else "", "yes" if t > 1 else "")
                results["turns"].append({"turn": t, "replica": rep.name, "memkv": mode == "on",
                                         "prompt_tokens": len(prompt), **{k: v for k, v in res.items()
                                                                          if k != "tokens"}})
            history = prompt + r["tokens"]
        console.print(table)
        on = [x for x in results["turns"] if x["memkv"] and x["turn"] > 1]
        off = [x for x in results["turns"] if not x["memkv"]]
        saved_cpu = sum(x["cpu_s"] for x in off) - sum(x["cpu_s"] for x in on)
        console.print(f"turns 2-3: TTFT {sum(x['ttft_ms'] for x in off):.0f} ms recomputing vs "
                      f"{sum(x['ttft_ms'] for x in on):.0f} ms with memkv; "
                      f"{sum(x['cached'] for x in on)} tokens of prefill avoided (~{saved_cpu:.1f} CPU-s)")
        results["stats"] = show_stats(console, node.url)
    finally:
        for rep in replicas:
            rep.stop()
        node.stop()
    return finish(console, results, json_path, t_start)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "replica":
        sys.exit(replica_main(sys.argv[2]))
    sys.exit(run_demo())
