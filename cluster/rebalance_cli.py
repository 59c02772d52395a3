"""Rebalancer subcommands of ``memkv``: ``rebalancer``, ``drain``, ``throttle`` (``add_parsers``, called by
memkv/tools/cli.py)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Collection
from typing import Any

from memkv.errors import InvalidArgument


def _etcd_for(url: str) -> tuple[Any, str]:
    from memkv.client.etcd import Etcd
    from memkv.client.url import parse_url

    parsed = parse_url(url)
    if parsed.scheme == "memkv":
        raise SystemExit("memkv: give the cluster URL etcd://HOST:PORT/CLUSTER")
    return Etcd([(n.host, n.port) for n in parsed.nodes], timeout=3.0), parsed.cluster


def _rebalancer(args: argparse.Namespace) -> int:
    import logging

    from memkv.cluster.rebalancer_run import run_standalone

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key} if args.tls_ca else None
    run_standalone(args.url, identity=args.id, mbps=args.mbps, lease_ttl=args.lease_ttl, slots=args.slots,
                   replicas=args.replicas, stop=stop, secret_file=args.secret_file, tls=tls)
    return 0


def _slots_on(st: Any, nodes: Collection[str]) -> int:
    """Ownerships of ``nodes`` in the map (a slot counts once per drained node in its row)."""
    sm = st.slotmap
    return 0 if sm is None else sum(1 for row in sm.table for n in row if n in nodes)


def _freed(etcd: Any, key: str) -> bool:
    """The rebalancer has had the drained node hand its values over and free them (its record says so)."""
    kv, _ = etcd.get(key)
    try:
        return kv is not None and bool(json.loads(kv.value).get("freed"))
    except (ValueError, AttributeError):
        return False


def _drained_nodes(args: argparse.Namespace, st: Any) -> list[str]:
    """The node named, or with ``--host H`` every node registered on host H (all its workers)."""
    if args.host:
        return sorted(n for n, info in st.nodes.items() if info.host == args.host)
    if args.node_id in st.nodes or _slots_on(st, [args.node_id]):
        return [args.node_id]
    return []


def _drain(args: argparse.Namespace) -> int:
    """Mark the node (or every node of a host: one drain mark each, the rebalancer drains them together)
    and follow until the rebalancer has moved all their slots and had them hand their values over."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from memkv.client.cluster_view import ClusterView
    from memkv.client.etcd import EtcdUnavailable
    from memkv.cluster.rebalancer import drain_prefix

    if bool(args.node_id) == bool(args.host):
        raise InvalidArgument("memkv drain: name a node, or a host with --host (not both)")
    etcd, cluster = _etcd_for(args.url)
    console = Console(stderr=True)
    what = f"host {args.host}" if args.host else f"node {args.node_id}"
    try:
        view = ClusterView(etcd, cluster)
        st = view.load()
        if args.undo:
            # a host's nodes that left meanwhile keep no mark: only the registered ones are looked up
            for n in _drained_nodes(args, st) or ([args.node_id] if args.node_id else []):
                etcd.delete(drain_prefix(cluster) + n)
            console.print(f"{what}: drain cancelled; the rebalancer gives it slots again")
            return 0
        nodes = _drained_nodes(args, st)
        if not nodes:
            console.print(f"{what} is not in cluster {cluster}")
            return 1
        for n in nodes:
            etcd.put(drain_prefix(cluster) + n, json.dumps({"since": time.time()}))
        total = max(1, _slots_on(st, nodes))
        deadline = time.monotonic() + args.timeout
        with Progress(TextColumn("[bold]drain {task.fields[node]}"), BarColumn(),
                      TextColumn("{task.completed:.0f}/{task.total:.0f} slots moved"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                      disable=args.quiet) as progress:
            task = progress.add_task("drain", total=total, node=what, info="")
            while True:
                try:
                    st = view.load()
                    left = _slots_on(st, nodes)
                    progress.update(task, completed=total - left, info=f"epoch {st.epoch}")
                    if left == 0 and st.slotmap is not None and not any(
                            n in p for p in st.slotmap.pending.values() for n in nodes) and all(
                            _freed(etcd, drain_prefix(cluster) + n) for n in nodes):
                        break
                except EtcdUnavailable:
                    pass
                if time.monotonic() > deadline:
                    console.print(f"{what} still holds slots after {args.timeout:.0f}s "
                                  "(is a rebalancer running? is there another node to take them?)")
                    return 1
                time.sleep(0.3)
        console.print(f"{what} holds no slots and has handed its values over: it can be stopped now "
                      "(drain marks are removed once the nodes have left)")
        for n in nodes:
            print(n, "drained", flush=True)
        return 0
    finally:
        etcd.close()


def _throttle(args: argparse.Namespace) -> int:
    from memkv.cluster.rebalancer import throttle_key

    etcd, cluster = _etcd_for(args.url)
    try:
        if args.mbps is None:
            etcd.delete(throttle_key(cluster))
        else:
            etcd.put(throttle_key(cluster), str(args.mbps))
    finally:
        etcd.close()
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("rebalancer", help="run a rebalancer candidate for a cluster (leader-elected through etcd)")
    r.add_argument("url", help="etcd://HOST:PORT[,HOST:PORT]/CLUSTER")
    r.add_argument("--mbps", type=float, default=200.0, help="copy throttle in MB/s (0: unthrottled)")
    r.add_argument("--id", help="candidate id (default rebalancer-HOST-PID)")
    r.add_argument("--lease-ttl", type=int, default=5, help="leadership lease TTL in seconds")
    r.add_argument("--replicas", type=int, default=2, help="R, only used if this creates the first slot map")
    r.add_argument("--slots", type=int, default=4096, help="slots, only used if this creates the first slot map")
    r.add_argument("--secret-file", help="the cluster secret (default: MEMKV_CLUSTER_SECRET, else etcd's "
                   "/memkv/CLUSTER/secret); must match the nodes' [cluster] secret")
    r.add_argument("--tls-ca", help="the nodes serve TLS: verify them with this CA bundle")
    r.add_argument("--tls-cert", help="client certificate, for nodes that require one (mutual TLS)")
    r.add_argument("--tls-key", help="key of --tls-cert")
    r.set_defaults(func=_rebalancer)
    d = sub.add_parser("drain", help="move every slot off a node (or a host's nodes); exits 0 when it can be stopped")
    d.add_argument("url", help="etcd://HOST:PORT[,HOST:PORT]/CLUSTER")
    d.add_argument("node_id", nargs="?", help="the node (or --host)")
    d.add_argument("--host", help="drain every node registered on this host (all workers of a machine)")
    d.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (exit 1)")
    d.add_argument("--undo", action="store_true", help="cancel a drain: the node takes slots again")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_drain)
    t = sub.add_parser("throttle", help="set the rebalancer copy throttle of a running cluster (MB/s)")
    t.add_argument("url", help="etcd://HOST:PORT[,HOST:PORT]/CLUSTER")
    t.add_argument("mbps", type=float, nargs="?", help="MB/s (0: unthrottled); omit to go back to the config")
    t.set_defaults(func=_throttle)
