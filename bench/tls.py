"""TLS cost benchmark: the same workload against one node over plain TCP and over TLS.

    python -m bench.tls [--quick] [--json FILE]

Two node processes (same settings; one with ``--tls-cert/--tls-key``, a
throwaway CA and certificate made with the ``openssl`` CLI). For each value
size, ``SyncClient(transport="tcp")`` runs PUTs then GETs (one in flight) for
a fixed time; reported: operations/s, MB/s and the TLS/plain ratio, plus the
cost of opening a connection (TCP connect vs TCP + TLS handshake). Both nodes
run on this machine, so the numbers include the node's and the client's CPU
for encryption on the same cores (a single-connection, latency-bound view).

Writes JSON (default bench/results/tls.json).
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

from bench.procs import free_port, popen_tied, stop_process, wait_for_tcp

KiB, MiB = 1024, 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "2", "-subj", "/CN=memkv bench CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def start_node(workdir: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = workdir / f"node-{port}.log"
    cmd = [sys.executable, "-m", "memkv.cli", "serve", "--listen", f"127.0.0.1:{port}", "--memory", "512MiB",
           *extra]
    proc = popen_tied(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for_tcp("127.0.0.1", port, proc, 20.0, log)
    return proc, port


def run_size(client: Any, size: int, seconds: float) -> dict[str, float]:
    value = os.urandom(size)
    keys = [f"tls-{size}-{i}".encode() for i in range(max(1, min(256, (64 * MiB) // size)))]
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        client.put(keys[n % len(keys)], value)
        n += 1
    put_s = time.perf_counter() - t0
    puts = n
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        got = client.get(keys[n % min(len(keys), puts)])
        assert got is not None and len(got) == size
        n += 1
    get_s = time.perf_counter() - t0
    return {"put_ops": puts / put_s, "put_MBps": puts * size / put_s / 1e6,
            "get_ops": n / get_s, "get_MBps": n * size / get_s / 1e6}


def connect_cost(url: str, tls: Any, rounds: int) -> float:
    from memkv.client import SyncClient

    t0 = time.perf_counter()
    for _ in range(rounds):
        SyncClient.connect(url, transport="tcp", tls=tls).close()
    return (time.perf_counter() - t0) / rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (CI smoke)")
    ap.add_argument("--json", default=str(RESULTS / "tls.json"))
    args = ap.parse_args(argv)
    from memkv.client import SyncClient

    sizes = [1 * KiB, 64 * KiB, 1 * MiB, 4 * MiB] if not args.quick else [1 * KiB, 1 * MiB]
    seconds = 0.5 if args.quick else 2.0
    results: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "seconds_per_point": seconds, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="memkv-tls-bench-") as tmp:
        d = Path(tmp)
        ca, cert, key = make_certs(d)
        plain, pport = start_node(d, [])
        secure, sport = start_node(d, ["--tls-cert", str(cert), "--tls-key", str(key)])
        try:
            purl, surl = f"memkv://127.0.0.1:{pport}", f"memkvs://127.0.0.1:{sport}"
            results["connect_s"] = {"plain": connect_cost(purl, None, 20), "tls": connect_cost(surl, str(ca), 20)}
            with SyncClient.connect(purl, transport="tcp") as pc, \
                    SyncClient.connect(surl, transport="tcp", tls=str(ca)) as sc:
                for size in sizes:
                    p = run_size(pc, size, seconds)
                    s = run_size(sc, size, seconds)
                    row = {"plain": p, "tls": s,
                           "tls_over_plain": {k: round(s[k] / p[k], 3) for k in p}}
                    results["sizes"][str(size)] = row
                    print(f"{size:>9} B  plain get {p['get_MBps']:8.1f} MB/s put {p['put_MBps']:8.1f} MB/s | "
                          f"TLS get {s['get_MBps']:8.1f} MB/s put {s['put_MBps']:8.1f} MB/s | "
                          f"ratio get {row['tls_over_plain']['get_MBps']:.2f} "
                          f"put {row['tls_over_plain']['put_MBps']:.2f}",
                          flush=True)
            print(f"connect: plain {results['connect_s']['plain'] * 1e3:.2f} ms, "
                  f"TLS {results['connect_s']['tls'] * 1e3:.2f} ms")
        finally:
            stop_process(plain)
            stop_process(secure)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
