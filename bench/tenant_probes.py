"""Can a tenant tell whether another tenant holds a key? GET latency of the two cases.

Alice writes ``keys`` values into the tenant-scoped ``session`` namespace; Carol then GETs, in a
random interleaving, Alice's keys (which exist, under Alice's scope) and keys nobody wrote. Both
are misses for Carol: her lookup is under her own scope, so the node never reaches Alice's entry.
The distributions of the two should be the same; the figures show how close they are.

Run: ``python -m bench.tenant_probes [--probes 10000]`` (JSON + PNG in bench/results/).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.memkv_peer import MemkvNode

CONFIG = """
[tenants.alice]
token = "alice-secret"
grants = { session = "rw" }
[tenants.carol]
token = "carol-secret"
grants = { session = "rw" }
"""


class TenantNode(MemkvNode):
    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.workdir / "memkv.toml")]

    def start(self, timeout: float = 30.0) -> TenantNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "memkv.toml").write_text(CONFIG)
        super().start(timeout)
        return self


def summary(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    q = statistics.quantiles(s, n=100)
    return {"n": len(s), "median_us": statistics.median(s) / 1e3, "p10_us": q[9] / 1e3, "p90_us": q[89] / 1e3,
            "p99_us": q[98] / 1e3, "mean_us": statistics.fmean(s) / 1e3}


def ks_statistic(a: list[int], b: list[int]) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    d = 0.0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            i += 1
        else:
            j += 1
        d = max(d, abs(i / len(a) - j / len(b)))
    return d


def run(probes: int, keys: int, seed: int) -> dict[str, Any]:
    from memkv.client import SyncClient

    with tempfile.TemporaryDirectory() as tmp, TenantNode(Path(tmp), memory="256MiB") as node:
        with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a:
            a.put_many({f"k{i}".encode(): b"v" * 1024 for i in range(keys)}, namespace="session")
        rng = random.Random(seed)
        plan = [True] * probes + [False] * probes
        rng.shuffle(plan)
        theirs: list[int] = []
        absent: list[int] = []
        with SyncClient.connect(node.url, tenant="carol", token="carol-secret") as c:
            for _ in range(1000):  # warm up the connection and the node
                c.get(b"warm", namespace="session")
            for n, other in enumerate(plan):
                key = (f"k{rng.randrange(keys)}" if other else f"x{n}").encode()
                t0 = time.perf_counter_ns()
                r = c.get(key, namespace="session")
                dt = time.perf_counter_ns() - t0
                assert r is None
                (theirs if other else absent).append(dt)
    return {"probes_each": probes, "keys": keys, "seed": seed,
            "another_tenants_key": summary(theirs), "absent_key": summary(absent),
            "ks_d": ks_statistic(theirs, absent), "samples": {"theirs": theirs, "absent": absent}}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("theirs", "another tenant's key"), ("absent", "absent key")):
        us = [x / 1e3 for x in doc["samples"][name]]
        cut = sorted(us)[int(len(us) * 0.99)]
        ax.hist([u for u in us if u <= cut], bins=80, alpha=0.5, label=label)
    ax.set_xlabel("GET latency as tenant carol (µs, up to p99)")
    ax.set_ylabel("probes")
    ax.set_title(f"{doc['probes_each']} probes each; KS D = {doc['ks_d']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/tenant_probes")
    args = ap.parse_args()
    doc = run(args.probes, args.keys, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(doc, out.with_suffix(".png"))
    small = {k: v for k, v in doc.items() if k != "samples"}
    out.with_suffix(".json").write_text(json.dumps(small, indent=2) + "\n")
    print(json.dumps(small, indent=2))


if __name__ == "__main__":
    main()
