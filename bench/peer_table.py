"""The peer comparison of a ``bench.run`` result as a Markdown table (one column per peer).

    python -m bench.peer_table bench/results/issue18/single_node.json

Rows: GET 1 MiB and 4 MiB (GB/s, one client), GET 1 MiB with 8 clients, a batched GET of
16 x 64 KiB, and the p50 of a 4 KiB GET (µs). Each cell is the peer's best way to do it
(``get`` or ``get_into``; ``get_many`` or ``get_many_into``), its median over the repeats; the
machine's limits measured in the same run follow the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import KiB, MiB, best_of

ORDER = ("memkv-auto", "memkv", "mooncake", "lmcache_server", "memcached", "redis")
LABEL = {"memkv-auto": "memkv shm (auto)", "memkv": "memkv TCP", "mooncake": "Mooncake Store (TCP)",
         "lmcache_server": "lmcache_server (TCP)", "memcached": "memcached", "redis": "Redis"}
ROWS = (  # label, ops, size, clients, key
    ("GET 1 MiB, GB/s", ("get", "get_into"), 1 * MiB, 1, "gbps"),
    ("GET 4 MiB, GB/s", ("get", "get_into"), 4 * MiB, 1, "gbps"),
    ("GET 1 MiB, 8 clients, GB/s", ("get", "get_into"), 1 * MiB, 8, "gbps"),
    ("GET 16 × 64 KiB batch, GB/s", ("get_many", "get_many_into"), 64 * KiB, 1, "gbps"),
    ("GET 4 KiB p50, µs", ("get", "get_into"), 4 * KiB, 1, "p50_us"),
)


def table(doc: dict[str, Any]) -> str:
    results = doc["results"]
    peers = [p for p in ORDER if any(r["peer"] == p for r in results)]
    lines = ["| GET | " + " | ".join(LABEL[p] for p in peers) + " |", "|---|" + "---:|" * len(peers)]
    for label, ops, size, clients, key in ROWS:
        cells = []
        for p in peers:
            r = best_of(results, p, ops, size, clients, key)
            fmt = ".0f" if key == "p50_us" else ".2f"
            cells.append("" if r is None else format(r["median"][key], fmt))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lim = doc.get("limits") or {}
    if lim:
        lines.append("")
        lines.append("Limits in the same run: " + ", ".join(
            f"{name} {v['gbps']:.2f} GB/s" for name, v in lim.items() if isinstance(v, dict) and "gbps" in v) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a bench.run JSON (single_node.json)")
    print(table(json.loads(ap.parse_args().result.read_text())))


if __name__ == "__main__":
    main()
