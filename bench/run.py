"""Single-node benchmark: memkv and Redis side by side, in one run, on this machine.

    python -m bench.run [--quick] [--out bench/results] [--peers redis,memkv]

Starts its own redis-server and memkv node on free loopback ports, measures the
machine's limits (memcpy, loopback TCP), then PUT / GET / get_into / batched GET
for each value size with 1 and 8 client processes, repeating every measurement
and keeping medians. Repeats are interleaved across peers so that a noisy
neighbour hurts both sides alike. Writes ``single_node.json`` (raw numbers,
machine, ratios memkv/redis, targets) and ``single_node.png`` into ``--out``
and prints a table. Exit status 1 if a peer failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import report
from bench.baseline import install_revision
from bench.limits import measure_limits
from bench.lmcache_server_peer import LMCacheServer
from bench.machine import machine_info
from bench.memcached_peer import MemcachedServer
from bench.memkv_peer import MemkvNode
from bench.mooncake_peer import MooncakeServer
from bench.procs import tail
from bench.redis_peer import RedisServer, hiredis_available
from bench.workload import OPS, ClientPool, PeerSpec, Sample, Task, WorkerError, n_read_keys

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB)
READ_OPS = ("get", "get_into", "get_many", "get_many_into")
PEERS = ("redis", "memcached", "lmcache_server", "mooncake", "memkv", "memkv-auto")
MAX_CONSECUTIVE_ERRORS = 3

# a report piped to a file or CI log should not be cut to 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)


def parse_size(text: str) -> int:
    units = {"b": 1, "kib": KiB, "k": KiB, "mib": MiB, "m": MiB}
    t = text.strip().lower()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    ap.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    ap.add_argument("--peers", default="redis,memkv", help=f"comma list of {', '.join(PEERS)} (default: redis,memkv)")
    ap.add_argument("--sizes", default=",".join(report.fmt_size(s) for s in DEFAULT_SIZES), help="value sizes")
    ap.add_argument("--clients", default="1,8", help="client process counts (default: 1,8)")
    ap.add_argument("--ops", default=",".join(("put", *READ_OPS)), help="operations to measure (default: all)")
    ap.add_argument("--batch", type=int, default=16, help="keys per batched GET (default: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (median kept)")
    ap.add_argument("--seconds", type=float, help="time budget per measurement (default 1.0, quick 0.1)")
    ap.add_argument("--no-limits", action="store_true", help="skip the memcpy / loopback TCP measurements")
    ap.add_argument("--memkv-memory", default="2GiB", help="--memory of the memkv node (default: 2GiB)")
    ap.add_argument("--memkv-url", help="use this running node (memkv://HOST:PORT) instead of starting one")
    ap.add_argument("--baseline", metavar="REV", help="also run the node and client of this earlier commit, "
                    "interleaved with the working tree's (bench/baseline.py); ratios memkv / memkv@REV")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every measurement")
    args = ap.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {bad}; choose from {PEERS}")
    if args.baseline:
        args.peers.append("baseline")
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    args.ops = [op for op in ("put", *READ_OPS) if op in args.ops.split(",")]
    if args.seconds is None:
        args.seconds = 0.1 if args.quick else 1.0
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.tmp = self.out / "tmp"
        self.pools: dict[str, ClientPool] = {}
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.consecutive_errors: dict[str, int] = {}
        self.servers: dict[str, Any] = {}
        self.baseline_label = ""  # short commit id of --baseline once installed
        self.run_id = int(time.time())
        self.put_budget = (64 if args.quick else 256) * MiB

    # --- peers -----------------------------------------------------------------------------
    def start_peers(self, stack: contextlib.ExitStack) -> None:
        max_clients = max(self.args.clients)
        for peer in self.args.peers:
            try:
                spec = self._start_server(peer, stack)
                with console.status(f"connecting {max_clients} {peer} clients"):
                    pool = ClientPool(spec, max_clients)
                stack.callback(pool.close)
                self.pools[spec.name] = pool
            except Exception as exc:  # one peer failing must not lose the other's numbers
                self.fail(peer, f"could not start: {exc}")

    def _start_server(self, peer: str, stack: contextlib.ExitStack) -> PeerSpec:
        if peer == "baseline":
            with console.status(f"installing memkv at {self.args.baseline} (once; cached)"):
                label, lib = install_revision(self.args.baseline)
            self.baseline_label = label
            node = MemkvNode(self.tmp / f"memkv-{label}", memory=self.args.memkv_memory, pythonpath=str(lib))
            with console.status(f"starting memkv@{label} node"):
                stack.enter_context(node)
            self.servers[f"memkv@{label}"] = node
            return PeerSpec("memkv", node.host, node.port, "tcp", revision=label, pythonpath=str(lib))
        if peer == "redis":
            srv = RedisServer(self.tmp / "redis")
            with console.status("starting redis-server"):
                stack.enter_context(srv)
            self.servers[peer] = srv
            return PeerSpec("redis", srv.host, srv.port)
        if peer in ("memcached", "lmcache_server", "mooncake"):
            server: Any = {"memcached": MemcachedServer, "lmcache_server": LMCacheServer,
                           "mooncake": MooncakeServer}[peer](self.tmp / peer)
            with console.status(f"starting {peer}"):
                stack.enter_context(server)
            self.servers[peer] = server
            return PeerSpec(peer, server.host, server.port, metadata=getattr(server, "metadata", ""))
        transport = "tcp" if peer == "memkv" else peer.split("-", 1)[1]
        if self.args.memkv_url:
            hostport = self.args.memkv_url.removeprefix("memkv://")
            host, port = hostport.rsplit(":", 1)
            return PeerSpec("memkv", host, int(port), transport)
        node = self.servers.get("memkv-node")
        if node is None:
            node = MemkvNode(self.tmp / "memkv", memory=self.args.memkv_memory)
            with console.status(f"starting memkv node ({' '.join(node.command())})"):
                stack.enter_context(node)
            self.servers["memkv-node"] = node
        return PeerSpec("memkv", node.host, node.port, transport)

    def fail(self, peer: str, msg: str) -> None:
        text = f"{peer}: {msg}"
        node = self.servers.get("memkv-node")
        if peer.startswith("memkv") and node is not None and node.proc is not None and node.proc.poll() is not None:
            text += f"\nmemkv node exited with {node.proc.returncode}; its log:\n{tail(node.log)}"
        self.errors.append(text)
        console.print(f"[red]{text}[/red]")

    def drop(self, name: str, why: str) -> None:
        pool = self.pools.pop(name, None)
        if pool is not None:
            self.fail(name, f"dropped from the rest of the run: {why}")
            with contextlib.suppress(Exception):
                pool.close()

    def each_pool(self, what: str, fn: Any) -> None:
        for name, pool in list(self.pools.items()):
            try:
                fn(pool)
            except Exception as exc:
                self.drop(name, f"{what} failed: {exc}")

    # --- measurements ------------------------------------------------------------------------
    def plan(self) -> list[tuple[int, str, int, int]]:
        """(size, op, clients, repeat) in run order; peers are interleaved inside each."""
        steps = []
        for size in self.args.sizes:
            for op in self.args.ops:
                for clients in self.args.clients:
                    steps += [(size, op, clients, rep) for rep in range(self.args.repeats)]
        return steps

    def measure(self, pool: ClientPool, op: str, size: int, clients: int) -> None:
        name = pool.spec.name
        if op not in pool.spec.ops:
            return
        self.run_id += 1
        batch = self.args.batch if op.startswith("get_many") else 1
        big = size * batch * clients >= 16 * MiB  # one round of these takes ~10-100 ms here
        min_ops = (1 if big else 2) if self.args.quick else 3
        warmup = 0 if self.args.quick and big else 1
        max_ops = max(min_ops, self.put_budget // size // clients) if op == "put" else 10_000_000
        task = Task(op, size, batch, n_read_keys(size), self.args.seconds, max_ops, self.run_id, min_ops, warmup)
        s = pool.measure(task, clients)
        self.samples.append(s)
        if op == "put":
            try:
                pool.cleanup()
            except WorkerError as exc:
                s.error = (s.error or "") + f"\ncleanup: {exc}"
        if s.error or s.misses:
            n = self.consecutive_errors[name] = self.consecutive_errors.get(name, 0) + 1
            short = (s.error or f"{s.misses} misses").strip().splitlines()[-1]
            console.print(f"[red]{name} {op} {report.fmt_size(size)} c={clients}: {short}[/red]")
            if n >= MAX_CONSECUTIVE_ERRORS:
                self.drop(name, f"{n} failed measurements in a row; last:\n{s.error or ''}")
        else:
            self.consecutive_errors[name] = 0
            if self.args.verbose:
                console.print(
                    f"  {name:10s} {report.op_label(op, batch):18s} {report.fmt_size(size):>6s} c={clients} "
                    f"{s.gbps:7.3f} GB/s {s.ops_s:9.0f} op/s p50 {s.p50_us:8.0f} µs p99 {s.p99_us:8.0f} µs"
                )

    def run(self) -> None:
        steps = self.plan()
        filled: int | None = None
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*cols, console=console, transient=True) as progress:
            bar = progress.add_task("measuring", total=len(steps))
            for size, op, clients, _rep in steps:
                if op != "put" and filled != size:
                    self._refill(filled, size)
                    filled = size
                progress.update(bar, description=f"{op} {report.fmt_size(size)} c={clients}")
                for pool in list(self.pools.values()):
                    self.measure(pool, op, size, clients)
                progress.advance(bar)
            if filled is not None:
                self._refill(filled, None)

    def _refill(self, old: int | None, new: int | None) -> None:
        """Drop the read set of the previous size, write the one for the next."""
        if old is not None:
            self.each_pool("delete", lambda p: p.delete_reads(old, n_read_keys(old)))
            self.each_pool("reset", lambda p: p.reset())
        if new is not None:
            with console.status(f"prefilling {n_read_keys(new)} x {report.fmt_size(new)}"):
                self.each_pool("prefill", lambda p: p.fill(new, n_read_keys(new)))

    # --- report --------------------------------------------------------------------------------
    def document(self, machine: dict[str, Any], limits: dict[str, Any], wall: float) -> dict[str, Any]:
        results = report.summarize(self.samples)
        a = self.args
        return {
            "schema": 1,
            "benchmark": "single_node",
            "quick": a.quick,
            "wall_seconds": round(wall, 1),
            "config": {
                "peers": a.peers,
                "sizes": a.sizes,
                "clients": a.clients,
                "batch": a.batch,
                "repeats": a.repeats,
                "seconds_per_measurement": a.seconds,
                "put_bytes_cap_per_measurement": self.put_budget,
                "memkv_memory": a.memkv_memory,
                "memkv_url": a.memkv_url,
                "redis_client": f"redis-py, hiredis parser: {hiredis_available()}",
                "ops": dict(OPS),
                "statistic": "median over repeats of each metric; latency percentiles over all ops of a run",
            },
            "machine": machine,
            "limits": limits,
            "results": results,
            "ratios": report.compute_ratios(results),
            "baseline": self.baseline_label,
            "vs_baseline": report.compute_ratios(results, f"memkv@{self.baseline_label}", True, ("memkv",))
            if self.baseline_label
            else [],
            "targets": report.evaluate_targets(results, limits),
            "errors": self.errors,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    bench = Bench(args)
    machine = machine_info()
    limits: dict[str, Any] = {}
    if not args.no_limits:
        with console.status("measuring machine limits (memcpy, loopback TCP)"):
            limits = measure_limits(quick=args.quick, repeats=args.repeats)
    try:
        with contextlib.ExitStack() as stack:
            bench.start_peers(stack)
            if bench.pools:
                bench.run()
    except KeyboardInterrupt:
        bench.errors.append("interrupted")
        console.print("[yellow]interrupted: writing what was measured[/yellow]")
    except Exception:
        bench.errors.append(traceback.format_exc())
        console.print_exception()
    doc = bench.document(machine, limits, time.monotonic() - t0)
    json_path, png_path = report.write_results(doc, bench.out, "single_node", report.plot_png)
    report.print_report(doc)
    console.print(f"wrote {json_path} and {png_path} in {time.monotonic() - t0:.0f}s")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
