"""Durable put throughput: memkv durable vs memkv memory vs Redis AOF (always / everysec).

    python -m bench.durable [--sizes 64KiB,1MiB] [--clients 1,8] [--seconds 3] [--repeats 3] [--out bench/results]

Starts, on free loopback ports, one memkv node (``--data-dir`` in a temporary
directory; config with a ``durable`` namespace ``dur`` and a ``memory`` namespace
``mem``) and two private redis-servers with ``--appendonly yes`` and
``appendfsync always`` / ``everysec`` (each in its own temporary directory).
For every value size and client count, N client processes (each with its own
connection: ``memkv.client.SyncClient`` / redis-py with hiredis) put values in
a loop for ``--seconds`` seconds, each cycling over its own ``--keys`` keys (so
memory stays bounded and the log keeps compaction busy, as in real use); every
put carries new bytes (a counter in its first 12 bytes). A
memkv durable put is acknowledged only after its fdatasync (group commit);
Redis ``always`` fsyncs the AOF before replying, ``everysec`` once a second.
Repeats are interleaved across the four systems (noisy neighbours hit all alike);
the median repeat is kept.

Writes ``durable.json`` (machine, settings, every repeat, medians, ratios) and
``durable.png`` into ``--out``; prints a markdown table. Target (issue 3):
durable put >= 0.8x memory put at 1 MiB with 8 clients.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.memkv_peer import MemkvNode
from bench.procs import gather
from bench.redis_peer import RedisServer

KiB = 1 << 10
MiB = 1 << 20
SYSTEMS = ("memkv-memory", "memkv-durable", "redis-everysec", "redis-always")
TARGET = 0.8

CONFIG = """
[namespaces.dur]
durability = "durable"
overwrite = true
[namespaces.mem]
durability = "memory"
overwrite = true
"""


def parse_size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in (("kib", KiB), ("mib", MiB), ("k", KiB), ("m", MiB)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // KiB} KiB"


class DurableNode(MemkvNode):
    def __init__(self, workdir: Path, memory: str, disk: str) -> None:
        super().__init__(workdir, memory)
        self.cfg = workdir / "memkv.toml"
        self.disk = disk

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.cfg), "--disk", self.disk]

    def start(self, timeout: float = 60.0) -> DurableNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(CONFIG)
        super().start(timeout)
        return self


# -- the client processes
def _client(system: str, addr: Any, cid: int, size: int, keys: int, start_at: float, seconds: float,
            q: Any) -> None:
    try:
        buf = bytearray(os.urandom(size))

        def value_for(n: int) -> bytes:
            # every put carries new bytes: an identical re-put would be acknowledged without a write
            struct.pack_into("<QI", buf, 0, n, cid)
            return bytes(buf)

        names = [f"c{cid}-k{i}".encode() for i in range(keys)]
        if system.startswith("memkv"):
            from memkv.client import SyncClient

            c = SyncClient.connect(addr, timeout=60)
            ns = "dur" if system == "memkv-durable" else "mem"

            def put(k: bytes, n: int) -> None:
                c.put(k, value_for(n), namespace=ns)
        else:
            import redis

            c = redis.Redis(host="127.0.0.1", port=addr, decode_responses=False, single_connection_client=True)

            def put(k: bytes, n: int) -> None:
                c.set(k, value_for(n))
        put(names[0], 1 << 40)  # warm the connection
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        end = t0 + seconds
        n = 0
        while True:
            put(names[n % keys], n)
            n += 1
            if time.perf_counter() >= end:
                break
        q.put((cid, n, time.perf_counter() - t0, None))
        c.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put((cid, 0, 0.0, f"{type(exc).__name__}: {exc}"))


def run_cell(system: str, addr: Any, size: int, clients: int, keys: int, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 0.5 + 0.1 * clients
    procs = [ctx.Process(target=_client, args=(system, addr, i, size, keys, start_at, seconds, q))
             for i in range(clients)]
    got = gather(procs, q, seconds + 120, f"{system} {fmt_size(size)} x{clients}")
    ops = sum(g[1] for g in got)
    # each client ran for ~seconds from a common start: throughput = sum of per-client rates
    rate = sum(g[1] / g[2] for g in got)
    return {"ops": ops, "ops_s": rate, "mib_s": rate * size / MiB}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,1MiB")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keys", type=int, default=8, help="keys per client (overwritten in a loop)")
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--disk", default="16GiB")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    doc: dict[str, Any] = {"bench": "durable put throughput", "machine": machine_info(),
                           "settings": {"sizes": sizes, "clients": clients, "seconds": args.seconds,
                                        "repeats": args.repeats, "keys_per_client": args.keys,
                                        "memory": args.memory, "disk": args.disk},
                           "command": "python -m bench.durable " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "runs": []}
    runs: list[dict[str, Any]] = doc["runs"]
    with tempfile.TemporaryDirectory(prefix="memkv-durable-") as tmp:
        root = Path(tmp)
        node = DurableNode(root / "memkv", args.memory, args.disk).start()
        redises = {f"redis-{policy}": RedisServer(root / f"redis-{policy}", appendfsync=policy).start(30)
                   for policy in ("always", "everysec")}
        addr = {"memkv-memory": node.url, "memkv-durable": node.url,
                "redis-always": redises["redis-always"].port, "redis-everysec": redises["redis-everysec"].port}
        try:
            for size in sizes:
                for n in clients:
                    for rep in range(args.repeats):
                        for system in systems:
                            before = _flash_stats(node.url) if system == "memkv-durable" else None
                            r = run_cell(system, addr[system], size, n, args.keys, args.seconds)
                            row = {"system": system, "size": size, "clients": n, "repeat": rep, **r}
                            if before is not None:
                                after = _flash_stats(node.url)
                                fsyncs = after["fsyncs"] - before["fsyncs"]
                                row["fsyncs"] = fsyncs
                                row["puts_per_fsync"] = round(r["ops"] / fsyncs, 2) if fsyncs else None
                            runs.append(row)
                            print(f"{system:15s} {fmt_size(size):>7s} x{n}  rep {rep}: {r['ops_s']:9.1f} puts/s "
                                  f"{r['mib_s']:8.1f} MiB/s", flush=True)
            doc["flash"] = _flash_stats(node.url)
        finally:
            node.stop()
            for rd in redises.values():
                rd.stop()
    doc["results"] = summarize(runs, sizes, clients, systems)
    target = next((x for x in doc["results"] if x["size"] == MiB and x["clients"] == 8), None)
    if target is not None and target.get("durable_vs_memory") is not None:
        doc["target"] = {"what": "durable put >= 0.8x memory put at 1 MiB with 8 clients",
                         "ratio": target["durable_vs_memory"], "met": target["durable_vs_memory"] >= TARGET}
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out)
    (out / "durable.json").write_text(json.dumps(doc, indent=2))
    try:
        plot_png(doc, out / "durable.png")
    except ImportError as exc:
        print(f"(no PNG: {exc})")
    print(markdown_table(doc))
    if "target" in doc:
        t = doc["target"]
        verdict = "met" if t["met"] else "MISSED"
        print(f"\ntarget: durable/memory at 1 MiB x8 = {t['ratio']:.2f} (>= {TARGET}): {verdict}")
    print(f"-> {out / 'durable.json'}, {out / 'durable.png'}")
    return 0


def _flash_stats(url: str) -> dict[str, Any]:
    from memkv.client import SyncClient

    with SyncClient.connect(url, timeout=60) as c:
        return c.stats()["flash"]  # type: ignore[no-any-return]


def summarize(runs: list[dict[str, Any]], sizes: list[int], clients: list[int], systems: list[str]) -> list[dict]:
    out = []
    for size in sizes:
        for n in clients:
            row: dict[str, Any] = {"size": size, "clients": n}
            for system in systems:
                rates = [r["ops_s"] for r in runs if r["system"] == system and r["size"] == size and r["clients"] == n]
                if rates:
                    med = statistics.median(rates)
                    row[system] = {"ops_s": round(med, 1), "mib_s": round(med * size / MiB, 1),
                                   "repeats": [round(x, 1) for x in rates]}
                    ppf = [r["puts_per_fsync"] for r in runs if r["system"] == system and r["size"] == size
                           and r["clients"] == n and r.get("puts_per_fsync")]
                    if ppf:
                        row[system]["puts_per_fsync"] = statistics.median(ppf)
            mem, dur = row.get("memkv-memory"), row.get("memkv-durable")
            row["durable_vs_memory"] = round(dur["ops_s"] / mem["ops_s"], 3) if mem and dur else None
            for name in ("redis-always", "redis-everysec"):
                rd = row.get(name)
                row[f"durable_vs_{name}"] = round(dur["ops_s"] / rd["ops_s"], 3) if rd and dur else None
            out.append(row)
    return out


def markdown_table(doc: dict[str, Any]) -> str:
    systems = [s for s in SYSTEMS if any(s in r for r in doc["results"])]
    head = "| value | clients | " + " | ".join(f"{s} puts/s (MiB/s)" for s in systems) + " | durable / memory |"
    lines = [head, "|" + "---|" * (len(systems) + 3)]
    for r in doc["results"]:
        cells = []
        for s in systems:
            x = r.get(s)
            cells.append("-" if x is None else f"{x['ops_s']:,.0f} ({x['mib_s']:,.0f})")
        ratio = r.get("durable_vs_memory")
        lines.append(f"| {fmt_size(r['size'])} | {r['clients']} | " + " | ".join(cells)
                     + f" | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def plot_png(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    systems = [s for s in SYSTEMS if any(s in r for r in results)]
    labels = [f"{fmt_size(r['size'])}\n{r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in results]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        ys = [r[s]["mib_s"] if s in r else 0 for r in results]
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, ys, width, label=s)
    ax.set_xticks(range(len(results)), labels)
    ax.set_ylabel("put throughput (MiB/s)")
    ax.set_title("Durable put: memkv (group commit) vs memory vs Redis AOF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
