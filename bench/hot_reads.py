"""TCP GETs with the node's hot-read threads on and off (memkv/server/hot_reads.py), side by side.

Two nodes of this tree run at once, with ``[node] tcp_hot_reads`` true and false; every cell (value
size x client processes x with or without a concurrent writer) is measured on both, interleaved,
``--repeats`` times, medians kept. Each client process does blocking GETs (``get`` below 128 KiB,
``get_into`` above) of preloaded keys for ``--seconds`` and reports its per-request latencies; the
writer (a separate process) PUTs 64 KiB values into the same node meanwhile, its latencies reported
too. So the table shows what a thread per connection costs or gains with 1 and 8 clients, and what
the GIL does to GETs while a writer keeps the trio loop busy (and to the writer).

    flock /tmp/memkv-heavy.lock .venv/bin/python -m bench.hot_reads --out bench/results/hot_reads
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.memkv_peer import MemkvNode
from bench.report import fmt_size
from memkv.sizes import parse_size

KEYS = 64


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _reader(url: str, size: int, seconds: float, start: Any, out: Any) -> None:
    from memkv.client import SyncClient

    try:
        with SyncClient.connect(url, transport="tcp") as cl:
            buf = bytearray(size)
            keys = [b"r%d-%d" % (size, i) for i in range(KEYS)]
            for k in keys[:4]:  # warm: the connection settles in the mode it serves in
                cl.get(k)
            lat: list[float] = []
            start.wait()
            t_end = time.perf_counter() + seconds
            i = 0
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    break
                if size >= 128 * 1024:
                    cl.get_into(keys[i % KEYS], buf)
                else:
                    cl.get(keys[i % KEYS])
                lat.append(time.perf_counter() - t0)
                i += 1
            out.put((lat, None))
    except Exception as exc:  # reported by the parent
        out.put(([], f"{type(exc).__name__}: {exc}"))


def _writer(url: str, seconds: float, start: Any, out: Any) -> None:
    from memkv.client import SyncClient

    try:
        with SyncClient.connect(url, transport="tcp") as cl:
            value = bytes(64 * 1024)
            lat: list[float] = []
            start.wait()
            t_end = time.perf_counter() + seconds
            i = 0
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    break
                cl.put(b"w%d" % (i % 256), value, namespace="session")
                lat.append(time.perf_counter() - t0)
                i += 1
            out.put((lat, None))
    except Exception as exc:
        out.put(([], f"{type(exc).__name__}: {exc}"))


def measure(url: str, size: int, clients: int, writer: bool, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("fork")
    start, out, wout = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(url, size, seconds, start, out)) for _ in range(clients)]
    wproc = ctx.Process(target=_writer, args=(url, seconds, start, wout)) if writer else None
    for p in [*procs, *([wproc] if wproc else [])]:
        p.start()
    time.sleep(0.3)  # connected and warmed
    start.set()
    res = [out.get(timeout=seconds + 60) for _ in procs]
    wres = wout.get(timeout=seconds + 60) if wproc else ([], None)
    for p in [*procs, *([wproc] if wproc else [])]:
        p.join(30)
    errs = [e for _l, e in [*res, wres] if e]
    if errs:
        raise RuntimeError(errs[0])
    lat = [x for lst, _e in res for x in lst]
    n = len(lat)
    return {"ops_s": n / seconds, "gb_s": n * size / seconds / 1e9, "p50_us": _quantile(lat, 0.5) * 1e6,
            "p99_us": _quantile(lat, 0.99) * 1e6,
            **({"put_p50_us": _quantile(wres[0], 0.5) * 1e6, "put_p99_us": _quantile(wres[0], 0.99) * 1e6,
                "puts_s": len(wres[0]) / seconds} if writer else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4KiB,1MiB")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--writer", default="no,yes", help="with a concurrent PUT client: no,yes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", default="bench/results/hot_reads")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    clients = [int(x) for x in args.clients.split(",")]
    writers = [w == "yes" for w in args.writer.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {}
        for name in ("on", "off"):
            cfg = Path(tmp) / f"{name}.toml"
            cfg.write_text(f"[node]\ntcp_hot_reads = {'true' if name == 'on' else 'false'}\n")
            nodes[name] = MemkvNode(Path(tmp) / name, memory="1GiB", extra_args=("--config", str(cfg))).start()
        try:
            from memkv.client import SyncClient

            for node in nodes.values():
                with SyncClient.connect(node.url, transport="tcp") as cl:
                    for size in sizes:
                        for i in range(KEYS):
                            cl.put(b"r%d-%d" % (size, i), bytes([i % 251]) * size)
            cells: dict[tuple[int, int, bool, str], list[dict[str, float]]] = {}
            for r in range(args.repeats):
                for size in sizes:
                    for n in clients:
                        for w in writers:
                            for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                                got = measure(nodes[name].url, size, n, w, args.seconds)
                                cells.setdefault((size, n, w, name), []).append(got)
        finally:
            for node in nodes.values():
                node.stop()
    rows = []
    for (size, n, w, name), runs in sorted(cells.items()):
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        rows.append({"size": size, "clients": n, "writer": w, "hot_reads": name, **med, "runs": runs})
    doc = {"command": "python -m bench.hot_reads " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    (out_dir / "hot_reads.json").write_text(json.dumps(doc, indent=1))
    print(f"{'size':>6} {'cl':>3} {'writer':>6} | {'on p50':>8} {'off p50':>8} | {'on p99':>8} {'off p99':>8} | "
          f"{'on GB/s':>8} {'off GB/s':>8} | {'PUT p50 on/off (us)':>20}")
    by = {(r["size"], r["clients"], r["writer"], r["hot_reads"]): r for r in rows}
    for size in sizes:
        for n in clients:
            for w in writers:
                on, off = by[(size, n, w, "on")], by[(size, n, w, "off")]
                put = f"{on['put_p50_us']:.0f} / {off['put_p50_us']:.0f}" if w else ""
                wr = "yes" if w else "no"
                print(f"{fmt_size(size):>6} {n:>3} {wr:>6} | {on['p50_us']:8.0f} {off['p50_us']:8.0f} | "
                      f"{on['p99_us']:8.0f} {off['p99_us']:8.0f} | {on['gb_s']:8.2f} {off['gb_s']:8.2f} | {put:>20}")
    _plot(rows, out_dir / "hot_reads.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = sorted({(r["size"], r["clients"], r["writer"]) for r in rows})
    by = {(r["size"], r["clients"], r["writer"], r["hot_reads"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    xs = range(len(labels))
    names = [f"{fmt_size(s)} x{n}{' +PUT' if w else ''}" for s, n, w in labels]
    for ax, key in zip(axes, ("p50_us", "p99_us"), strict=True):
        ax.bar([x - 0.2 for x in xs], [by[(*lab, "on")][key] for lab in labels], 0.4, label="hot reads on")
        ax.bar([x + 0.2 for x in xs], [by[(*lab, "off")][key] for lab in labels], 0.4, label="off")
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
