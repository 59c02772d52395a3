"""Sustained PUTs into a full region, with and without one-sided readers.

    python -m bench.put_full [--memory 2GiB] [--size BYTES] [--seconds S] [--repeats R] [--json FILE] [--png FILE]

Once a node's region is full every PUT evicts, and an evicted value that the
client-readable index showed cannot be reused while a one-sided reader may
still copy it (memkv/engine/readers.py). This measures what that costs. Per
repeat a fresh node (``memkv serve``, ``--memory``) is filled past its budget
(it evicts), then, on that node, in this order (the index, once a one-sided
reader asked for it, stays on):

* ``none``: no one-sided reader ever attached (the index is off);
* ``idle``: a shared-memory client attached and read once, then idles;
* ``reading``: a shared-memory client reads a working set (``session``
  namespace, another pool than the PUTs' ``shared``) one-sided without pause.

For each, 1 and 8 client processes PUT new keys (``--size``, default 64 KiB,
one request per value) for ``--seconds``. A PUT the node refuses with
``OutOfMemory ... retry shortly`` (freed bytes still in quarantine) is retried
after 10 ms, as the message asks, and counted. Medians over ``--repeats``.
Writes JSON (default bench/results/put_full.json) and a PNG. Run it under
``flock /tmp/memkv-heavy.lock``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import free_port, gather, popen_tied, stop_process, wait_for_tcp

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("none", "idle", "reading")
READ_SET = 256  # values the reader reads, round robin


def start_node(memory: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = workdir / "node.log"
    proc = popen_tied([sys.executable, "-m", "memkv.cli", "serve", "--listen", f"127.0.0.1:{port}",
                       "--memory", memory], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_for_tcp("127.0.0.1", port, proc, 60.0, log)
    return proc, f"memkv://127.0.0.1:{port}"


def fill(url: str, size: int) -> int:
    """PUT until the shared pool evicts; values put."""
    from memkv.client import SyncClient

    value = os.urandom(size)
    n = 0
    with SyncClient.connect(url, transport="tcp") as c:
        while c.stats()["pools"]["shared"]["evictions"] == 0:
            c.put_many({f"fill-{n + i}".encode(): value for i in range(64)})
            n += 64
        for i in range(READ_SET):  # the reader's working set, in the other pool
            c.put(f"rs-{i}".encode(), value, namespace="session")
    return n


def _reader(url: str, size: int, read: bool, ready: Any, stop: Any, out: Any) -> None:
    """A shared-memory client: attaches (one read), then reads the working set until ``stop`` or idles."""
    from memkv.client import SyncClient

    try:
        with SyncClient.connect(url, transport="shm", timeout=30.0) as c:
            buf = bytearray(size)
            assert c.get_into(b"rs-0", buf, namespace="session") == size
            assert c.onesided.counters["onesided"] == 1, c.onesided.counters
            ready.set()
            n = 0
            t0 = time.perf_counter()
            while not stop.is_set():
                if read:
                    for _ in range(64):
                        c.get_into(f"rs-{n % READ_SET}".encode(), buf, namespace="session")
                        n += 1
                else:
                    stop.wait(0.05)
            out.put((n / (time.perf_counter() - t0), dict(c.onesided.counters), None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        ready.set()
        out.put((0.0, {}, f"{type(exc).__name__}: {exc}"))


def _writer(url: str, size: int, seconds: float, idx: int, tag: str, barrier: Any, out: Any) -> None:
    from memkv.client import SyncClient
    from memkv.errors import OutOfMemory

    try:
        with SyncClient.connect(url, transport="tcp", timeout=30.0) as c:
            value = os.urandom(size)
            c.put(f"{tag}-{idx}-warm".encode(), value)
            barrier.wait(120)
            done = retries = 0
            i = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                try:
                    c.put(f"{tag}-{idx}-{i}".encode(), value)
                    done += 1
                except OutOfMemory:  # freed bytes still in quarantine: the node says retry shortly
                    retries += 1
                    time.sleep(0.01)
                i += 1
            out.put((done / (time.perf_counter() - t0), retries, None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        out.put((0.0, 0, f"{type(exc).__name__}: {exc}"))


def measure(url: str, clients: int, size: int, seconds: float, tag: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, size, seconds, i, tag, barrier, out)) for i in range(clients)]
    res = gather(procs, out, 300, f"{clients} writers")
    ops = sum(r[0] for r in res)
    return {"ops_s": ops, "MBps": ops * size / 1e6, "oom_retries": sum(r[1] for r in res)}


def node_stats(url: str) -> dict[str, Any]:
    from memkv.client import SyncClient

    with SyncClient.connect(url, transport="tcp") as c:
        st = c.stats()
    return {"early_reclaimed": st["region"].get("early_reclaimed"), "quarantined": st["region"]["quarantined"],
            "readers": st.get("readers")}


def run_repeat(rep: int, args: argparse.Namespace, clients: list[int], workdir: Path) -> list[dict[str, Any]]:
    samples = []
    proc, url = start_node(args.memory, workdir)
    ctx = mp.get_context("spawn")
    reader: Any = None
    stop = ctx.Event()
    rout = ctx.Queue()
    try:
        filled = fill(url, args.size)
        print(f"rep {rep}: filled with {filled} values", flush=True)
        for case in CASES:
            if case != "none":
                if reader is not None:  # the idle one goes; a reading one comes
                    stop.set()
                    reader.join(30)
                    rout.get(timeout=30)
                    stop = ctx.Event()
                ready = ctx.Event()
                reader = ctx.Process(target=_reader, args=(url, args.size, case == "reading", ready, stop, rout))
                reader.start()
                if not ready.wait(60):
                    raise RuntimeError("the reader did not attach")
            for n in clients:
                m = measure(url, n, args.size, args.seconds, f"r{rep}{case}{n}")
                samples.append({"case": case, "clients": n, "repeat": rep, **m})
                print(f"rep {rep} {case:8} writers {n}: {m['ops_s']:8.0f} PUT/s {m['MBps']:7.1f} MB/s, "
                      f"OutOfMemory retries {m['oom_retries']}", flush=True)
        stop.set()
        reader.join(30)
        reads_s, counters, err = rout.get(timeout=30)
        if err:
            raise RuntimeError(f"reader: {err}")
        samples.append({"case": "reader", "repeat": rep, "reads_s": reads_s, "counters": counters,
                        "node": node_stats(url)})
        print(f"rep {rep} reader: {reads_s:.0f} one-sided GETs/s while writers ran, counters {counters}", flush=True)
    finally:
        stop.set()
        if reader is not None and reader.is_alive():
            reader.kill()
        stop_process(proc)
    return samples


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for case in CASES:
        for n in sorted({s["clients"] for s in samples if s["case"] == case}):
            runs = [s for s in samples if s["case"] == case and s["clients"] == n]
            rows.append({"case": case, "clients": n, "ops_s": statistics.median(r["ops_s"] for r in runs),
                         "MBps": statistics.median(r["MBps"] for r in runs),
                         "oom_retries": statistics.median(r["oom_retries"] for r in runs),
                         "runs": [round(r["ops_s"]) for r in runs]})
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    clients = sorted({r["clients"] for r in rows})
    width = 0.8 / len(clients)
    for j, n in enumerate(clients):
        ys = [next((r["ops_s"] for r in rows if r["case"] == c and r["clients"] == n), 0) for c in CASES]
        ax.bar([i + j * width for i in range(len(CASES))], ys, width, label=f"{n} writer(s)")
    ax.set_xticks([i + width * (len(clients) - 1) / 2 for i in range(len(CASES))], CASES)
    ax.set_ylabel("PUT/s into a full region (median)")
    ax.set_title(f"{result['size']} B PUTs, {result['memory']} region; {result.get('label', '')}")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="2GiB")
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--label", default="", help="what code ran (put in the JSON and the plot)")
    ap.add_argument("--json", type=Path, default=RESULTS / "put_full.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "put_full.png")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memkv-putfull-") as tmp:
        for rep in range(args.repeats):
            samples += run_repeat(rep, args, clients, Path(tmp))
    rows = summarize([s for s in samples if s["case"] in CASES])
    result = {"benchmark": "put_full", "command": "python -m bench.put_full " + " ".join(argv or sys.argv[1:]),
              "label": args.label, "memory": args.memory, "size": args.size, "seconds": args.seconds,
              "repeats": args.repeats, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]},
              "elapsed_s": time.time() - t0, "rows": rows, "samples": samples}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    print(f"\n{'case':8} {'writers':>7} {'PUT/s':>8} {'MB/s':>7} {'OOM retries':>11}  runs")
    for r in rows:
        print(f"{r['case']:8} {r['clients']:7} {r['ops_s']:8.0f} {r['MBps']:7.1f} "
              f"{r['oom_retries']:11.0f}  {r['runs']}")
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
