"""``python -m chaos``: list | run SCENARIO... | all [--fast] | soak --seed S --minutes M | check HISTORY.jsonl

    python -m chaos list
    python -m chaos run kill9 --set lease_ttl=3 --set victim=n1
    python -m chaos run pause_zombie etcd_partition --target local
    python -m chaos all                     # every scenario, JSON report under chaos/results/
    python -m chaos all --target compose    # against the compose deployment: builds the images
                                            # (compose/build-offline.sh), a fresh deployment per
                                            # scenario, torn down at the end (--keep-deployment)
    python -m chaos soak --seed 7 --minutes 60  # random overlapping faults under load (chaos/soak.py)
    python -m chaos check chaos/results/kill9-local-...history.jsonl

Local runs re-execute themselves in a private network namespace (``unshare -n``, only
``lo``) when run as root, so the partition scenarios' iptables rules never touch the
host; ``--no-netns`` turns that off (partition scenarios are then skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chaos.report import markdown_table, print_table
from chaos.runner import parse_value, run_scenario, write_report
from chaos.scenarios import SCENARIOS
from chaos.targets import ComposeDeployment, ComposeTarget
from memkv.tools.children import popen_tied

RESULTS = Path(__file__).resolve().parent / "results"


def _reexec_in_netns(argv: list[str]) -> int | None:
    if os.environ.get("MEMKV_CHAOS_NETNS") == "1" or os.geteuid() != 0:
        return None
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("iptables")):
        return None
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    env = dict(os.environ, MEMKV_CHAOS_NETNS="1")
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "chaos", *argv]
    child = popen_tied(cmd, env=env)  # the runner dies with this process (its nodes with it)
    # SIGTERM / SIGHUP to this process go on to the runner in the namespace (``unshare`` execs it),
    # which then stops its nodes (``subprocess.call`` would SIGKILL it and orphan them). Ctrl-C reaches
    # the runner by itself (same process group): forwarding it too would interrupt its cleanup.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return child.wait()


def _unwind_on_signals() -> None:
    """SIGTERM / SIGHUP unwind the runner like Ctrl-C does, so every scenario's ``finally`` stops
    its nodes, etcd and load (with the default action a killed runner left its nodes running)."""
    def unwind(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, unwind)


def _soak(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from chaos.report import print_soak
    from chaos.soak import Soak

    results = Path(args.results)
    r = Soak(args.seed, args.minutes, overrides=overrides, results_dir=results, keep=args.keep,
             log=lambda m: print(m, file=sys.stderr, flush=True)).run()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"soak-{args.seed}-local-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(r, indent=2, default=str))
    print_soak(r)
    print(f"report: {path}")
    return 0 if r["status"] == "passed" else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the scenarios")
    for name in ("run", "all"):
        s = sub.add_parser(name)
        if name == "run":
            s.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS), metavar="SCENARIO")
        else:
            s.add_argument("--fast", action="store_true", help="only the fast subset (what make test runs)")
        s.add_argument("--target", choices=("local", "compose"), default="local")
        s.add_argument("--set", action="append", default=[], metavar="K=V", help="scenario parameter")
        s.add_argument("--results", default=str(RESULTS), help="where the JSON report goes")
        s.add_argument("--keep", action="store_true", help="keep node data dirs and logs")
        s.add_argument("--no-netns", action="store_true", help="do not re-execute in a private network namespace")
        s.add_argument("--markdown", action="store_true", help="also print the Markdown table (README)")
        s.add_argument("--keep-deployment", action="store_true",
                       help="compose: leave the last scenario's deployment up (default: down -v at the end)")
        s.add_argument("--no-build", action="store_true",
                       help="compose: use the images as built (skip compose/build-offline.sh; dockerd must run)")
    k = sub.add_parser("soak", help="random combinations of faults under load (chaos/soak.py)")
    k.add_argument("--seed", type=int, required=True)
    k.add_argument("--minutes", type=float, required=True)
    k.add_argument("--set", action="append", default=[], metavar="K=V", help="soak parameter (chaos.soak.DEFAULTS)")
    k.add_argument("--results", default=str(RESULTS))
    k.add_argument("--keep", action="store_true")
    k.add_argument("--no-netns", action="store_true")
    k.add_argument("--plan", action="store_true", help="print the fault schedule of this seed and exit")
    c = sub.add_parser("check", help="run the checker over a recorded history")
    c.add_argument("history")
    c.add_argument("--read-bound", type=float, default=10.0)
    args = p.parse_args(argv)

    if args.cmd == "list":
        for sc in SCENARIOS.values():
            tags = ",".join((["fast"] if sc.fast else []) + list(sc.needs))
            print(f"{sc.name:30s} {('[' + tags + ']') if tags else '':24s} {sc.doc}")
        return 0
    if args.cmd == "check":
        from chaos.checker import check
        from chaos.history import History

        v = check(History.load(args.history), read_bound_s=args.read_bound)
        print(json.dumps({"passed": v.passed, "violations": v.violations, "metrics": v.metrics}, indent=2))
        return 0 if v.passed else 1

    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k.strip()] = parse_value(v.strip())
    if args.cmd == "soak" and args.plan:
        from chaos.soak import DEFAULTS, plan

        p = dict(DEFAULTS, **overrides)
        for f in plan(args.seed, args.minutes * 60, nodes=[f"n{i + 1}" for i in range(int(p["nodes"]))],
                      members=int(p["etcd_members"]), gap_s=float(p["gap_s"]), max_overlap=int(p["max_overlap"]),
                      kinds=[x for x in str(p["kinds"]).split(",") if x], cover=bool(p["cover"])):
            print(f"{f.at:8.1f}s {f.duration:5.1f}s  {f.label}")
        return 0
    if getattr(args, "target", "local") == "local" and not args.no_netns:
        rc = _reexec_in_netns(argv)
        if rc is not None:
            return rc
    _unwind_on_signals()
    if args.cmd == "soak":
        return _soak(args, overrides)
    names = args.scenarios if args.cmd == "run" else [n for n, s in SCENARIOS.items() if s.fast or not args.fast]
    results = []
    t0 = time.monotonic()
    deployment = None
    if args.target == "compose":
        deployment = ComposeTarget.deployment = ComposeDeployment(build=not args.no_build, keep=args.keep_deployment)
        try:
            deployment.prepare()
        except Exception as exc:  # noqa: BLE001 - no image, no scenario
            print(f"compose: could not build the images / reach docker: {exc}", file=sys.stderr)
            return 1
    try:
        for name in names:
            r = run_scenario(name, target=args.target, overrides=overrides, results_dir=Path(args.results),
                             keep=args.keep, log=lambda m: print(m, file=sys.stderr, flush=True))
            results.append(r)
            print(f"[{name}] {r['status']}" + (f": {r.get('reason')}" if r.get("reason") else "")
                  + "".join(f"\n    violation: {v}" for v in r.get("violations", [])), file=sys.stderr, flush=True)
    finally:
        if deployment is not None:
            deployment.teardown()
    timing = {"total_s": round(time.monotonic() - t0, 1)}
    if deployment is not None:
        timing.update(build_s=deployment.build_s, deployment_up_s=deployment.up_s)
    path = write_report(results, Path(args.results), args.target, timing)
    print_table(results, title=f"memkv chaos ({args.target}) — {path.name}")
    if args.markdown:
        print(markdown_table(results))
    print(f"report: {path} ({timing['total_s']:.0f} s"
          + (f", image build {deployment.build_s:.0f} s" if deployment is not None and deployment.build_s else "")
          + ")")
    return 1 if any(r["status"] in ("failed", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
