"""``memkv status URL``: a readable view of a node's or cluster's state."""

from __future__ import annotations

import json
from typing import Any

from memkv.sizes import format_size


def node_table(title: str, st: dict[str, Any]) -> Any:
    from rich.table import Table

    region = st.get("region", {})
    t = Table(title=title, show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("entries", f"{st.get('entries', 0):,}")
    t.add_row("region", f"{format_size(region.get('used', 0))} / {format_size(region.get('size', 0))}")
    t.add_row("quarantined", format_size(region.get("quarantined", 0)))
    t.add_row("fragmentation", f"{region.get('fragmentation', 0.0):.1%}")
    t.add_row("corrupt values dropped", str(st.get("corrupt", 0)))
    for name, pool in st.get("pools", {}).items():
        t.add_row(f"pool {name} ({pool.get('policy')})",
                  f"{format_size(pool.get('used', 0))} / {format_size(pool.get('capacity', 0))}, "
                  f"{pool.get('entries', 0):,} entries, {pool.get('evictions', 0):,} evicted")
    for name, ns in st.get("namespaces", {}).items():
        hits, misses = ns.get("hits", 0), ns.get("misses", 0)
        rate = hits / (hits + misses) if hits + misses else 0.0
        t.add_row(f"namespace {name}", f"{hits:,} hits, {misses:,} misses ({rate:.0%} hit rate)")
    server = st.get("server", {})
    if server:
        t.add_row("ops", ", ".join(f"{k}={v:,}" for k, v in sorted(server.get("ops", {}).items())))
        t.add_row("connections", str(server.get("connections", 0)))
    return t


def show_status(url: str, *, as_json: bool = False) -> int:
    from rich.console import Console

    if url.startswith("etcd://"):
        from memkv.cluster.status import show_cluster_status

        return show_cluster_status(url, as_json=as_json)
    from memkv.client import SyncClient

    with SyncClient.connect(url) as client:
        st = client.stats()
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    Console().print(node_table(f"memkv node {st.get('node_id', '')} at {url}", st))
    return 0
