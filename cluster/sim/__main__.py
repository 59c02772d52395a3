"""``python -m memkv.cluster.sim``: run, replay and sweep control-plane simulations.

    python -m memkv.cluster.sim run SEED [--trace]       one scenario (the replay command of a failure)
    python -m memkv.cluster.sim many [--start 0] [--count 1000]   many seeds; prints failures, exits 1 if any
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from memkv.cluster.sim.world import run_seed


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --trace | head` ends quietly
    ap = argparse.ArgumentParser(prog="python -m memkv.cluster.sim", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (replay) one seed")
    r.add_argument("seed", type=int)
    r.add_argument("--trace", action="store_true", help="print the whole trace")
    m = sub.add_parser("many", help="run many seeds")
    m.add_argument("--start", type=int, default=0)
    m.add_argument("--count", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        res = run_seed(args.seed)
        print(res.report(trace_lines=None if args.trace else 0))
        return 0 if res.ok else 1
    t0 = time.perf_counter()
    failed = []
    for seed in range(args.start, args.start + args.count):
        res = run_seed(seed)
        if not res.ok:
            failed.append(seed)
            print(res.report(trace_lines=0), flush=True)
    dt = time.perf_counter() - t0
    print(f"{args.count} seeds ({args.start}..{args.start + args.count - 1}) in {dt:.1f}s "
          f"({args.count / dt:.0f}/s): {len(failed)} failed {failed[:50]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
