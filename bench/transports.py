"""Transport benchmark: shared-memory and TCP GET throughput vs the cold memcpy limit; RDMA under emulation.

    python -m bench.transports [--quick] [--rdma-only] [--json FILE] [--png FILE]

* memcpy limit: copying values of each size out of a buffer much larger than
  the CPU caches (round robin over ``--working-set`` bytes) into one
  destination: what any one-sided reader on this machine can do at best.
* shm: ``SyncClient(transport="shm").get_into`` (one LOCATE round trip, one
  memcpy from the node's region mapped read-only, checksum verification) and
  ``get_many_into`` in batches of 8 (one LOCATE per batch), same working set.
* tcp: the same calls with ``transport="tcp"``.
* rdma: where pyverbs and an RDMA device exist (the Soft-RoCE VM of
  ``make test-rdma``), correctness (every byte verified) and throughput of
  ``transport="rdma"`` — labelled emulation when the device is rdma_rxe: a
  software RoCE in a TCG-emulated VM says nothing about NIC speed.

Writes JSON (default bench/results/transports.json) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp

KiB, MiB = 1024, 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"


def start_node(memory: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = workdir / "node.log"
    proc = popen_tied(
        [
            sys.executable,
            "-m",
            "memkv.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--memory",
            memory,
            "--data-dir",
            str(workdir / "data"),
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for_tcp("127.0.0.1", port, proc, 30.0, log)
    return proc, f"memkv://127.0.0.1:{port}"


def memcpy_limit(size: int, working_set: int, seconds: float) -> float:
    """GB/s of copying ``size``-byte slices, round robin over a ``working_set`` source (cold)."""
    n = max(2, working_set // size)
    src = np.random.default_rng(1).integers(0, 255, n * size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    done = 0
    i = 0
    t0 = time.perf_counter()
    while True:
        off = (i % n) * size
        np.copyto(dst, src[off : off + size])
        done += size
        i += 1
        if i % 8 == 0 and time.perf_counter() - t0 >= seconds:
            break
    return done / (time.perf_counter() - t0) / 1e9


def prepare(url: str, size: int, working_set: int, batch: int, verify: bool) -> dict[bytes, bytes]:
    """Put the working set once (re-putting the same bytes later is a no-op on the node)."""
    from memkv.client import SyncClient

    n = max(batch * 2, working_set // size)
    vals: dict[bytes, bytes] = {}
    with SyncClient.connect(url, transport="tcp") as c:
        for i in range(n):
            k = f"v{size}-{i}".encode()
            vals[k] = os.urandom(size) if verify else (k * (size // len(k) + 1))[:size]
            c.put(k, vals[k])
    return vals


def cleanup(url: str, vals: dict[bytes, bytes]) -> None:
    from memkv.client import SyncClient

    with SyncClient.connect(url, transport="tcp") as c:
        for k in vals:
            c.delete(k)
    time.sleep(2.2)  # freed extents that were located sit in quarantine for 2 s


def client_gets(
    url: str, transport: str, vals: dict[bytes, bytes], size: int, seconds: float, batch: int = 1, verify: bool = False
) -> dict[str, Any]:
    from memkv.client import SyncClient

    keys = list(vals)
    n = len(keys)
    with SyncClient.connect(url, transport=transport) as c:
        bufs = [bytearray(size) for _ in range(batch)]
        done = 0
        i = 0
        calls = 0
        bad = 0
        t0 = time.perf_counter()
        while True:
            if batch == 1:
                k = keys[i % n]
                got = c.get_into(k, bufs[0])
                assert got == size
                if verify and bytes(bufs[0]) != vals[k]:
                    bad += 1
                i += 1
            else:
                ks = [keys[(i + j) % n] for j in range(batch)]
                got = c.get_many_into(ks, bufs)
                assert got == [size] * batch
                if verify:
                    bad += sum(bytes(b) != vals[k] for b, k in zip(bufs, ks, strict=True))
                i += batch
            done += size * batch
            calls += 1
            if time.perf_counter() - t0 >= seconds:
                break
        dt = time.perf_counter() - t0
        counters = dict(c.onesided.counters) if c.onesided is not None else {}
        used = c.onesided.transport_of(c.router.replicas(b"x")[0]) if c.onesided is not None else "tcp"
    return {
        "transport": transport,
        "carried_by": used,
        "size": size,
        "batch": batch,
        "GBps": done / dt / 1e9,
        "calls_per_s": calls / dt,
        "values": i,
        "seconds": dt,
        "verified_bad": bad if verify else None,
        "counters": counters,
    }


def rdma_section(url: str, quick: bool) -> dict[str, Any]:
    from memkv.transport import rdma_devices

    devs = rdma_devices()
    if not devs:
        return {"available": False, "reason": "no pyverbs or no RDMA device on this machine"}
    dev = os.environ.get("MEMKV_RDMA_DEVICE") or devs[0]
    emulated = dev.startswith("rxe") or os.path.exists(f"/sys/class/infiniband/{dev}/parent") is False
    label = (
        "EMULATION: Soft-RoCE (rdma_rxe) in a TCG-emulated qemu VM; correctness, not NIC speed"
        if dev.startswith("rxe")
        else f"device {dev}"
    )
    rows = []
    for size in [64 * KiB, 1 * MiB] if quick else [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB]:
        vals = prepare(url, size, 2 * MiB if quick else 8 * MiB, 8, verify=True)  # emulation is slow
        for batch in (1, 8):
            r = client_gets(url, "rdma", vals, size, seconds=1.0 if quick else 2.0, batch=batch, verify=True)
            rows.append(r)
            print(
                f"rdma {size // KiB:>6} KiB batch {batch}: {r['GBps'] * 1000:8.1f} MB/s "
                f"carried_by={r['carried_by']} bad={r['verified_bad']}",
                flush=True,
            )
    ok = all(r["carried_by"] == "rdma" and r["verified_bad"] == 0 and r["counters"].get("tcp", 1) == 0 for r in rows)
    return {
        "available": True,
        "device": dev,
        "emulated": emulated or dev.startswith("rxe"),
        "label": label,
        "correct": ok,
        "rows": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = result.get("rows", [])
    sizes = sorted({r["size"] for r in rows})
    if sizes:
        ax.plot(
            [s / KiB for s in sizes], [result["memcpy_GBps"][str(s)] for s in sizes], "k--", label="cold memcpy limit"
        )
        for transport, batch, style in (("shm", 1, "o-"), ("shm", 8, "s-"), ("tcp", 1, "^-"), ("tcp", 8, "v-")):
            pts = [(r["size"] / KiB, r["GBps"]) for r in rows if r["transport"] == transport and r["batch"] == batch]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    label=f"{transport} get{'_many' if batch > 1 else ''}_into" + (f" x{batch}" if batch > 1 else ""),
                )
    rd = result.get("rdma") or {}
    if rd.get("available"):
        pts = [(r["size"] / KiB, r["GBps"]) for r in rd["rows"] if r["batch"] == 8]
        ax.plot(*zip(*pts, strict=True), "x:", label="rdma x8 (" + ("EMULATION" if rd["emulated"] else "hw") + ")")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("value size (KiB)")
    ax.set_ylabel("GB/s (one client)")
    ax.set_title("memkv GET throughput by transport")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rdma-only", action="store_true", help="only the RDMA section (the Soft-RoCE VM)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--working-set", type=int, default=64 * MiB)
    args = ap.parse_args(argv)
    seconds = 0.6 if args.quick else 2.0
    sizes = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB] if not args.quick else [64 * KiB, 1 * MiB, 4 * MiB]
    result: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "working_set": args.working_set,
        "note": "one client thread; shm/tcp rows include the LOCATE/GET round trip and "
        "checksum verification; memcpy = numpy copy from a cold working set",
    }
    memory = f"{max(512, 4 * args.working_set // MiB + 128)}MiB"
    with tempfile.TemporaryDirectory(prefix="memkv-bench-tr-") as tmp:
        proc, url = start_node(memory if not args.rdma_only else "64MiB", Path(tmp))
        try:
            if not args.rdma_only:
                result["memcpy_GBps"] = {str(s): memcpy_limit(s, args.working_set, seconds) for s in sizes}
                rows = []
                for s in sizes:
                    vals = prepare(url, s, max(args.working_set, 16 * s), 8, verify=False)
                    for transport in ("shm", "tcp"):
                        for batch in (1, 8):
                            r = client_gets(url, transport, vals, s, seconds, batch=batch)
                            r["vs_memcpy"] = r["GBps"] / result["memcpy_GBps"][str(s)]
                            rows.append(r)
                            print(
                                f"{transport} {s // KiB:>6} KiB batch {batch}: {r['GBps']:6.2f} GB/s "
                                f"({100 * r['vs_memcpy']:5.1f}% of cold memcpy "
                                f"{result['memcpy_GBps'][str(s)]:.2f} GB/s) via {r['carried_by']}",
                                flush=True,
                            )
                    cleanup(url, vals)
                result["rows"] = rows
                summary = {}
                for s in sizes:
                    shm = next(r for r in rows if r["transport"] == "shm" and r["size"] == s and r["batch"] == 1)
                    tcp = next(r for r in rows if r["transport"] == "tcp" and r["size"] == s and r["batch"] == 1)
                    summary[str(s)] = {
                        "shm_vs_memcpy": round(shm["vs_memcpy"], 3),
                        "shm_vs_tcp": round(shm["GBps"] / tcp["GBps"], 2),
                    }
                result["summary"] = summary
                result["target_met_1_4MiB"] = all(
                    summary[str(s)]["shm_vs_memcpy"] >= 0.5 for s in (1 * MiB, 4 * MiB) if str(s) in summary
                )
            result["rdma"] = rdma_section(url, args.quick or args.rdma_only)
        finally:
            stop_process(proc)
    out = args.json or RESULTS / ("transports-rdma.json" if args.rdma_only else "transports.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not args.rdma_only:
        png = args.png or out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
    if result.get("rdma", {}).get("available") and not result["rdma"]["correct"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
