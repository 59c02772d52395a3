"""Cluster throughput with 1 and 3 nodes on loopback: ``python -m bench.cluster``.

Each configuration is a local cluster started with ``memkv up`` (etcd + N nodes,
R = min(2, N)); client processes (one connection pool each, etcd:// URL, TCP
transport so every byte crosses a socket) PUT then GET 64 KiB values for a fixed
time. On a 2-core machine the nodes, etcd and the clients share two cores, so
3 nodes cannot be faster than 1 here: the point is the cost of routing and of
writing R replicas, reported as measured. Writes ``bench/results/cluster.json``
and ``bench/results/cluster.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import machine_info

READ_SET = 200  # keys per reader: 12.5 MiB of 64 KiB values


def _read_value(worker: int, size: int) -> bytes:
    # Deterministic per worker, so re-putting the read set is an idempotent re-put.
    return (f"value-of-reader-{worker}-".encode() * (size // 16 + 1))[:size]


def _client(url: str, op: str, size: int, seconds: float, worker: int, out: Any) -> None:
    from memkv.client import SyncClient

    value = os.urandom(size)
    buf = bytearray(size)
    lat: list[float] = []
    tag = os.urandom(4).hex()
    with SyncClient.connect(url, transport="tcp", timeout=10) as c:
        if op == "get":
            c.put_many([(f"r-{worker}-{j}".encode(), _read_value(worker, size)) for j in range(READ_SET)])
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if op == "put":
                c.put(f"p-{tag}-{worker}-{i}".encode(), value)
            elif c.get_into(f"r-{worker}-{i % READ_SET}".encode(), buf) is None:
                raise SystemExit("bench.cluster: a value of the read set is missing")
            lat.append(time.perf_counter() - t0)
            i += 1
    out.send(lat)


def _phase(url: str, op: str, size: int, clients: int, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for w in range(clients):
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client, args=(url, op, size, seconds, w, tx))
        p.start()
        pipes.append(rx)
        procs.append(p)
    lats = [x for rx in pipes for x in rx.recv()]
    for p in procs:
        p.join()
    lats.sort()
    ops_s = len(lats) / seconds
    return {"ops_s": ops_s, "gb_s": ops_s * size / 1e9, "p50_us": statistics.median(lats) * 1e6,
            "p99_us": lats[int(len(lats) * 0.99) - 1] * 1e6, "n": len(lats)}


def main(argv: list[str] | None = None) -> int:
    from memkv.tools.localproc import LocalCluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,3")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix="memkv-bench-cluster-") as d:
            cluster = LocalCluster.start(n, directory=d, memory="1GiB")
            try:
                time.sleep(2.0)  # let the first rebalance round settle
                for clients in (int(x) for x in args.clients.split(",")):
                    for op in ("put", "get"):
                        reps = [_phase(cluster.url, op, args.size, clients, args.seconds)
                                for _ in range(args.repeats)]
                        med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                        rows.append({"nodes": n, "replicas": min(2, n), "clients": clients, "op": op, **med})
                        print(f"nodes={n} R={min(2, n)} clients={clients} {op:4s} {med['ops_s']:8.0f} ops/s "
                              f"{med['gb_s']:.3f} GB/s p50 {med['p50_us']:.0f} us p99 {med['p99_us']:.0f} us",
                              flush=True)
            finally:
                cluster.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"bench": "cluster", "value_size": args.size, "seconds": args.seconds, "repeats": args.repeats,
           "machine": machine_info(), "rows": rows,
           "note": "nodes, etcd and clients share the machine's cores; R = min(2, nodes)"}
    (out / "cluster.json").write_text(json.dumps(doc, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted({(r["clients"], r["op"]) for r in rows})
    nodes = sorted({r["nodes"] for r in rows})
    width = 0.8 / len(nodes)
    for k, n in enumerate(nodes):
        ys = [next((r["gb_s"] for r in rows if r["nodes"] == n and (r["clients"], r["op"]) == lab), 0)
              for lab in labels]
        ax.bar([i + k * width for i in range(len(labels))], ys, width, label=f"{n} node(s), R={min(2, n)}")
    ax.set_xticks([i + width * (len(nodes) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{op}\n{c} client(s)" for c, op in labels])
    ax.set_ylabel("GB/s")
    ax.set_title(f"memkv cluster, {args.size // 1024} KiB values, loopback ({os.cpu_count()} cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cluster.png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
