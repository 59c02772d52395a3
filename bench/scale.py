"""Scaling with worker processes: ``memkv serve --workers 1`` vs ``--workers 2``, 1 to 8 client processes.

    python -m bench.scale [--quick] [--seconds S] [--repeats R] [--size BYTES] [--json FILE] [--png FILE]

Both servers run for the whole benchmark (an idle one only waits); every point
-- (operation, client count, worker count) -- is measured ``--repeats`` times,
the two worker counts interleaved within each repeat, and the median kept.
Operations:

* ``put``: ``SyncClient.put`` of a new key (``--size`` bytes, default 64 KiB) in
  namespace ``fill``, whose pool (``session``) is not the working set's: when
  it is full it evicts its own oldest values, never the values the GETs read;
* ``get_tcp``: ``get_into`` over TCP of a working set put beforehand, one
  request per value (``SyncClient``: about as much CPU per request in the client
  as in the node);
* ``get_batch``: ``get_many_into`` of ``BATCH`` keys over TCP: one request per
  worker that owns some of them, sent together (``SyncClient``: every request
  sent, then every reply read, on the caller's thread);
* ``get_shm``: ``get_into`` over shared memory (client/core/onesided.py: the
  worker's region mapped; a hit costs the node nothing);
* ``get_pipe``: the node's capacity -- GET frames written straight on the
  sockets, ``PIPELINE`` requests in flight per client, each to the worker that
  owns its key's slot, replies counted from their headers. A client costs a
  few microseconds per request here, so the workers are the bottleneck.

A GET point that misses is an error (the working set must be in the region).
The client is given worker 0's address and routes every key to its worker by
slot (the layout comes from HELLO, client/core/routing.py). Each client process
connects, waits at a barrier with the others, runs ``--seconds``, and counts.

Reported per operation and client count: ops/s and GB/s for each worker count,
the scaling factor (2 workers / 1), where the CPU went (cores used by the
workers, the clients, the whole machine), the CPU cost of one request in the
workers and in a client (microseconds), the workers' wake-ups per request
(voluntary context switches), and the supervisor's own CPU. On paper: the
workers and client processes needed to fill a 100 Gb/s and an 800 Gb/s NIC, from
the per-request CPU costs measured here (a worker or a client with a whole core).
Writes JSON (default bench/results/scale.json) and a PNG. Run it under
``flock /tmp/memkv-heavy.lock``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("put", "get_tcp", "get_batch", "get_shm", "get_pipe")
GETS = ("get_tcp", "get_batch", "get_shm", "get_pipe")
WORKERS = (1, 2)
NIC_GBPS = {"100 Gb/s": 100 / 8, "800 Gb/s": 800 / 8}  # GB/s
BATCH = 16  # get_batch: keys per get_many_into
PIPELINE = 32  # get_pipe: requests in flight per client
# the PUTs' namespace: its own pool, so that filling it never evicts the GETs' working set ("shared")
CONFIG = """
[namespaces.fill]
pool = "session"
"""


def start_server(workers: int, memory: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ports = [free_port() for _ in range(workers)]
    log = workdir / f"workers{workers}.log"
    config = workdir / "memkv.toml"
    config.write_text(CONFIG)
    proc = popen_tied(
        [sys.executable, "-m", "memkv.cli", "serve", "--workers", str(workers), "--listen", f"127.0.0.1:{ports[0]}",
         "--worker-ports", ",".join(map(str, ports)), "--memory", memory, "--config", str(config)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    for p in ports:
        wait_for_tcp("127.0.0.1", p, proc, 60.0, log)
    return proc, f"memkv://127.0.0.1:{ports[0]}"


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wakeups(pid: int) -> int:
    """Times a process went to sleep and was woken (voluntary context switches) so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def worker_pids(supervisor: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == supervisor:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle / iowait) since boot: /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def working_set(url: str, size: int, count: int) -> list[bytes]:
    from memkv.client import SyncClient

    keys = [f"ws{size}-{i}".encode() for i in range(count)]
    with SyncClient.connect(url, transport="tcp") as c:
        for i in range(0, count, 64):
            c.put_many({k: (k * (size // len(k) + 1))[:size] for k in keys[i:i + 64]})
    return keys


class PipelinedGets:
    """``get_pipe``: GET frames written straight on one socket per worker (the routing is the client
    library's), ``depth`` in flight, replies counted from their 24-byte headers -- a load generator in
    the manner of ``redis-benchmark -P``, cheap enough per request that the workers are what limits."""

    def __init__(self, url: str, keys: list[bytes], depth: int) -> None:
        from memkv.client import SyncClient
        from memkv.protocol.codec import encode_frame
        from memkv.protocol.opcodes import Op

        with SyncClient.connect(url, transport="tcp") as c:
            owner = [c.router.replicas(k)[0] for k in keys]
        self.socks: dict[Any, socket.socket] = {}
        for node in dict.fromkeys(owner):
            s = socket.create_connection((node.host, node.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            self.socks[node] = s
        self.frames = [(self.socks[o], encode_frame(int(Op.GET), 1, {"k": k}))
                       for k, o in zip(keys, owner, strict=True)]
        self.depth = depth
        self.sel = selectors.DefaultSelector()
        self.state: dict[socket.socket, list[Any]] = {}
        for s in self.socks.values():
            buf = bytearray(4 << 20)
            self.state[s] = [buf, memoryview(buf), 0, 0, 0]  # buffer, view, bytes held, parse position, replies due
            self.sel.register(s, selectors.EVENT_READ)

    def round(self, start: int, size: int) -> int:
        """``depth`` GETs of the keys from ``start`` on: sent per worker, every reply read; the misses."""
        from memkv.protocol.codec import F_ERROR, HEADER

        out: dict[socket.socket, list[bytes]] = {}
        n = len(self.frames)
        for j in range(start, start + self.depth):
            s, frame = self.frames[j % n]
            out.setdefault(s, []).append(frame)
        for s, frames in out.items():
            s.setblocking(True)
            s.sendall(b"".join(frames))
            s.setblocking(False)
            self.state[s][4] += len(frames)
        misses = 0
        due = self.depth
        while due:
            for key, _ in self.sel.select(30):
                st = self.state[key.fileobj]  # type: ignore[index]
                buf, view, have, pos, _left = st
                if len(buf) - have < 1 << 20:  # room for the next recv: the unparsed tail to the front
                    buf[:have - pos] = buf[pos:have]
                    have, pos = have - pos, 0
                got = key.fileobj.recv_into(view[have:])  # type: ignore[union-attr]
                if not got:
                    raise ConnectionError("a worker closed the connection")
                have += got
                while st[4] and have - pos >= 24:
                    h = HEADER.unpack_from(buf, pos)
                    end = pos + 24 + h[6] + h[7]
                    if end > have:
                        if end - pos > len(buf):
                            raise RuntimeError(f"a reply of {end - pos} bytes does not fit the buffer")
                        break
                    if h[3] & F_ERROR:
                        raise RuntimeError(f"error reply: {bytes(buf[pos + 24:pos + 24 + h[6]])!r}")
                    misses += h[7] != size
                    pos = end
                    st[4] -= 1
                    due -= 1
                st[2], st[3] = have, pos
        return misses

    def close(self) -> None:
        self.sel.close()
        for s in self.socks.values():
            s.close()


def _client(url: str, op: str, size: int, seconds: float, keys: list[bytes], idx: int, tag: str,
            barrier: Any, out: Any) -> None:
    """One client process: connect, wait for the others, run ``op`` for ``seconds``, report the count."""
    from memkv.client import SyncClient
    from memkv.errors import OutOfMemory

    transport = "shm" if op == "get_shm" else "tcp"
    if op == "get_pipe":
        return _pipelined_client(url, size, seconds, keys, idx, barrier, out)
    try:
        with SyncClient.connect(url, transport=transport, timeout=30.0) as c:
            value = os.urandom(size)
            buf = bytearray(size)
            bufs = [bytearray(size) for _ in range(BATCH)]
            n = len(keys)
            i = idx * 7919
            done = misses = retries = 0
            if op == "put":  # warm: the connections to every worker open, the shm mappings made
                c.put(f"{tag}-{idx}-warm".encode(), value, namespace="fill")
            else:
                for k in keys[:32]:
                    c.get_into(k, buf)
            barrier.wait(120)
            c0 = time.process_time()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(16):
                    if op == "put":
                        try:
                            c.put(f"{tag}-{idx}-{i}".encode(), value, namespace="fill")
                        except OutOfMemory:  # evicted bytes still in quarantine: the node says retry
                            retries += 1
                            time.sleep(0.01)
                            continue
                    elif op == "get_batch":  # one get_many_into of BATCH keys (split per worker)
                        got = c.get_many_into([keys[(i + j) % n] for j in range(BATCH)], bufs)
                        misses += sum(g != size for g in got)
                        i += BATCH
                        done += BATCH
                        continue
                    elif c.get_into(keys[i % n], buf) != size:
                        misses += 1
                    i += 1
                    done += 1
            dt = time.perf_counter() - t0
            out.put((idx, done, misses, dt, None, time.process_time() - c0, retries))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
        barrier.abort()  # the others stop waiting for this one
        out.put((idx, 0, 0, 0.0, f"{type(exc).__name__}: {exc}", 0.0, 0))


def _pipelined_client(url: str, size: int, seconds: float, keys: list[bytes], idx: int, barrier: Any,
                      out: Any) -> None:
    """One ``get_pipe`` client process (see ``PipelinedGets``); reports like ``_client``."""
    try:
        pipe = PipelinedGets(url, keys[idx * 7919 % len(keys):] + keys[:idx * 7919 % len(keys)], PIPELINE)
        try:
            pipe.round(0, size)  # warm
            barrier.wait(120)
            c0 = time.process_time()
            t0 = time.perf_counter()
            done = misses = 0
            while time.perf_counter() - t0 < seconds:
                misses += pipe.round(done, size)
                done += PIPELINE
            dt = time.perf_counter() - t0
            out.put((idx, done, misses, dt, None, time.process_time() - c0, 0))
        finally:
            pipe.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
        barrier.abort()
        out.put((idx, 0, 0, 0.0, f"{type(exc).__name__}: {exc}", 0.0, 0))


def measure(url: str, op: str, clients: int, size: int, seconds: float, keys: list[bytes], tag: str,
            workers: list[int]) -> dict[str, Any]:
    """One point. Besides the rate, where the CPU went while the clients ran: cores used by the workers
    (``workers``: their pids), by the clients, and by the whole machine (other users included) --
    what says whether a second worker had a core to run on."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()  # + this process: it starts the CPU count
    procs = [ctx.Process(target=_client, args=(url, op, size, seconds, keys, i, tag, barrier, out))
             for i in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(300)  # every client connected and warm: the window starts
    except threading.BrokenBarrierError:
        pass  # a client failed: its error comes through the queue
    w0, m0, t0 = sum(_cpu_s(p) for p in workers), machine_busy_s(), time.perf_counter()
    z0 = sum(_wakeups(p) for p in workers)
    res = [out.get(timeout=300) for _ in procs]
    w1, m1, t1 = sum(_cpu_s(p) for p in workers), machine_busy_s(), time.perf_counter()
    z1 = sum(_wakeups(p) for p in workers)
    for p in procs:
        p.join(30)
    errors = [r[4] for r in res if r[4]]
    if errors:
        raise RuntimeError(f"{op} with {clients} clients: {errors[0]}")
    misses = sum(r[2] for r in res)
    if op in GETS and misses:  # a miss moves no value: the point would measure something else
        raise RuntimeError(f"{op} with {clients} clients: {misses} misses (the working set is not in the region)")
    ops_s = sum(r[1] / r[3] for r in res)
    wall = statistics.median(r[3] for r in res)
    ops = sum(r[1] for r in res)
    client_cpu = sum(r[5] for r in res)
    return {"ops_s": ops_s, "GBps": ops_s * size / 1e9, "misses": misses,
            "oom_retries": sum(r[6] for r in res),
            "per_client_ops_s": ops_s / clients,
            # cores busy while the clients ran (from their barrier until the last reported)
            "worker_cores": (w1 - w0) / (t1 - t0), "machine_cores": (m1 - m0) / (t1 - t0),
            "client_cores": client_cpu / wall,
            # CPU per request: the workers' (their CPU over the window / requests; the window is a little
            # longer than the clients' timed loops, so slightly high) and the clients' (their own timers)
            "worker_us_per_op": (w1 - w0) / ops * 1e6, "client_us_per_op": client_cpu / ops * 1e6,
            "wakeups_per_op": (z1 - z0) / ops}


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats of each (op, clients, workers), and the scaling factor 2 workers / 1."""
    rows = []
    points = sorted({(s["op"], s["clients"]) for s in samples}, key=lambda p: (OPS.index(p[0]), p[1]))
    for op, clients in points:
        row: dict[str, Any] = {"op": op, "clients": clients}
        for w in WORKERS:
            runs = [s for s in samples if (s["op"], s["clients"], s["workers"]) == (op, clients, w)]
            row[f"w{w}_ops_s"] = statistics.median(r["ops_s"] for r in runs)
            row[f"w{w}_GBps"] = statistics.median(r["GBps"] for r in runs)
            row[f"w{w}_runs"] = [round(r["ops_s"]) for r in runs]
            for k in ("worker_cores", "client_cores", "machine_cores", "worker_us_per_op", "client_us_per_op",
                      "wakeups_per_op"):
                row[f"w{w}_{k}"] = statistics.median(r[k] for r in runs)
        row["scaling"] = row["w2_ops_s"] / row["w1_ops_s"] if row["w1_ops_s"] else None
        rows.append(row)
    return rows


def on_paper(rows: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Workers and client processes to fill a NIC, from the CPU one GET costs a worker and a client here
    (median over every point of the op): a worker or a client given a whole core serves 1 / cost
    requests a second. One-sided reads (get_shm) cost the workers nothing: only clients are counted."""
    out: dict[str, Any] = {}
    for op in GETS:
        mine = [r for r in rows if r["op"] == op]
        if not mine:
            continue
        w_us = statistics.median(r[f"w{w}_worker_us_per_op"] for r in mine for w in WORKERS)
        c_us = statistics.median(r[f"w{w}_client_us_per_op"] for r in mine for w in WORKERS)
        per_worker = size / w_us / 1e3 if w_us > 1.0 else None  # GB/s of one worker on one core
        per_client = size / c_us / 1e3 if c_us > 0 else None
        out[op] = {"worker_us_per_op": w_us, "client_us_per_op": c_us, "per_worker_core_GBps": per_worker,
                   "per_client_core_GBps": per_client, "value_bytes": size}
        for nic, gbps in NIC_GBPS.items():
            out[op][nic] = {"workers": round(gbps / per_worker, 1) if per_worker else None,
                            "clients": round(gbps / per_client, 1) if per_client else None}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Per operation: ops/s (top row, with the scaling factor) and the CPU one request cost the workers
    (bottom row, solid) and a client (dashed), for each worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(2, len(ops), figsize=(5 * len(ops), 7.5), squeeze=False)
    for col, op in enumerate(ops):
        mine = [r for r in rows if r["op"] == op]
        xs = [r["clients"] for r in mine]
        top, bottom = axes[0][col], axes[1][col]
        for w in WORKERS:
            line = top.plot(xs, [r[f"w{w}_ops_s"] for r in mine], marker="o", label=f"--workers {w}")[0]
            bottom.plot(xs, [r[f"w{w}_worker_us_per_op"] for r in mine], marker="o", color=line.get_color(),
                        label=f"workers, --workers {w}")
            bottom.plot(xs, [r[f"w{w}_client_us_per_op"] for r in mine], marker="x", linestyle="--",
                        color=line.get_color(), label=f"a client, --workers {w}")
        for r in mine:
            if r["scaling"]:
                top.annotate(f"{r['scaling']:.2f}x", (r["clients"], r["w2_ops_s"]), textcoords="offset points",
                             xytext=(0, 6), ha="center", fontsize=8)
        top.set_title(f"{op} ({result['size']} B values)")
        top.set_ylabel("ops/s (median)")
        bottom.set_ylabel("CPU µs per request (median)")
        for ax in (top, bottom):
            ax.set_xlabel("client processes")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"memkv serve --workers 1 vs 2 on {m['cpus']} CPUs (load average {m['loadavg_start']:.1f} at the "
                 f"start, {m['loadavg_end']:.1f} at the end)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 1.5 s per point, clients 1 and 8")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=65536, help="value size in bytes (default 64 KiB, a KV block)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "scale.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.clients = 1.5, 1, "1,8"
    clients = [int(c) for c in args.clients.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    load0 = os.getloadavg()[0]
    samples: list[dict[str, Any]] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="memkv-scale-") as tmp:
        servers = {w: start_server(w, "2GiB", Path(tmp)) for w in WORKERS}
        try:
            keys = {w: working_set(url, args.size, min(2048, (128 << 20) // args.size))
                    for w, (_, url) in servers.items()}
            # --workers 1 serves in the process itself; N > 1: the supervisor's children
            pids = {w: worker_pids(proc.pid) or [proc.pid] for w, (proc, _) in servers.items()}
            supervisor = servers[2][0].pid  # what the supervisor itself costs, over the whole run
            sup0, sup_t0 = _cpu_s(supervisor), time.perf_counter()
            for rep in range(args.repeats):
                for op in ops:
                    for n in clients:
                        # the two worker counts back to back, in alternating order: drift in the
                        # machine's load hits both alike
                        for w in (WORKERS if rep % 2 == 0 else WORKERS[::-1]):
                            m = measure(servers[w][1], op, n, args.size, args.seconds, keys[w], f"r{rep}c{n}w{w}",
                                        pids[w])
                            samples.append({"op": op, "clients": n, "workers": w, "repeat": rep, **m})
                            print(f"rep {rep} {op:8} clients {n} workers {w}: {m['ops_s']:9.0f} ops/s "
                                  f"{m['GBps']:.3f} GB/s; cores: workers {m['worker_cores']:.2f} clients "
                                  f"{m['client_cores']:.2f} machine {m['machine_cores']:.2f}; us/op: workers "
                                  f"{m['worker_us_per_op']:.1f} clients {m['client_us_per_op']:.1f}; wake-ups/op "
                                  f"{m['wakeups_per_op']:.2f}", flush=True)
            supervisor_cores = (_cpu_s(supervisor) - sup0) / (time.perf_counter() - sup_t0)
        finally:
            for proc, _ in servers.values():
                stop_process(proc)
    rows = summarize(samples)
    result = {
        "benchmark": "scale", "command": "python -m bench.scale " + " ".join(argv or sys.argv[1:]),
        "size": args.size, "seconds": args.seconds, "repeats": args.repeats, "clients": clients,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": load0,
                    "loadavg_end": os.getloadavg()[0]},
        "elapsed_s": time.time() - t_start, "supervisor_cores": supervisor_cores, "rows": rows,
        "on_paper": on_paper(rows, args.size), "samples": samples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    print(f"\n{'op':8} {'clients':>7} {'w1 ops/s':>10} {'w2 ops/s':>10} {'scaling':>8}  w1 / w2: cores (workers, "
          "clients, machine), us/op (workers, clients), worker wake-ups/op")
    for r in rows:
        print(f"{r['op']:8} {r['clients']:7} {r['w1_ops_s']:10.0f} {r['w2_ops_s']:10.0f} {r['scaling']:8.2f}  "
              + " / ".join(f"{r[f'w{w}_worker_cores']:.2f} {r[f'w{w}_client_cores']:.2f} "
                           f"{r[f'w{w}_machine_cores']:.2f}, {r[f'w{w}_worker_us_per_op']:.1f} "
                           f"{r[f'w{w}_client_us_per_op']:.1f}, {r[f'w{w}_wakeups_per_op']:.2f}" for w in WORKERS))
    print(f"supervisor: {supervisor_cores:.4f} cores")
    print(json.dumps(result["on_paper"], indent=1))
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
