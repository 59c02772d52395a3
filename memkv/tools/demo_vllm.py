"""``memkv demo --engine vllm``: stateless serving with two vLLM engine processes sharing memkv.

A storage node starts, then vLLM engine A (a fresh process, configured with
the memkv connector through ``--kv-transfer-config`` exactly as in the README)
answers turn 1 of a conversation and exits: its KV blocks are now in memkv.
Engine B, another fresh process with nothing cached, answers turn 2 (turn 1,
A's answer and a new question): vLLM reports how many prompt tokens it found
cached — loaded from memkv — and the time to first token. B then answers the
same prompt under another ``cache_salt`` (no block is shared across salts, so
this is a full recompute in the same warm process) to show the TTFT without
memkv and that the generated tokens are identical.

The model is a small Llama-architecture network with seeded random weights
written on first use (no downloads); prompts are byte tokens of English text.
It needs vLLM (``pip install memkv[vllm]``, or ``make install-vllm`` in a
checkout, whose ``.venv-vllm`` is found automatically).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memkv.tools.demo_shared import finish, show_stats, start_store, tokenize

MODEL = {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2, "intermediate": 1536, "vocab": 4096,
         "max_positions": 8192, "seed": 7, "init_std": 0.05}
N_NEW = 24
SYSTEM = ("You are the operations assistant of a regional airline. Answer from the manual below, cite the "
          "section and keep it short.\n")
MANUAL = ("Section {i}: crew duty limits, rest periods, minimum turnaround, de-icing holdover times, fuel "
          "policy, diversion criteria and passenger rebooking rules apply as written in appendix {i}.\n")
QUESTIONS = ("User: A flight is delayed three hours by de-icing. Does the crew exceed its duty limit?\n",
             "User: And if it diverts to the alternate, who rebooks the connecting passengers?\n")


def run_demo_vllm(json_path: str | None = None, nodes: int = 1) -> int:
    from rich.console import Console
    from rich.table import Table

    from memkv.vllm_engine import EngineError, EngineProcess, run_make_model, vllm_python

    console = Console(width=None if sys.stdout.isatty() else 140)
    python = vllm_python()
    if os.system(f"'{python}' -c 'import vllm' >/dev/null 2>&1") != 0:
        console.print(f"[red]memkv demo --engine vllm needs vLLM[/red]: {python} cannot import it. Install the "
                      "extra (pip install 'memkv\\[vllm]') or, in a checkout, run make install-vllm.")
        return 2
    t_start = time.perf_counter()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memkv" / "demo-vllm-model"
    console.print(f"[bold]memkv demo --engine vllm[/bold]: two fresh vLLM processes ({python}) share a "
                  f"conversation through memkv ({os.cpu_count()} CPUs here)")
    model = run_make_model(python, cache, **MODEL)
    workdir = tempfile.mkdtemp(prefix="memkv-demo-vllm-")
    store = start_store(nodes, workdir)
    results: dict[str, Any] = {"url": store.url, "model": MODEL, "turns": []}
    engines: list[EngineProcess] = []

    def fresh_engine(name: str) -> EngineProcess:
        """A new vLLM process with the memkv connector, past its first forward pass."""
        eng = EngineProcess(model, python=python, kv_url=store.url, log_path=Path(workdir) / f"engine-{name}.log",
                            max_model_len=8192)
        engines.append(eng)
        eng.start()
        eng.generate(tokenize("warm-up"), max_tokens=2)
        return eng

    try:
        prompt1 = tokenize(SYSTEM + "".join(MANUAL.format(i=i) for i in range(1, 26)) + QUESTIONS[0])
        console.print(f"store at {store.url}; engine A starts (vLLM start-up takes 20-40 s here)...")
        a = fresh_engine("A")
        r1 = a.generate(prompt1, max_tokens=N_NEW)
        a.close()  # A's process ends: what B gets, it gets from memkv
        prompt2 = prompt1 + r1["tokens"] + tokenize(QUESTIONS[1])
        console.print(f"engine A answered turn 1 ({len(prompt1)} prompt tokens) and exited; engine B starts...")
        b = fresh_engine("B")
        r2 = b.generate(prompt2, max_tokens=N_NEW)
        b.request({"op": "reset_prefix_cache"})
        r2_cold = b.generate(prompt2, max_tokens=N_NEW, cache_salt="demo-recompute")
        m = b.metrics()
        b.close()
        if r2["tokens"] != r2_cold["tokens"]:
            raise SystemExit("demo: the tokens generated from memkv's KV differ from the recomputed ones")
        table = Table(title="vLLM time to first token, resuming a conversation in a fresh engine")
        for col in ("turn", "engine", "prompt tok", "cached tok (vLLM)", "TTFT ms", "same tokens"):
            table.add_column(col, justify="right")
        rows = [("1", "A (fresh, saves)", r1, ""), ("2", "B (fresh) from memkv", r2, "yes"),
                ("2", "B recompute", r2_cold, "yes")]
        for turn, who, r, same in rows:
            table.add_row(turn, who, str(r["n_prompt"]), str(r["num_cached_tokens"]), f"{1e3 * r['ttft_s']:.0f}",
                          same)
            results["turns"].append({"turn": int(turn), "engine": who, **{k: v for k, v in r.items()
                                                                             if k not in ("tokens", "logprobs")}})
        console.print(table)
        loaded = m.get("vllm:memkv_loaded_blocks", 0)
        load_ms = 1e3 * m.get("vllm:memkv_load_seconds_sum", 0.0)
        console.print(f"engine B loaded {loaded:.0f} blocks ({m.get('vllm:memkv_loaded_bytes', 0) / 2**20:.1f} MiB) "
                      f"in {load_ms:.1f} ms; TTFT {1e3 * r2['ttft_s']:.0f} ms vs {1e3 * r2_cold['ttft_s']:.0f} ms "
                      f"recomputing ({r2_cold['ttft_s'] / r2['ttft_s']:.1f}x)")
        results["engine_b_metrics"] = {k: v for k, v in m.items() if "memkv" in k or "prefix_cache" in k}
        show_stats(console, store.url)
    except EngineError as exc:
        console.print(f"[red]demo failed[/red]: {exc}")
        return 1
    finally:
        for eng in engines:
            eng.close()
        store.stop()
    return finish(console, results, json_path, t_start, f" (engine logs in {workdir})")
