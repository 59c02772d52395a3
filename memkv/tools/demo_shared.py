"""What the two demos (``memkv demo``: memkv/tools/demo.py; ``memkv demo --engine vllm``:
memkv/tools/demo_vllm.py) share: the store they run against, the byte "tokenizer", the node
tables they end with, and their results file."""

from __future__ import annotations

import json
import time
from typing import Any

from memkv.tools.localproc import LocalCluster, NodeProcess, start_node


def tokenize(text: str) -> list[int]:
    """A byte-level stand-in for a tokenizer (no downloads): one token per UTF-8 byte."""
    return list(text.encode())


def start_store(nodes: int, workdir: str) -> LocalCluster | NodeProcess:
    """One standalone ``memkv serve`` (``nodes`` = 1), or ``memkv up``'s local cluster of ``nodes``
    (etcd and the nodes, logs in ``workdir``); either has ``url`` and ``stop()``."""
    if nodes > 1:
        return LocalCluster.start(nodes, directory=workdir, memory="512MiB")
    return start_node(memory="1GiB")


def show_stats(console: Any, url: str) -> dict[str, Any]:
    """Print each node's table (``memkv status``'s) and return the store's STATS."""
    from memkv.client import SyncClient
    from memkv.tools.status import node_table

    with SyncClient.connect(url) as client:
        st = client.stats()
    for addr, node_stats in (st.get("nodes") or {url: st}).items():
        console.print(node_table(f"node {node_stats.get('node_id', '')} at {addr}", node_stats))
    return st


def finish(console: Any, results: dict[str, Any], json_path: str | None, t_start: float, note: str = "") -> int:
    """The run's wall time into ``results``, ``results`` into ``json_path`` (when given); the last line."""
    results["wall_s"] = time.perf_counter() - t_start
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    console.print(f"[green]demo finished[/green] in {results['wall_s']:.0f} s{note}")
    return 0
