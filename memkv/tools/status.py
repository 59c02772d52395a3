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

    direct = url if url.rstrip("/").endswith("/direct") else url.rstrip("/") + "/direct"
    with SyncClient.connect(direct) as client:  # this node's own figures, even if it is a worker
        st = client.stats()
    # a worker of ``memkv serve --workers N`` names all N: show them all, by host (each asked on its
    # own, so that one that is down is shown as such)
    if st.get("workers"):
        return show_workers(worker_stats(list(st["workers"])), as_json=as_json)
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    Console().print(node_table(f"memkv node {st.get('node_id', '')} at {url}", st))
    return 0


def worker_stats(addrs: list[str]) -> dict[str, dict[str, Any] | str]:
    """STATS of each worker address (an error message for one that does not answer)."""
    from memkv.client import SyncClient
    from memkv.errors import MemKVError

    out: dict[str, dict[str, Any] | str] = {}
    for addr in addrs:
        try:
            with SyncClient.connect(f"memkv://{addr}/direct") as client:
                out[addr] = client.stats()
        except (MemKVError, OSError) as exc:
            out[addr] = f"unreachable: {exc}"
    return out


def show_workers(stats: dict[str, dict[str, Any] | str], *, as_json: bool = False) -> int:
    """Workers (address -> STATS, or why it did not answer), one row each, grouped by host."""
    from rich.console import Console
    from rich.table import Table

    if as_json:
        print(json.dumps({"workers": stats}, indent=2, default=str))
        return 0
    t = Table(title=f"memkv: {len(stats)} workers")
    for col in ("host", "worker", "addr", "health", "entries", "region used / size", "ops"):
        t.add_column(col, justify="right" if col in ("entries", "ops") else "left")
    rows = sorted(stats.items(), key=lambda kv: (isinstance(kv[1], str),
                                                 kv[1].get("host", "") if isinstance(kv[1], dict) else "", kv[0]))
    last: Any = ()
    for addr, s in rows:
        host = s.get("host", "-") if isinstance(s, dict) else "?"
        if last != () and host != last:
            t.add_section()
        last = host
        if isinstance(s, str):
            t.add_row(host, "-", addr, s, "-", "-", "-")
            continue
        region = s.get("region", {})
        ops = sum(s.get("server", {}).get("ops", {}).values())
        t.add_row(host, s.get("node_id", "-"), addr, "up", f"{s.get('entries', 0):,}",
                  f"{format_size(region.get('used', 0))} / {format_size(region.get('size', 0))}", f"{ops:,}")
    Console().print(t)
    return 0
