"""memkv load generator for the compose deployment (and, later, the chaos suite).

Writes and reads continuously through ``memkv.client.SyncClient`` against a cluster
URL (``etcd://etcd:2379/NAME``), verifies every value it reads, logs a summary line
every few seconds, and can record every operation to a JSON-lines history file:

    {"t0": ..., "t1": ..., "op": "put"|"get", "key": "...", "crc": <crc32 of the value>,
     "acked": true|false, "result": "ok"|"miss"|"corrupt"|"error", "error": "..."}

``acked`` is true when the cluster acknowledged the write (put) or answered (get).
Values are a pure function of the key, so a read of bytes that were never written
for that key is detected without remembering the bytes ("corrupt").

Environment (flags win): MEMKV_URL, MEMKV_LOADGEN_NAMESPACE, MEMKV_LOADGEN_RATE,
MEMKV_LOADGEN_VALUE_SIZE, MEMKV_LOADGEN_READ_RATIO, MEMKV_LOADGEN_HISTORY,
MEMKV_LOADGEN_DURATION, MEMKV_LOADGEN_REPORT_EVERY.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time
import zlib

from memkv.client import SyncClient
from memkv.errors import MemKVError
from memkv.sizes import parse_size


def value_for(key: str, size: int) -> bytes:
    seed = hashlib.blake2b(key.encode(), digest_size=64).digest()
    return (seed * (size // len(seed) + 1))[:size]


def log(msg: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S") + " loadgen: " + msg, flush=True)


def connect(url: str, timeout: float, stop: list[bool]) -> SyncClient:
    delay = 0.5
    while not stop[0]:
        try:
            return SyncClient.connect(url, transport="tcp", timeout=timeout)
        except (MemKVError, OSError) as exc:
            log(f"connect {url} failed ({type(exc).__name__}: {exc}); retrying in {delay:.1f}s")
            time.sleep(delay)
            delay = min(5.0, delay * 2)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=env("MEMKV_URL", "etcd://etcd:2379/memkv"))
    p.add_argument("--namespace", default=env("MEMKV_LOADGEN_NAMESPACE", "blocks"))
    p.add_argument("--rate", type=float, default=float(env("MEMKV_LOADGEN_RATE", "20")),
                   help="operations per second (puts + gets); 0 = as fast as possible")
    p.add_argument("--value-size", default=env("MEMKV_LOADGEN_VALUE_SIZE", "4KiB"))
    p.add_argument("--read-ratio", type=float, default=float(env("MEMKV_LOADGEN_READ_RATIO", "0.5")))
    p.add_argument("--history", default=env("MEMKV_LOADGEN_HISTORY", ""), help="JSON-lines file of every op")
    p.add_argument("--duration", type=float, default=float(env("MEMKV_LOADGEN_DURATION", "0")),
                   help="seconds; 0 = until SIGTERM")
    p.add_argument("--report-every", type=float, default=float(env("MEMKV_LOADGEN_REPORT_EVERY", "5")))
    p.add_argument("--timeout", type=float, default=5.0, help="per-operation client timeout")
    args = p.parse_args(argv)

    size = parse_size(args.value_size)
    run = f"{os.uname().nodename}-{int(time.time())}-{random.randrange(1 << 16):04x}"
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    history = open(args.history, "a", buffering=1) if args.history else None
    log(f"run {run}: {args.url} namespace={args.namespace} rate={args.rate}/s value={size}B "
        f"read_ratio={args.read_ratio} history={args.history or '-'}")
    client = connect(args.url, args.timeout, stop)
    log("connected")

    acked: list[str] = []  # keys whose put was acknowledged
    counts = {k: 0 for k in ("put_ok", "put_err", "get_ok", "get_miss", "get_corrupt", "get_err")}
    seq = 0
    started = last_report = time.monotonic()
    next_at = started
    try:
        while not stop[0]:
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            if args.rate > 0:
                if now < next_at:
                    time.sleep(min(next_at - now, 0.5))
                    continue
                next_at = max(next_at + 1.0 / args.rate, now - 1.0)
            rec: dict[str, object]
            t0 = time.time()
            if acked and random.random() < args.read_ratio:
                key = random.choice(acked[-10000:])
                rec = {"op": "get", "key": key}
                try:
                    got = client.get(key, namespace=args.namespace)
                    rec["acked"] = True
                    if got is None:
                        rec["result"] = "miss"
                        counts["get_miss"] += 1
                    else:
                        rec["crc"] = zlib.crc32(got)
                        ok = bytes(got) == value_for(key, size)
                        rec["result"] = "ok" if ok else "corrupt"
                        counts["get_ok" if ok else "get_corrupt"] += 1
                        if not ok:
                            log(f"CORRUPT read of {key}: {len(got)} bytes, crc {rec['crc']}")
                except (MemKVError, OSError) as exc:
                    rec.update(acked=False, result="error", error=f"{type(exc).__name__}: {exc}")
                    counts["get_err"] += 1
            else:
                seq += 1
                key = f"lg/{run}/{seq}"
                value = value_for(key, size)
                rec = {"op": "put", "key": key, "crc": zlib.crc32(value)}
                try:
                    client.put(key, value, namespace=args.namespace)
                    rec.update(acked=True, result="ok")
                    acked.append(key)
                    counts["put_ok"] += 1
                except (MemKVError, OSError) as exc:
                    rec.update(acked=False, result="error", error=f"{type(exc).__name__}: {exc}")
                    counts["put_err"] += 1
            if history is not None:
                rec["t0"], rec["t1"] = round(t0, 6), round(time.time(), 6)
                history.write(json.dumps(rec, separators=(",", ":")) + "\n")
            if rec.get("result") == "error" and counts["put_err"] + counts["get_err"] <= 20:
                log(f"{rec['op']} {rec['key']}: {rec['error']}")
            now = time.monotonic()
            if now - last_report >= args.report_every:
                elapsed = now - started
                done = sum(counts.values())
                log(f"{elapsed:7.1f}s ops={done} ({done / elapsed:.1f}/s) " +
                    " ".join(f"{k}={v}" for k, v in counts.items()))
                last_report = now
    finally:
        client.close()
        if history is not None:
            history.close()
        log("stopped: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    bad = counts["get_corrupt"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
