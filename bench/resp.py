"""RESP front end benchmark: redis-benchmark against memkv's RESP port and a real Redis, same run.

    python -m bench.resp [--quick] [--out bench/results] [--sizes 4KiB,64KiB] [--repeats 3]

Starts a private redis-server and a memkv node (``--resp-port``) on free loopback
ports, preloads the MGET keys, then runs ``redis-benchmark`` (SET, GET, and MGET of
10 keys as a custom command — redis-benchmark has no built-in MGET test) for each
value size against both servers. Repeats are interleaved across the two servers so
that a noisy neighbour hurts both alike; the median repeat (by ops/s) is kept.
memkv is driven on db 0 (namespace ``shared``): redis-benchmark writes the same
bytes to its keys, which ``shared`` accepts as idempotent re-puts.

Writes ``resp.json`` (machine, settings, every repeat, medians, memkv/redis ratios)
and ``resp.png`` into ``--out``; prints a table. Exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.memkv_peer import MemkvNode
from bench.procs import free_port, wait_for_tcp
from bench.redis_peer import RedisServer

KiB = 1 << 10
MGET_KEYS = 10


class MemkvRespNode(MemkvNode):
    def __init__(self, workdir: Path, memory: str = "1GiB") -> None:
        super().__init__(workdir, memory)
        self.resp_port = free_port(self.host)

    def command(self) -> list[str]:
        return [*super().command(), "--resp-port", str(self.resp_port)]

    def start(self, timeout: float = 30.0) -> MemkvRespNode:
        super().start(timeout)
        assert self.proc is not None
        wait_for_tcp(self.host, self.resp_port, self.proc, timeout, self.log)
        return self


def parse_size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in (("kib", KiB), ("mib", KiB * KiB), ("k", KiB), ("m", KiB * KiB)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def redis_benchmark(port: int, args: list[str], timeout: float) -> dict[str, dict[str, float]]:
    """Run redis-benchmark --csv; {test name: {rps, avg_ms, p50_ms, p99_ms}}. Raises on errors."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--csv", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    if out.returncode != 0 or "error" in text.lower():
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{text[-2000:]}")
    results: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO(out.stdout)):
        name = row["test"].split(" ")[0].upper()
        results[name] = {
            "rps": float(row["rps"]),
            "avg_ms": float(row["avg_latency_ms"]),
            "p50_ms": float(row["p50_latency_ms"]),
            "p99_ms": float(row["p99_latency_ms"]),
        }
    return results


def preload(port: int, size: int) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.flushdb()
    r.mset({f"mget:{i}": b"m" * size for i in range(MGET_KEYS)})
    r.close()


def run_one(port: int, size: int, requests: int, clients: int, keyspace: int) -> dict[str, dict[str, float]]:
    common = ["-d", str(size), "-c", str(clients), "-r", str(keyspace)]
    res = redis_benchmark(port, ["-t", "set,get", "-n", str(requests), *common], timeout=600)
    mget = redis_benchmark(
        port,
        ["-n", str(max(requests // 4, 100)), "-c", str(clients), "MGET", *[f"mget:{i}" for i in range(MGET_KEYS)]],
        timeout=600,
    )
    res["MGET"] = next(iter(mget.values()))
    return res


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = doc["median"]
    tests = ["SET", "GET", "MGET"]
    sizes = [str(s) for s in doc["settings"]["sizes"]]
    labels = [f"{t}\n{int(s) // KiB} KiB" for s in sizes for t in tests]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for j, (metric, title) in enumerate((("rps", "ops/s (higher is better)"), ("p99_ms", "p99 latency ms (lower)"))):
        ax = axes[j]
        for k, peer in enumerate(("redis", "memkv")):
            vals = [med[peer][s][t][metric] for s in sizes for t in tests]
            xs = [i + (k - 0.5) * width for i in range(len(vals))]
            ax.bar(xs, vals, width, label=peer)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    s = doc["settings"]
    fig.suptitle(
        f"redis-benchmark -c {s['clients']} against Redis and memkv's RESP port "
        f"({doc['machine']['cpus_usable']} CPUs, MGET = {MGET_KEYS} keys)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--sizes", default="4KiB,64KiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=50, help="redis-benchmark -c (its default: 50)")
    p.add_argument("--requests", type=int, default=0, help="requests per SET/GET run (default: by size)")
    p.add_argument("--keyspace", type=int, default=1000, help="redis-benchmark -r")
    p.add_argument("--quick", action="store_true", help="1 repeat, fewer requests")
    args = p.parse_args(argv)
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark not found (make install installs redis-tools)", file=sys.stderr)
        return 1
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {
        peer: {str(s): [] for s in sizes} for peer in ("redis", "memkv")
    }
    with tempfile.TemporaryDirectory(prefix="memkv-bench-resp-") as tmp:
        redis_srv = RedisServer(Path(tmp) / "redis").start()
        node = MemkvRespNode(Path(tmp) / "memkv").start()
        ports = {"redis": redis_srv.port, "memkv": node.resp_port}
        try:
            for rep in range(repeats):
                for size in sizes:
                    n = args.requests or (20000 if size <= 4 * KiB else 5000)
                    if args.quick:
                        n //= 4
                    for peer in ("redis", "memkv") if rep % 2 == 0 else ("memkv", "redis"):
                        preload(ports[peer], size)
                        r = run_one(ports[peer], size, n, args.clients, args.keyspace)
                        raw[peer][str(size)].append(r)
                        print(
                            f"[{rep + 1}/{repeats}] {peer:5s} {size // KiB:3d} KiB  "
                            + "  ".join(
                                f"{t} {v['rps']:9.0f}/s p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f}"
                                for t, v in r.items()
                            ),
                            flush=True,
                        )
        finally:
            node.stop()
            redis_srv.stop()
    median: dict[str, Any] = {}
    for peer, by_size in raw.items():
        median[peer] = {}
        for size, runs in by_size.items():
            median[peer][size] = {}
            for test in runs[0]:
                ordered = sorted(runs, key=lambda r: r[test]["rps"])
                median[peer][size][test] = ordered[len(ordered) // 2][test]
    ratios = {
        size: {
            t: round(median["memkv"][size][t]["rps"] / median["redis"][size][t]["rps"], 3)
            for t in median["memkv"][size]
        }
        for size in median["memkv"]
    }
    doc = {
        "benchmark": "resp",
        "machine": machine_info(),
        "settings": {
            "sizes": sizes,
            "repeats": repeats,
            "clients": args.clients,
            "keyspace": args.keyspace,
            "mget_keys": MGET_KEYS,
            "memkv_db": 0,
            "tool": "redis-benchmark --csv",
            "redis_benchmark": subprocess.run(
                ["redis-benchmark", "--version"], capture_output=True, text=True
            ).stdout.strip(),
        },
        "median": median,
        "memkv_over_redis_ops": ratios,
        "raw": raw,
    }
    (out / "resp.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out / "resp.png")
    print(
        f"\n{'size':>7} {'test':5} {'redis ops/s':>12} {'memkv ops/s':>12} {'ratio':>6} "
        f"{'redis p50/p99 ms':>17} {'memkv p50/p99 ms':>17}"
    )
    for size in median["memkv"]:
        for t in median["memkv"][size]:
            a, b = median["redis"][size][t], median["memkv"][size][t]
            print(
                f"{int(size) // KiB:5d}Ki {t:5} {a['rps']:12.0f} {b['rps']:12.0f} {ratios[size][t]:6.2f} "
                f"{a['p50_ms']:8.2f}/{a['p99_ms']:<8.2f} {b['p50_ms']:8.2f}/{b['p99_ms']:<8.2f}"
            )
    print(f"wrote {out / 'resp.json'} and {out / 'resp.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
