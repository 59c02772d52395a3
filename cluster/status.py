"""``memkv status etcd://HOST:PORT/CLUSTER``: nodes, zones, health, slots, bytes, hit rates, epoch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memkv.sizes import format_size


def _node_stats(addr: str, timeout: float) -> dict[str, Any] | str:
    from memkv.client import SyncClient
    from memkv.errors import MemKVError

    try:
        with SyncClient.connect(f"memkv://{addr}", timeout=timeout, transport="tcp") as c:
            return c.stats()
    except MemKVError as exc:
        return exc.message


def cluster_status(url: str, *, timeout: float = 3.0) -> dict[str, Any]:
    from memkv.client.cluster_view import ClusterView
    from memkv.client.etcd import Etcd
    from memkv.client.url import parse_url

    parsed = parse_url(url)
    etcd = Etcd([(n.host, n.port) for n in parsed.nodes], timeout=timeout)
    try:
        st = ClusterView(etcd, parsed.cluster).load()
        from memkv.cluster.rebalance_status import migration_status  # migrations, under-replicated slots

        moving = migration_status(etcd, parsed.cluster, st)
    finally:
        etcd.close()
    sm = st.slotmap
    ids = sorted(set(st.nodes) | (set(sm.members) if sm else set()))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
        futures = {n: pool.submit(_node_stats, st.nodes[n].addr, timeout) for n in ids if n in st.nodes}
        stats = {n: f.result() for n, f in futures.items()}
    nodes = []
    for n in ids:
        info = st.nodes.get(n)
        s = stats.get(n)
        primary, other = sm.slots_of(n) if sm else (0, 0)
        row: dict[str, Any] = {"node_id": n, "addr": info.addr if info else None,
                               "zone": info.zone if info else (sm.members.get(n) if sm else None),
                               "host": (info.host or None) if info else None,
                               "slots_primary": primary, "slots_replica": other}
        if info is None:
            row["health"] = "gone (lease expired)"
        elif isinstance(s, str):
            row["health"] = f"unreachable: {s}"
        else:
            cl = s.get("cluster", {})
            row["health"] = "fenced" if cl.get("fenced") else "up"
            region = s.get("region", {})
            row["bytes_used"] = region.get("used", 0)
            row["capacity"] = region.get("size", info.capacity)
            row["entries"] = s.get("entries", 0)
            hits = sum(ns.get("hits", 0) for ns in s.get("namespaces", {}).values())
            misses = sum(ns.get("misses", 0) for ns in s.get("namespaces", {}).values())
            row["hits"], row["misses"] = hits, misses
            row["hit_rate"] = hits / (hits + misses) if hits + misses else None
            row["node_epoch"] = cl.get("epoch")
        nodes.append(row)
    # grouped by host: the workers of one machine together (they fail together)
    nodes.sort(key=lambda r: (r["host"] is None, r["host"] or "", r["node_id"]))
    return {"cluster": parsed.cluster, "url": url, "epoch": sm.epoch if sm else 0,
            "slots": sm.slots if sm else 0, "replicas": sm.replicas if sm else 0,
            "leader": st.leader, "nodes": nodes, **moving}


def show_cluster_status(url: str, *, as_json: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    data = cluster_status(url)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    t = Table(title=f"memkv cluster {data['cluster']}: epoch {data['epoch']}, {data['slots']} slots, "
                    f"R={data['replicas']}, leader {data['leader'] or '-'}")
    for col in ("host", "node", "addr", "zone", "health", "slots P/R", "bytes used / capacity", "entries", "hit rate"):
        t.add_column(col, justify="right" if col in ("entries", "hit rate", "slots P/R") else "left")
    last_host: Any = ()
    for r in data["nodes"]:
        rate = r.get("hit_rate")
        if r.get("host") != last_host and last_host != ():
            t.add_section()  # one block of rows per host
        last_host = r.get("host")
        t.add_row(r.get("host") or "-", r["node_id"], r.get("addr") or "-", r.get("zone") or "-", r["health"],
                  f"{r['slots_primary']}/{r['slots_replica']}",
                  f"{format_size(r['bytes_used'])} / {format_size(r['capacity'])}" if "bytes_used" in r else "-",
                  f"{r['entries']:,}" if "entries" in r else "-",
                  f"{rate:.0%}" if rate is not None else "-")
    Console().print(t)
    from memkv.cluster.rebalance_status import print_migrations

    print_migrations(data)
    return 0
