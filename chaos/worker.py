"""Load and probe clients in a process of their own, so that a fault can be given to a client
alone (the fault shim's clock skew: :mod:`chaos.faultshim`). Every operation goes to stdout
as one JSON line, timed on the runner's time line (``--t0``, a monotonic instant).

    python -m chaos.worker load --url URL --t0 T --wid 10 --run-id skew1 [--rate 20 ...]
        # runs until stdin closes
    python -m chaos.worker put --url URL --t0 T --ns session --key K --tag TAG [--read-first]
        # one write (after a read of the key, with --read-first), then exits

:class:`ProcessWorker` starts one from the runner and feeds its ops into the runner's recorder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from chaos.history import Op, Recorder, crc
from chaos.load import LoadConfig, LoadGenerator, make_value
from memkv.client import SyncClient
from memkv.errors import MemKVError

ROOT = Path(__file__).resolve().parents[1]


def _emit(op: Op) -> None:
    sys.stdout.write(json.dumps(op.to_json(), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _load(args: argparse.Namespace) -> int:
    rec = Recorder(start=args.t0, sink=_emit)
    cfg = LoadConfig(workers=args.workers, rate=args.rate, value_size=args.value_size, timeout=args.timeout,
                     run_id=args.run_id)
    load = LoadGenerator(args.url, rec, cfg, first_wid=args.wid).start()
    sys.stdin.read()  # the runner closes our stdin to stop us
    load.stop()
    return 0


def _put(args: argparse.Namespace) -> int:
    rec = Recorder(start=args.t0, sink=_emit)
    value = make_value(args.key, args.tag, args.value_size)
    with SyncClient.connect(args.url, transport="tcp", timeout=args.timeout) as c:
        if args.read_first:
            t0 = rec.now()
            got = c.get(args.key, namespace=args.ns)
            rec.add(Op("get", args.key, t0, rec.now(), True, "miss" if got is None else "ok",
                       None if got is None else crc(got), args.ns, phase="probe", worker=args.wid))
        t0 = rec.now()
        try:
            c.put(args.key, value, namespace=args.ns)
            rec.add(Op("put", args.key, t0, rec.now(), True, "ok", crc(value), args.ns, phase="probe",
                       worker=args.wid))
        except (MemKVError, OSError) as exc:
            rec.add(Op("put", args.key, t0, rec.now(), False, "error", crc(value), args.ns, type(exc).__name__,
                       phase="probe", worker=args.wid))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.worker", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("load", "put"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True)
        s.add_argument("--t0", type=float, required=True, help="the runner's time origin (time.monotonic())")
        s.add_argument("--wid", type=int, default=100)
        s.add_argument("--timeout", type=float, default=1.5)
        s.add_argument("--value-size", type=int, default=1024)
    load = sub.choices["load"]
    load.add_argument("--run-id", required=True)
    load.add_argument("--workers", type=int, default=1)
    load.add_argument("--rate", type=float, default=20.0)
    put = sub.choices["put"]
    put.add_argument("--ns", required=True)
    put.add_argument("--key", required=True)
    put.add_argument("--tag", required=True)
    put.add_argument("--read-first", action="store_true")
    args = p.parse_args(argv)
    return _load(args) if args.cmd == "load" else _put(args)


class ProcessWorker:
    """A :mod:`chaos.worker` process whose ops land in ``rec`` (a reader thread parses them)."""

    def __init__(self, rec: Recorder, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.rec = rec
        self.ops: list[Op] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "chaos.worker", *args, "--t0", repr(rec.start)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=ROOT, env=dict(os.environ, **(env or {})), text=True)
        self.reader = threading.Thread(target=self._read, name="chaos-worker-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, TypeError):
                op = Op.from_json(json.loads(line))
                self.ops.append(op)
                self.rec.add(op)

    def stop(self, timeout: float = 30.0) -> str:
        """Close its stdin (a load worker stops), wait; returns its stderr tail."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        return (self.proc.stderr.read() if self.proc.stderr else "")[-2000:]

    def __enter__(self) -> ProcessWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
