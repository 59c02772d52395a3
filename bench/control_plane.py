"""The control plane at internet scale, on paper but computed: 1 000 nodes x 65 536 slots.

    python -m bench.control_plane [--nodes 1000] [--slots 65536] [--replicas 2] [--zones 3]
                                  [--changes 20] [--slot-mib 512] [--mbps 200] [--clients 10000]

Two parts, both running the real code (``memkv.cluster.slotmap``, ``memkv.cluster.rebalancer``,
``memkv.cluster.migration_job``):

1. **Movement per change** (``--changes`` joins and as many leaves, each from the same converged
   map of ``--nodes`` nodes): the ownerships the rebalancer's target computation moves, mean and
   max, against the consistent-hashing ideal S x R / N; and the time each computation took.
2. **One change of each kind through the simulator** (``memkv.cluster.sim``: in-memory etcd and
   nodes, simulated time): a join, a drain (a node leaving cleanly) and a crash (kill -9: the
   lease expires, survivors re-replicate), each from a preformed converged cluster whose every
   owner holds ``--slot-mib`` of each of its slots, with one standalone rebalancer throttled to
   ``--mbps`` MB/s: ownerships moved, rounds, etcd writes and bytes, bytes each watcher of the
   cluster's prefix received (every node and every client watches it), simulated time to converge.

Also the slot map's size: as stored in etcd today (JSON), and in the encodings worth using
instead (node indexes as 16-bit integers, zlib-compressed; and a delta: only the rows a change
touched). Writes bench/results/control_plane.json and .png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from memkv.client.cluster_map import SlotMap
from memkv.cluster.rebalancer import ROUND_S
from memkv.cluster.sim.scenario import Fault, NodeSpec, Scenario
from memkv.cluster.sim.world import World
from memkv.cluster.slotmap import compute_table, moved_ownerships


def members(n: int, zones: int, prefix: str = "node") -> dict[str, str]:
    return {f"{prefix}-{i:04d}": f"z{i % zones}" for i in range(n)}


def compact(sm: SlotMap) -> bytes:
    """The encoding worth using at scale: the node list, then per slot R 16-bit node indexes
    (0xFFFF: none), zlib-compressed."""
    ids = sorted({n for r in sm.table for n in r} | set(sm.members))
    index = {n: i for i, n in enumerate(ids)}
    head = json.dumps({"epoch": sm.epoch, "slots": sm.slots, "replicas": sm.replicas, "nodes": ids,
                       "zones": [sm.members.get(n, "") for n in ids]}, separators=(",", ":")).encode()
    rows = bytearray()
    for r in sm.table:
        cells = [index[n] for n in r][:sm.replicas]
        cells += [0xFFFF] * (sm.replicas - len(cells))
        rows += struct.pack(f"<{sm.replicas}H", *cells)
    return zlib.compress(struct.pack("<I", len(head)) + head + bytes(rows), 6)


def delta(old: SlotMap, new: SlotMap) -> bytes:
    """What a change would write if maps were published as deltas: the rows that changed."""
    rows = {s: list(b) for s, (a, b) in enumerate(zip(old.table, new.table, strict=True)) if a != b}
    return json.dumps({"epoch": new.epoch, "base": old.epoch, "rows": rows}, separators=(",", ":")).encode()


def movement(n: int, slots: int, replicas: int, zones: int, changes: int, seed: int) -> dict[str, Any]:
    m = members(n, zones)
    t0 = time.perf_counter()
    base = compute_table(m, slots=slots, replicas=replicas)
    first_s = time.perf_counter() - t0
    sm = SlotMap(1, slots, replicas, tuple(base), m)
    rng = random.Random(seed)
    loads = Counter(x for row in base for x in row)
    prim = Counter(row[0] for row in base)
    out: dict[str, Any] = {"ideal_per_change": slots * replicas / n, "first_map_s": round(first_s, 2),
                           "load_min": min(loads.values()), "load_max": max(loads.values()),
                           "load_mean": statistics.mean(loads.values()),
                           "primaries_min": min(prim.values()), "primaries_max": max(prim.values())}
    for kind in ("join", "leave"):
        moves, secs, deltas = [], [], []
        for i in range(changes):
            if kind == "join":
                m2 = dict(m, **{f"new-{i:03d}": f"z{rng.randrange(zones)}"})
            else:
                gone = sorted(m)[rng.randrange(n)]
                m2 = {k: v for k, v in m.items() if k != gone}
            t0 = time.perf_counter()
            new = compute_table(m2, slots=slots, replicas=replicas, prev=base)
            secs.append(time.perf_counter() - t0)
            moves.append(moved_ownerships(base, new))
            deltas.append(len(delta(sm, SlotMap(2, slots, replicas, tuple(new), m2))))
        out[kind] = {"moves_mean": statistics.mean(moves), "moves_max": max(moves), "moves_min": min(moves),
                     "compute_s_median": round(statistics.median(secs), 3), "delta_bytes_mean": statistics.mean(deltas)}
    out["map_bytes_json"] = len(sm.encode())
    out["map_bytes_compact"] = len(compact(sm))
    out["map_bytes_json_zlib"] = len(zlib.compress(sm.encode(), 6))
    t0 = time.perf_counter()
    raw = sm.encode()
    out["encode_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    SlotMap.decode(raw)
    out["decode_s"] = round(time.perf_counter() - t0, 3)
    return out


def simulated(kind: str, n: int, slots: int, replicas: int, zones: int, slot_mib: int, mbps: float,
              seed: int, round_s: float = ROUND_S) -> dict[str, Any]:
    nodes = [NodeSpec(f"node-{i:04d}", f"z{i % zones}", f"h{i:04d}") for i in range(n)]
    fault = {"join": Fault(1.0, "join"), "drain": Fault(1.0, "drain"), "crash": Fault(1.0, "crash")}[kind]
    sc = Scenario(seed, slots=slots, replicas=replicas, lease_ttl=10, nodes=nodes,
                  spares=[NodeSpec("node-new", "z0", "h-new")], standalone=1, keys=0, write_rate=0.0,
                  mbps=mbps, round_s=round_s, faults=[fault], preformed=True, slot_bytes=slot_mib << 20,
                  values_per_slot=4)
    t0 = time.perf_counter()
    res = World(sc).run()
    wall = time.perf_counter() - t0
    st = res.stats
    rounds = sum(1 for _, who, what in res.trace if who == "log" and "flipped at epoch" in what)
    maps = sum(1 for _, who, what in res.trace if who == "etcd" and what.startswith("map epoch"))
    return {"kind": kind, "round_s": round_s, "ok": res.ok, "violations": [str(v) for v in res.violations[:5]],
            "moves": st.get("moves"), "allowance": st.get("allowance"), "rounds": rounds, "maps_published": maps,
            "converge_sim_s": st.get("converge_s"), "etcd_writes": st.get("etcd_writes"),
            "etcd_bytes": st.get("etcd_bytes"), "watch_bytes_per_watcher": st.get("watch_bytes_per_watcher"),
            "events": st.get("events"), "wall_s": round(wall, 1)}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = report["simulated"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    kinds = [s["kind"] for s in sims]
    axes[0].bar(kinds, [s["moves"] or 0 for s in sims], color="#4a7")
    axes[0].axhline(report["movement"]["ideal_per_change"], color="k", ls="--", label="S x R / N")
    axes[0].set_title("ownerships moved per change")
    axes[0].legend()
    watchers = report["params"]["nodes"] + report["params"]["clients"]
    axes[1].bar(kinds, [(s["watch_bytes_per_watcher"] or 0) * watchers / 1e9 for s in sims], color="#47a")
    axes[1].set_title(f"watch fan-out per change, GB ({watchers} watchers)")
    axes[2].bar(kinds, [s["converge_sim_s"] or 0 for s in sims], color="#a74")
    axes[2].set_title(f"time to converge, s (copy throttle {report['params']['mbps']:.0f} MB/s)")
    fig.suptitle(f"memkv control plane: {report['params']['nodes']} nodes x {report['params']['slots']} slots, "
                 f"R={report['params']['replicas']}, {report['params']['slot_mib']} MiB per slot")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--zones", type=int, default=3)
    ap.add_argument("--changes", type=int, default=20, help="joins and leaves for the movement statistics")
    ap.add_argument("--slot-mib", type=int, default=512, help="data per slot and replica, MiB")
    ap.add_argument("--mbps", type=float, default=200.0, help="the rebalancer's copy throttle, MB/s")
    ap.add_argument("--clients", type=int, default=10000, help="clients watching the cluster (fan-out)")
    ap.add_argument("--simulate", default="join,drain,crash", help="changes to run through the simulator")
    ap.add_argument("--round-s", type=float, default=ROUND_S, help="the rebalancer's round size (s of copying)")
    ap.add_argument("--what-if-round-s", type=float, default=2.0,
                    help="also simulate a join with rounds this long (0: no; 2 s was the default before)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/control_plane.json")
    args = ap.parse_args(argv)

    report: dict[str, Any] = {"params": vars(args).copy()}
    print(f"movement: {args.changes} joins and leaves at {args.nodes} nodes x {args.slots} slots ...", flush=True)
    report["movement"] = movement(args.nodes, args.slots, args.replicas, args.zones, args.changes, args.seed)
    print(json.dumps(report["movement"], indent=1), flush=True)
    report["simulated"] = []
    for kind in [k for k in args.simulate.split(",") if k]:
        print(f"simulating a {kind} ...", flush=True)
        r = simulated(kind, args.nodes, args.slots, args.replicas, args.zones, args.slot_mib, args.mbps, args.seed,
                      args.round_s)
        print(json.dumps(r), flush=True)
        report["simulated"].append(r)
    if args.what_if_round_s:
        print(f"simulating a join with {args.what_if_round_s:.0f} s rounds ...", flush=True)
        r = simulated("join", args.nodes, args.slots, args.replicas, args.zones, args.slot_mib, args.mbps, args.seed,
                      args.what_if_round_s)
        r["kind"] = f"join, {args.what_if_round_s:.0f}s rounds"
        print(json.dumps(r), flush=True)
        report["simulated"].append(r)
    watchers = args.nodes + args.clients
    for r in report["simulated"]:
        r["watch_fanout_bytes"] = (r["watch_bytes_per_watcher"] or 0) * watchers
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
