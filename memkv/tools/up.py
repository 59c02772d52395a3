"""``memkv up``: a local cluster for development (etcd and N node processes); prints its URL."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memkv.tools.children import popen_tied
from memkv.tools.localproc import EtcdProcess, free_port


def wait_for_cluster(endpoint: str, cluster: str, nodes: int, timeout: float = 60.0) -> int:
    """Wait until ``nodes`` nodes are registered and in the slot map; returns its epoch."""
    from memkv.client.cluster_view import ClusterView
    from memkv.client.etcd import Etcd, EtcdUnavailable

    etcd = Etcd(endpoint, timeout=2.0)
    view = ClusterView(etcd, cluster)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                st = view.load()
                if len(st.nodes) >= nodes and st.slotmap is not None and set(st.nodes) <= set(st.slotmap.members):
                    return st.slotmap.epoch
            except EtcdUnavailable:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {cluster} did not form with {nodes} nodes within {timeout}s")
            time.sleep(0.2)
    finally:
        etcd.close()


def _up(args: argparse.Namespace) -> int:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="memkv-up-"))
    base.mkdir(parents=True, exist_ok=True)
    config = args.config
    if config is None:
        config = str(base / "memkv.toml")
        Path(config).write_text(f"[cluster]\nreplicas = {min(2, args.nodes)}\nlease_ttl = 5\n")
    etcd = EtcdProcess(base / "etcd", log_path=base / "etcd.log").start()
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(args.nodes):
            port = free_port()
            node_id = f"node{i + 1}"
            log = open(base / f"{node_id}.log", "ab")
            cmd = [sys.executable, "-m", "memkv.cli", "serve", "--config", config,
                   "--listen", f"127.0.0.1:{port}", "--memory", args.memory,
                   "--data-dir", str(base / node_id), "--etcd", etcd.endpoint, "--cluster", args.cluster,
                   "--node-id", node_id, "--zone", f"z{i % max(1, args.zones)}"]
            procs.append(popen_tied(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True))
            log.close()
        epoch = wait_for_cluster(etcd.endpoint, args.cluster, args.nodes)
        url = f"etcd://{etcd.endpoint}/{args.cluster}"
        print(url, flush=True)
        print(f"memkv: {args.nodes} node(s) up, slot map epoch {epoch}; logs in {base}. Ctrl-C stops everything.",
              file=sys.stderr, flush=True)
        while not stopping:
            for p in procs:
                if p.poll() is not None:
                    print(f"memkv: a node exited with {p.returncode} (see logs in {base})", file=sys.stderr)
                    procs.remove(p)
                    break
            time.sleep(0.2)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        etcd.stop()
        for s, h in old.items():
            signal.signal(s, h)


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("up", help="a local cluster for development: etcd + N nodes; prints its URL")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument("--dir", help="where etcd data, node data and logs go (default: a new temp dir)")
    u.add_argument("--config", help="TOML config for the nodes (default: [cluster] replicas = min(2, N))")
    u.add_argument("--cluster", default="local", help="cluster name (default: local)")
    u.add_argument("--memory", default="256MiB", help="region size per node")
    u.add_argument("--zones", type=int, default=1, help="spread nodes over this many zones")
    u.set_defaults(func=_up)

