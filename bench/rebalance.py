"""Rebalancing benchmark: migration throughput and a concurrent reader's GET p99 before/during/after a join.

    python -m bench.rebalance [--data-mb 512] [--value-kb 256] [--nodes 3] [--mbps 0]

Starts a local etcd and ``--nodes`` nodes (R=2, in-node rebalancer, copy
throttle ``--mbps``, 0 = unthrottled), loads ``--data-mb`` of values, starts
a reader (random 4 KiB GETs through the cluster client, back to back), waits,
joins one more node and waits until the rebalancer has converged, then reads
on. Migration throughput = bytes the new node received by migration / time
from its join to the converged map (includes etcd flips and the settle delay).
Writes bench/results/rebalance.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-mb", type=int, default=512)
    ap.add_argument("--value-kb", type=int, default=256)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--mbps", type=float, default=0.0, help="rebalancer copy throttle, MB/s (0: unthrottled)")
    ap.add_argument("--memory", default="2GiB", help="region per node")
    ap.add_argument("--phase-s", type=float, default=5.0, help="reader time before and after the join")
    ap.add_argument("--out", default="bench/results/rebalance.json")
    args = ap.parse_args(argv)

    from memkv.client import SyncClient
    from memkv.client.cluster_view import ClusterView
    from memkv.client.etcd import Etcd
    from memkv.tools.localproc import EtcdProcess
    from memkv.tools.up import wait_for_cluster

    base = Path(tempfile.mkdtemp(prefix="memkv-rebalance-"))
    etcd = EtcdProcess(base / "etcd", log_path=base / "etcd.log").start()
    cfg = base / "memkv.toml"
    cfg.write_text(f"[cluster]\nreplicas = 2\nlease_ttl = 5\nrebalance_mbps = {args.mbps}\n")
    procs: list[subprocess.Popen[bytes]] = []
    addrs: dict[str, str] = {}

    def start(i: int) -> None:
        port = free_port()
        log = base / f"n{i}.log"
        with open(log, "ab") as fh:
            p = popen_tied([sys.executable, "-m", "memkv.cli", "serve", "--config", str(cfg), "--listen",
                            f"127.0.0.1:{port}", "--memory", args.memory, "--data-dir", str(base / f"n{i}"),
                            "--etcd", etcd.endpoint, "--cluster", "bench", "--node-id", f"n{i}"],
                           stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                           start_new_session=True)
        procs.append(p)
        addrs[f"n{i}"] = f"127.0.0.1:{port}"
        wait_for_tcp("127.0.0.1", port, p, 30, log)

    url = f"etcd://{etcd.endpoint}/bench"
    ec = Etcd(etcd.endpoint, timeout=3.0)
    view = ClusterView(ec, "bench")

    def converged(ids: set[str]) -> bool:
        st = view.load()
        sm = st.slotmap
        return (sm is not None and set(st.nodes) == ids and set(sm.members) == ids and not sm.pending
                and not ec.get_prefix("/memkv/bench/migrations/")[0])

    try:
        for i in range(1, args.nodes + 1):
            start(i)
        wait_for_cluster(etcd.endpoint, "bench", args.nodes)
        ids = {f"n{i}" for i in range(1, args.nodes + 1)}
        while not converged(ids):
            time.sleep(0.1)
        vsize = args.value_kb * 1024
        n_big = max(1, args.data_mb * 1024 * 1024 // vsize)
        blob = os.urandom(vsize)
        print(f"loading {n_big} x {args.value_kb} KiB ({args.data_mb} MB, R=2) ...", file=sys.stderr)
        with SyncClient.connect(url, transport="tcp", timeout=30.0) as c:
            for i in range(0, n_big, 16):
                c.put_many({f"big-{j}".encode(): blob for j in range(i, min(n_big, i + 16))})
            small = [f"small-{j}".encode() for j in range(2000)]
            c.put_many({k: k * (4096 // len(k) + 1) for k in small})
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        failures = [0]

        def reader() -> None:
            rng = random.Random(1)
            with SyncClient.connect(url, transport="tcp", timeout=5.0) as rc:
                while not stop.is_set():
                    k = small[rng.randrange(len(small))]
                    t0 = time.perf_counter()
                    try:
                        v = rc.get(k)
                    except Exception:  # noqa: BLE001
                        failures[0] += 1
                        continue
                    samples.append((time.monotonic(), time.perf_counter() - t0))
                    if v is None:
                        failures[0] += 1

        th = threading.Thread(target=reader, daemon=True)
        t_start = time.monotonic()
        th.start()
        time.sleep(args.phase_s)
        new_id = f"n{args.nodes + 1}"
        t_join = time.monotonic()
        print(f"joining {new_id} ...", file=sys.stderr)
        start(args.nodes + 1)
        t_copy = None
        while not converged(ids | {new_id}):
            if t_copy is None and view.state.slotmap is not None and view.state.slotmap.pending:
                t_copy = time.monotonic()  # first migration round published (destination pending)
            time.sleep(0.02)
        t_done = time.monotonic()
        t_copy = t_copy or t_join
        time.sleep(args.phase_s)
        stop.set()
        th.join(10)
        with SyncClient.connect(f"memkv://{addrs[new_id]}", transport="tcp", timeout=10.0) as d:
            st = d.stats()
        received = int(st.get("region", {}).get("used", 0))
        entries = int(st.get("entries", 0))
        dur = t_done - t_join
        # "during": from the join (node start) to the converged map
        phases = {"before": [lat for t, lat in samples if t < t_join],
                  "during": [lat for t, lat in samples if t_join <= t < t_done],
                  "after": [lat for t, lat in samples if t >= t_done]}
        doc: dict[str, Any] = {
            "bench": "rebalance", "nodes_before": args.nodes, "replicas": 2, "data_mb": args.data_mb,
            "value_kb": args.value_kb, "throttle_mbps": args.mbps, "cpus": os.cpu_count(),
            "migrated_bytes": received, "migrated_values": entries, "join_to_converged_s": dur,
            "copy_s": t_done - t_copy,
            "migration_gbps": received / (t_done - t_copy) / 1e9 if t_done > t_copy else None,
            "join_to_converged_gbps": received / dur / 1e9 if dur > 0 else None,
            "reader_failures": failures[0],
            "get_latency_ms": {ph: {"n": len(xs), "p50": (_pct(xs, 0.5) or 0) * 1e3,
                                    "p99": (_pct(xs, 0.99) or 0) * 1e3} for ph, xs in phases.items()},
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        _plot(samples, t_start, t_join, t_done, doc, out.with_suffix(".png"))
        print(json.dumps(doc, indent=1))
        return 0
    finally:
        ec.close()
        for p in procs:
            stop_process(p)
        etcd.stop()


def _plot(samples: list[tuple[float, float]], t0: float, t_join: float, t_done: float, doc: dict[str, Any],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    # p99 per 250 ms window
    buckets: dict[int, list[float]] = {}
    for t, lat in samples:
        buckets.setdefault(int((t - t0) / 0.25), []).append(lat)
    xs = sorted(buckets)
    ax.plot([x * 0.25 for x in xs], [(_pct(buckets[x], 0.99) or 0) * 1e3 for x in xs], label="GET p99 (250 ms windows)")
    ax.plot([x * 0.25 for x in xs], [(_pct(buckets[x], 0.5) or 0) * 1e3 for x in xs], label="GET p50", alpha=0.7)
    ax.axvspan(t_join - t0, t_done - t0, color="orange", alpha=0.2, label="join -> converged (migration)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    lat = doc["get_latency_ms"]
    ax.set_title(f"memkv rebalance: {doc['migrated_bytes'] / 1e6:.0f} MB to the new node at "
                 f"{(doc['migration_gbps'] or 0):.2f} GB/s; GET p99 before/during/after "
                 f"{lat['before']['p99']:.2f}/{lat['during']['p99']:.2f}/{lat['after']['p99']:.2f} ms")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
