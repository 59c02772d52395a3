"""``python -m chaos soak --seed S --minutes M``: random, overlapping faults under load for M
minutes, then the checker over the whole history (Jepsen's combined nemesis schedules).

The schedule is a pure function of the seed and the parameters (:func:`plan`): fault starts
spaced by random gaps, each fault drawn from the catalogue below with random parameters and
duration, never two faults on one resource (one process, one link set, one clock ...) at the
same time, and at most ``max_overlap`` faults active at once. Running it (:class:`Soak`)
injects each planned fault on its own thread at its planned time and heals it after its
duration; the actual times go into the history as fault/heal events with the fault's id.

What is checked over the whole history (:func:`chaos.checker.check`):
- every acknowledged durable write survives (final reads of every key written);
- no read ever returns bytes never written for its key; no zombie write;
- no resurrected delete (the load deletes 10 % of its writes; ``--set deletes=F`` changes it);
- no stale read in a quiet window (no fault active for ``settle_s`` and the slot map
  converged), and reads never unavailable there for longer than the failover bound;
- availability (share of reads / writes acknowledged) overall, under faults and in quiet
  windows, and the longest unavailability windows, are reported.

The catalogue (kinds; ``--set kinds=a,b`` restricts it): kill9, pause, restart, oom,
partition_etcd, partition_clients, net_clients, net_nodes, net_etcd, clock_skew,
slow_fsync, client_skew, etcd_member, etcd_outage.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.checker import check, losses_with_impaired_replica, unavailability
from chaos.history import Op, Recorder
from chaos.load import DELETES, LoadConfig, LoadGenerator
from chaos.netfault import CLIENTS, ETCD, links
from chaos.runner import Sampler, make_target, wind_down
from chaos.targets import Unsupported
from chaos.worker import ProcessWorker

DEFAULTS: dict[str, Any] = {
    "nodes": 3, "replicas": 2, "lease_ttl": 2, "etcd_members": 3, "timeout": 1.5, "rate": 30.0, "workers": 2,
    "value_size": 1024, "deletes": DELETES, "warmup_s": 3.0, "gap_s": 6.0, "max_overlap": 2, "settle_s": 5.0,
    "converge_timeout_s": 180.0, "kinds": "", "converge_every_s": 0.5, "anti_entropy_interval": 30.0,
    # true: losses of writes made while a replica of their slot was impaired are reported apart and not
    # failed on (chaos.checker.losses_with_impaired_replica) -- the gap of writes acknowledged on fewer
    # than R copies, closed by acks = "all" (docs/chaos.md finding 2); kept to compare with older runs
    "known_single_copy": False,
    "cover": True,  # every fault kind once first (chaos.soak.plan); false: the schedule of soaks before it
}

# kind -> (weight, duration range in s). Durations are the time the fault stays injected.
CATALOGUE: dict[str, tuple[float, tuple[float, float]]] = {
    "kill9": (3, (1.0, 8.0)),
    "pause": (2, (1.0, 7.0)),
    "restart": (1, (0.5, 3.0)),
    "oom": (1, (0.0, 0.0)),
    "partition_etcd": (1.5, (2.0, 8.0)),
    "partition_clients": (1.5, (2.0, 8.0)),
    "net_clients": (2, (4.0, 15.0)),
    "net_nodes": (1.5, (4.0, 15.0)),
    "net_etcd": (1.5, (4.0, 15.0)),
    "clock_skew": (2, (5.0, 20.0)),
    "slow_fsync": (2, (4.0, 15.0)),
    "client_skew": (1, (5.0, 15.0)),
    "etcd_member": (1.5, (3.0, 10.0)),
    "etcd_outage": (0.5, (2.0, 6.0)),
}
NODE_KINDS = {"kill9", "pause", "restart", "oom", "partition_etcd", "partition_clients", "net_clients", "net_etcd",
              "clock_skew", "slow_fsync"}
# faults after which a client may skip a replica of a write (it times out, is unreachable or fenced):
# the node kinds that touch the node's process, its disk or its network; etcd faults fence every node
SKIPS_TARGET = NODE_KINDS - {"clock_skew"}
SKIPS_ALL = {"etcd_outage", "etcd_member"}


@dataclass
class Planned:
    fid: int
    at: float          # seconds after the soak's faults begin
    kind: str
    target: str        # a node id, an etcd member ("e1"), or "" (cluster-wide)
    duration: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"[f{self.fid}] {self.kind} {self.target}".rstrip() + (f" ({extra})" if extra else "")


def resources(kind: str, target: str, nodes: list[str], members: int) -> set[str]:
    """What a fault occupies; two faults sharing a resource never overlap."""
    if kind in ("kill9", "pause", "restart"):
        return {f"proc:{target}"}
    if kind == "oom":
        return {f"proc:{target}", f"mem:{target}"}
    if kind == "etcd_outage":
        return {f"etcd:e{i}" for i in range(members)} | {f"part-etcd:{n}" for n in nodes}
    if kind == "etcd_member":
        return {f"etcd:{target}"}
    if kind == "net_nodes":
        return {"net:nodes"}
    if kind == "client_skew":
        return {"client-skew"}
    return {f"{kind}:{target}"}


def _params(kind: str, rnd: random.Random) -> dict[str, Any]:
    if kind in ("net_clients", "net_nodes", "net_etcd"):
        return {"delay_ms": rnd.choice([10, 40, 100, 250]), "jitter_ms": rnd.choice([0, 10, 50, 100]),
                "loss": rnd.choice([0.0, 0.01, 0.05, 0.1]), "reorder": rnd.choice([0.0, 0.1, 0.3])}
    if kind == "clock_skew":
        return {"seconds": rnd.choice([-420, -240, -90, 90, 240, 420])}
    if kind == "client_skew":
        return {"seconds": rnd.choice([90, 240, 420])}
    if kind == "slow_fsync":
        return {"ms": rnd.choice([50, 200, 500, 2000])}
    return {}


def plan(seed: int, seconds: float, *, nodes: list[str], members: int, gap_s: float = 6.0, max_overlap: int = 2,
         kinds: list[str] | None = None, cover: bool = True) -> list[Planned]:
    """The fault schedule: a pure function of its arguments (so a seed names a soak). With
    ``cover`` every kind of the catalogue comes once first (in a seeded order), so that even a
    short soak injects each fault; then kinds are drawn by weight."""
    rnd = random.Random(seed)
    names = [k for k in CATALOGUE if not kinds or k in kinds]
    if members < 3:
        names = [k for k in names if k != "etcd_member"]
    weights = [CATALOGUE[k][0] for k in names]
    first = rnd.sample(names, len(names)) if cover else []
    out: list[Planned] = []
    busy: list[tuple[float, float, set[str]]] = []  # (start, planned end + margin, resources)
    t = rnd.uniform(0, gap_s)
    while t < seconds and names:
        kind = first[0] if first else rnd.choices(names, weights)[0]
        lo, hi = CATALOGUE[kind][1]
        duration = round(rnd.uniform(lo, hi), 1)
        if kind in NODE_KINDS:
            target = rnd.choice(nodes)
        elif kind == "etcd_member":
            target = f"e{rnd.randrange(members)}"
        else:
            target = ""
        res = resources(kind, target, nodes, members)
        # a restarted process needs a while before it is itself again: keep its resources a bit longer
        end = t + duration + 10.0
        active = [b for b in busy if b[0] <= t < b[1]]
        if len(active) < max_overlap and not any(res & b[2] for b in active) and t + duration < seconds:
            out.append(Planned(len(out) + 1, round(t, 1), kind, target, duration, _params(kind, rnd)))
            busy.append((t, end, res))
            if first:
                first.pop(0)
        t += rnd.expovariate(1.0 / gap_s)
    return out


class Soak:
    """One soak run: cluster, load, the planned faults, final heal, verification, verdict."""

    def __init__(self, seed: int, minutes: float, *, target: str = "local", overrides: dict[str, Any] | None = None,
                 results_dir: Path | None = None, keep: bool = False, log: Any = print) -> None:
        self.seed = seed
        self.minutes = minutes
        self.target_kind = target
        self.p = dict(DEFAULTS, **(overrides or {}), seed=seed)
        self.p.setdefault("read_bound_s", float(self.p["lease_ttl"]) + 2 * float(self.p["timeout"]) + 3.0)
        self.results_dir = results_dir
        self.keep = keep
        self.log = log
        self.rec = Recorder()
        self.t: Any = None
        self.errors: list[str] = []
        self.active: dict[int, tuple[float, Planned]] = {}
        self.intervals: list[tuple[float, float, Planned]] = []  # (start, end, fault) as injected
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}

    # -- one fault
    def _inject(self, f: Planned) -> Any:
        t, p, n = self.t, f.params, f.target
        k = f.kind
        if k == "kill9":
            t.kill(n)
        elif k == "pause":
            t.pause(n)
        elif k == "restart":
            t.stop(n)
        elif k == "oom":
            return self._oom(n)
        elif k == "partition_etcd":
            return t.partition_etcd(n)
        elif k == "partition_clients":
            return t.partition_clients(n)
        elif k == "net_clients":
            return t.net_impair(links(CLIENTS, n), **p)
        elif k == "net_nodes":
            ids = sorted(t.nodes)
            return t.net_impair(links(ids, ids, both=False), **p)
        elif k == "net_etcd":
            return t.net_impair(links(n, ETCD), **p)
        elif k == "clock_skew":
            t.clock_skew(n, p["seconds"])
        elif k == "slow_fsync":
            t.slow_fsync(n, p["ms"])
        elif k == "client_skew":
            env, clock = t.client_faults(f"soak-f{f.fid}")
            clock.skew(p["seconds"])
            return ProcessWorker(self.rec, ["load", "--url", t.url, "--timeout", str(self.p["timeout"]),
                                            "--value-size", str(self.p["value_size"]), "--wid", str(1000 + f.fid),
                                            "--run-id", f"soak{self.seed}f{f.fid}", "--rate", "10"], env=env)
        elif k == "etcd_member":
            t.etcd_member_kill(int(n[1:]))
        elif k == "etcd_outage":
            t.etcd_down()
        else:
            raise ValueError(k)
        return None

    def _heal(self, f: Planned, h: Any) -> None:
        t, n, k = self.t, f.target, f.kind
        if k in ("kill9", "restart", "oom"):
            if not t.running(n):
                t.start(n)
        elif k == "pause":
            t.resume(n)
        elif k in ("partition_etcd", "partition_clients"):
            t.heal(h)
        elif k in ("net_clients", "net_nodes", "net_etcd"):
            t.net_heal(h)
        elif k == "clock_skew":
            t.clock_skew(n, 0)
        elif k == "slow_fsync":
            t.slow_fsync(n, 0)
        elif k == "client_skew":
            h.stop()
        elif k == "etcd_member":
            t.etcd_member_start(int(n[1:]))
        elif k == "etcd_outage":
            t.etcd_up()

    def _oom(self, n: str) -> str:
        """Limit, press, wait for the kernel to OOM-kill the node, lift the limit (the heal restarts it)."""
        t = self.t
        t.memory_limit(n, t.memory_usage(n) + (16 << 20))
        hog = t.memory_hog(n, 96)
        deadline = time.monotonic() + 20
        while t.running(n) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = not t.running(n)
        ooms = t.oom_kills(n)
        t.end_hog(hog)
        t.memory_limit(n, None)
        if not killed:
            t.kill(n)
        what = f"{n} OOM-killed (oom_kill count {ooms})" if killed else f"{n} survived the pressure: kill -9"
        self.rec.event("info", what)
        return what

    def _run_fault(self, f: Planned) -> None:
        began = self.rec.now()  # the fault starts when its injection starts (stopping etcd takes seconds)
        try:
            h = self._inject(f)
        except Unsupported as exc:
            self.rec.event("info", f"{f.label}: unsupported here: {exc}")
            with self._lock:
                self.errors.append(f"{f.label}: unsupported: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - recorded; the soak goes on
            self.rec.event("info", f"{f.label}: inject failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self.errors.append(f"{f.label}: inject: {type(exc).__name__}: {exc}")
            return
        t0 = self.rec.event("fault", f.label, t=began)
        with self._lock:
            self.active[f.fid] = (t0, f)
        time.sleep(f.duration)
        try:
            self._heal(f, h)
        except Exception as exc:  # noqa: BLE001 - the final heal_all tries again
            self.rec.event("info", f"{f.label}: heal failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self.errors.append(f"{f.label}: heal: {type(exc).__name__}: {exc}")
        t1 = self.rec.event("heal", f"[f{f.fid}] healed")
        with self._lock:
            self.active.pop(f.fid, None)
            self.intervals.append((t0, t1, f))

    def heal_all(self) -> None:
        """Whatever a failed heal left behind: every node running and resumed, clocks, disks and
        links normal, every etcd member up."""
        t = self.t
        with contextlib.suppress(Exception):
            t.etcd_start_all()
        for n in sorted(t.nodes):
            with contextlib.suppress(Exception):
                t.clock_skew(n, 0)
                t.slow_fsync(n, 0)
            with contextlib.suppress(Exception):
                t.memory_limit(n, None)
            node = t.nodes[n]
            if node.paused:
                t.resume(n)
            if not t.running(n):
                t.start(n)
        t.heal_all_links()

    # -- the run
    def run(self) -> dict[str, Any]:
        p = self.p
        seconds = self.minutes * 60.0
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-soak-{self.seed}-"))
        nodes = [f"n{i + 1}" for i in range(int(p["nodes"]))]
        schedule = plan(self.seed, seconds, nodes=nodes, members=int(p["etcd_members"]), gap_s=float(p["gap_s"]),
                        max_overlap=int(p["max_overlap"]), kinds=[k for k in str(p["kinds"]).split(",") if k],
                        cover=bool(p["cover"]))
        result: dict[str, Any] = {"kind": "soak", "seed": self.seed, "minutes": self.minutes,
                                  "target": self.target_kind, "params": p, "status": "error",
                                  "schedule": [asdict(f) for f in schedule], "violations": []}
        load = sampler = None
        t_start = time.monotonic()
        try:
            self.t = make_target(self.target_kind, workdir, p, None)
            self.log(f"[soak] seed {self.seed}: {len(schedule)} faults planned over {self.minutes} min; "
                     "bringing the cluster up")
            self.t.up()
            cfg = LoadConfig(workers=int(p["workers"]), rate=float(p["rate"]), value_size=int(p["value_size"]),
                             timeout=float(p["timeout"]), deletes=float(p["deletes"]),
                             run_id=f"soak{self.seed}x{int(time.time()) % 100000}")
            load = LoadGenerator(self.t.url, self.rec, cfg).start()
            load.wait_ops(10)
            time.sleep(float(p["warmup_s"]))
            sampler = Sampler(self.t, self.rec, p, every=float(p["converge_every_s"]))
            sampler.start()
            origin = time.monotonic()
            threads = []
            for f in schedule:
                delay = origin + f.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.log(f"[soak] {self.rec.now():7.1f}s {f.label} for {f.duration:.1f}s "
                         f"({len(self.active)} active)")
                th = threading.Thread(target=self._run_fault, args=(f,), name=f"soak-f{f.fid}", daemon=True)
                th.start()
                threads.append(th)
            rest = origin + seconds - time.monotonic()
            if rest > 0:
                time.sleep(rest)
            for th in threads:
                th.join(120)
            self.heal_all()
            healed = self.rec.event("heal", "everything healed")
            wind_down(self.t, self.rec, load, sampler, p, healed, float(p["settle_s"]),
                      lambda m: self.log(f"[soak] {m}"))
            result.update(self.judge(healed, sampler.samples, sampler))
            m = result.get("metrics") or {}
            result["lost_slot_history"] = {  # where each lost key's slot lived, map by map
                x["key"]: sampler.slot_history(x["key"])
                for x in (m.get("lost_examples") or []) + (m.get("lost_known_examples") or [])}
        except Exception as exc:  # noqa: BLE001 - reported
            result.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:400]}",
                          traceback=traceback.format_exc()[-3000:])
        finally:
            if load is not None:
                load.stop()
            if sampler is not None and sampler.is_alive():
                sampler.stop()
            if self.t is not None:
                if result.get("status") != "passed":
                    with contextlib.suppress(Exception):
                        result["node_logs"] = {k: v[-1500:] for k, v in self.t.node_logs().items()}
                with contextlib.suppress(Exception):
                    self.t.close()
                result["delayer"] = getattr(self.t, "net_stats", {})
            if self.keep:
                result["workdir"] = str(workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
            result["duration_s"] = round(time.monotonic() - t_start, 1)
            result["fault_errors"] = self.errors
        if self.results_dir is not None:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            hist = self.results_dir / f"soak-{self.seed}-{self.target_kind}-{stamp}.history.jsonl"
            self.rec.history.dump(hist)
            result["history"] = str(hist)
        return result

    def quiet_windows(self, samples: list[tuple[float, bool]], end: float) -> list[tuple[float, float]]:
        """Stretches with no fault active for ``settle_s`` before them, and the slot map converged."""
        settle = float(self.p["settle_s"])
        busy = sorted((a, b + settle) for a, b, _ in self.intervals)
        free: list[tuple[float, float]] = []
        cur = 0.0
        for a, b in busy:
            if a > cur:
                free.append((cur, a))
            cur = max(cur, b)
        if cur < end:
            free.append((cur, end))
        out = []
        for a, b in free:  # cut out the samples where the map was not converged
            start = None
            for t, ok in samples:
                if t < a or t > b:
                    continue
                if ok and start is None:
                    start = t
                elif not ok and start is not None:
                    out.append((start, t))
                    start = None
            if start is not None:
                out.append((start, b))
        return [(a, b) for a, b in out if b - a >= 1.0]

    def impaired(self) -> dict[str, list[tuple[float, float]]]:
        """Per node, when a client may have skipped it as a replica of a write: each fault's window
        that touched it (or fenced everyone), stretched by a lease TTL and a client timeout (a node
        fences a TTL after etcd went away, and re-registers after the heal)."""
        margin = float(self.p["lease_ttl"]) + float(self.p["timeout"]) + 1.0
        out: dict[str, list[tuple[float, float]]] = {}
        for a, b, f in self.intervals:
            nodes = [f.target] if f.kind in SKIPS_TARGET else sorted(self.t.nodes) if f.kind in SKIPS_ALL else []
            for n in nodes:
                out.setdefault(n, []).append((a, b + margin))
        return out

    def judge(self, healed: float, samples: list[tuple[float, bool]], sampler: Any = None) -> dict[str, Any]:
        h = self.rec.history
        load_end = max((o.t1 for o in h.ops if o.phase == "load"), default=healed)
        quiet = self.quiet_windows(samples, load_end)
        known = None
        if self.p["known_single_copy"] and sampler is not None:
            impaired = self.impaired()

            def known(losses: list[Any]) -> list[Any]:
                return losses_with_impaired_replica(losses, impaired, sampler.replicas_at)

        v = check(h, read_bound_s=float("inf"), check_lost=True, converge_samples=samples, healed_at=healed,
                  converge_bound_s=float(self.p["converge_timeout_s"]), quiet=quiet, known_losses=known)
        violations = list(v.violations)
        load = [o for o in h.ops if o.phase == "load"]

        def inside(o: Op, ws: list[tuple[float, float]]) -> bool:
            return any(a <= o.t0 and o.t1 <= b for a, b in ws)

        faulty = [(a, b) for a, b, _ in self.intervals]
        quiet_ops = [o for o in load if inside(o, quiet)]
        fault_ops = [o for o in load if any(o.t0 <= b and o.t1 >= a for a, b in faulty)]
        bound = float(self.p["read_bound_s"])
        quiet_read_windows = unavailability(quiet_ops, "get")
        slow = [w for w in quiet_read_windows if w.length > bound]
        if slow:
            violations.append(f"reads unavailable for {max(w.length for w in slow):.1f}s with no fault active "
                              f"(bound {bound:.1f}s)")

        def avail(ops: list[Op], kind: str) -> dict[str, Any]:
            sel = [o for o in ops if o.op == kind]
            acked = sum(o.acked for o in sel)
            return {"attempted": len(sel), "acknowledged": acked,
                    "share": round(acked / len(sel), 4) if sel else None}

        lat = sorted(o.t1 - o.t0 for o in load if o.op == "get" and o.acked)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

        kinds: dict[str, int] = {}
        for _, _, f in self.intervals:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        m = dict(v.metrics)
        m.pop("faults", None)
        m.update({
            "faults_injected": len(self.intervals), "faults_by_kind": kinds,
            "max_concurrent_faults": max_overlap_seen(self.intervals),
            "fault_errors": len(self.errors),
            "quiet_windows": len(quiet), "quiet_s": round(sum(b - a for a, b in quiet), 1),
            "fault_s": round(union_length([(a, b) for a, b, _ in self.intervals]), 1),
            "availability": {
                "all": {"reads": avail(load, "get"), "writes": avail(load, "put")},
                "under_faults": {"reads": avail(fault_ops, "get"), "writes": avail(fault_ops, "put")},
                "quiet": {"reads": avail(quiet_ops, "get"), "writes": avail(quiet_ops, "put")},
            },
            "read_latency_s": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "quiet_read_unavailable_s": round(max((w.length for w in quiet_read_windows), default=0.0), 3),
        })
        return {"status": "failed" if violations else "passed", "violations": violations, "metrics": m}


def union_length(iv: list[tuple[float, float]]) -> float:
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(iv):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a  # type: ignore[operator]
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a  # type: ignore[operator]
    return total


def max_overlap_seen(iv: list[tuple[float, float, Any]]) -> int:
    points = sorted([(a, 1) for a, _, _ in iv] + [(b, -1) for _, b, _ in iv])
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best
