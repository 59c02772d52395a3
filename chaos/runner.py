"""One scenario end to end.

1. bring the target up (local: etcd + N nodes started here; compose: a fresh deployment,
   chaos.targets.ComposeDeployment);
2. start the load generator, wait until it has acknowledged writes, warm up;
3. run the scenario (faults + heals, recorded as events), while a sampler records
   whether the slot map is converged (every slot on min(R, live) distinct live nodes,
   every running node registered and in the map);
4. wait for convergence after the last heal, keep the load running ``after_s`` more;
5. stop the load, read back every key written (phase ``final``), run the checker;
6. write the history (JSON lines) and return the result (the report row).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from chaos.checker import check
from chaos.history import Recorder
from chaos.load import DELETES, LoadConfig, LoadGenerator, verify
from chaos.scenarios import SCENARIOS, Ctx, converged, rebalancer_missing
from chaos.targets import ComposeTarget, LocalTarget, Unsupported

COMMON = {"nodes": 3, "replicas": 2, "lease_ttl": 2, "victim": "n2", "warmup_s": 2.0, "after_s": 2.0,
          "timeout": 1.5, "rate": 40.0, "workers": 2, "value_size": 1024, "converge_timeout_s": 60.0,
          "force": False, "etcd_members": 1, "seed": 1,
          "deletes": DELETES, "memory": "64MiB", "anti_entropy_interval": 30.0}


def params_for(name: str, overrides: dict[str, Any] | None = None, target: str = "local") -> dict[str, Any]:
    p = dict(COMMON)
    if target == "compose":
        p["lease_ttl"] = 5  # compose/memkv.toml
    p.update(SCENARIOS[name].defaults)
    p.update(overrides or {})
    p.setdefault("read_bound_s", float(p["lease_ttl"]) + 2 * float(p["timeout"]) + 3.0)
    return p


def parse_value(text: str) -> Any:
    for conv in (int, float):
        with contextlib.suppress(ValueError):
            return conv(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


class Sampler(threading.Thread):
    """Samples whether the slot map is converged, and keeps every slot map it saw (per epoch:
    when it was first seen, the members, each slot's replicas and pending copies), so a lost
    write can be traced to the slot moves around it (:func:`slot_history`)."""

    def __init__(self, target: Any, rec: Recorder, p: dict[str, Any], every: float = 0.25) -> None:
        super().__init__(name="chaos-converge", daemon=True)
        self.target, self.rec, self.p, self.every = target, rec, p, every
        self.samples: list[tuple[float, bool]] = []
        self.maps: list[tuple[float, Any, tuple[str, ...]]] = []  # (first seen, slot map, registered nodes)
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            t = self.rec.now()
            try:
                st = self.target.state()
                ok = converged(self.target, st, set(self.p.get("expect_gone", ())))
                sm = st.slotmap
                if sm is not None and (not self.maps or self.maps[-1][1].epoch != sm.epoch):
                    self.maps.append((t, sm, tuple(sorted(st.nodes))))
            except Exception:  # noqa: BLE001 - etcd down: not converged
                ok = False
            self.samples.append((t, ok))
            self.stop_ev.wait(self.every)

    def replicas_at(self, key: str, t0: float, t1: float) -> set[str]:
        """The nodes that held ``key``'s slot (replicas and pending copies) in any slot map in force
        during [t0, t1] (a second either side: the sampler sees a new map only when it polls)."""
        from memkv.client.cluster_map import key_slot

        out: set[str] = set()
        for i, (t, sm, _) in enumerate(self.maps):
            until = self.maps[i + 1][0] if i + 1 < len(self.maps) else float("inf")
            if t <= t1 + 1.0 and until >= t0 - 1.0:
                s = key_slot(key.encode(), sm.slots)
                out.update(sm.table[s])
                out.update((getattr(sm, "pending", None) or {}).get(s, ()))
        return out

    def slot_history(self, key: str) -> list[str]:
        """The key's slot through every slot map seen: "t=12.3s epoch 7: n1,n3 (+n2 pending) [nodes n1,n3]"."""
        from memkv.client.cluster_map import key_slot

        out = []
        for t, sm, nodes in self.maps:
            s = key_slot(key.encode(), sm.slots)
            pend = sm.pending.get(s) if getattr(sm, "pending", None) else None
            out.append(f"t={t:.1f}s epoch {sm.epoch}: slot {s} on {','.join(sm.table[s])}"
                       + (f" (pending {','.join(pend)})" if pend else "") + f" [registered {','.join(nodes)}]")
        return out

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(10)


def wind_down(tgt: Any, rec: Recorder, load: LoadGenerator, sampler: Sampler, p: dict[str, Any], healed: float,
              settle_s: float, log: Any) -> None:
    """After the last heal: wait (``converge_timeout_s`` at most) until the sampler saw the map
    converged, keep the load running ``settle_s`` more, stop it, then read back every key a load
    worker tried to write -- this process's or another's (:mod:`chaos.worker`)."""
    deadline = time.monotonic() + float(p["converge_timeout_s"])
    while time.monotonic() < deadline:
        if sampler.samples and sampler.samples[-1][1] and sampler.samples[-1][0] > healed:
            break
        time.sleep(0.1)
    time.sleep(settle_s)
    load.stop()
    sampler.stop()
    written = load.written | {(o.ns, o.key) for o in list(rec.history.ops) if o.op == "put" and o.phase == "load"}
    log(f"verifying {len(written)} keys")
    verify(tgt.url, rec, sorted(written), timeout=max(3.0, float(p["timeout"]) * 2))


def make_target(kind: str, workdir: Path, p: dict[str, Any], node_args: Any) -> Any:
    if kind == "compose":
        t: Any = ComposeTarget(workdir, replicas=p["replicas"], lease_ttl=p["lease_ttl"])
    else:
        t = LocalTarget(workdir, nodes=int(p["nodes"]), replicas=int(p["replicas"]), lease_ttl=int(p["lease_ttl"]),
                        etcd_members=int(p["etcd_members"]), seed=int(p["seed"]), memory=str(p.get("memory", "64MiB")),
                        anti_entropy_interval=float(p["anti_entropy_interval"]))
    if node_args is not None:
        t.node_args = node_args(t, p)
    return t


def run_scenario(name: str, *, target: str = "local", overrides: dict[str, Any] | None = None,
                 results_dir: Path | None = None, keep: bool = False, log: Any = print) -> dict[str, Any]:
    sc = SCENARIOS[name]
    p = params_for(name, overrides, target)
    result: dict[str, Any] = {"scenario": name, "target": target, "description": sc.doc,
                              "params": {k: v for k, v in p.items() if k != "force"}, "status": "error",
                              "violations": [], "metrics": {}, "notes": []}
    t_start = time.monotonic()
    if "rebalancer" in sc.needs and not p["force"]:
        why = rebalancer_missing()
        if why:
            result.update(status="pending", reason=why)
            return result
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{name}-"))
    tgt = None
    load = None
    sampler = None
    try:
        tgt = make_target(target, workdir, p, sc.node_args)
        for need in sc.needs:  # before the (slow) bring-up: a fault this target cannot make
            why = tgt.unsupported(need) if need != "rebalancer" else None
            if why:
                raise Unsupported(why)
        log(f"[{name}] target {target}: bringing the cluster up")
        tgt.up()
        rec = Recorder()
        cfg = LoadConfig(workers=int(p["workers"]), rate=float(p["rate"]), value_size=int(p["value_size"]),
                         timeout=float(p["timeout"]), deletes=float(p["deletes"]))
        load = LoadGenerator(tgt.url, rec, cfg).start()
        load.wait_ops(10)
        time.sleep(float(p["warmup_s"]))
        sampler = Sampler(tgt, rec, p)
        sampler.start()
        ctx = Ctx(tgt, rec, p, load)
        log(f"[{name}] injecting: {sc.doc}")
        sc.fn(ctx)
        healed = rec.history.last_heal() or rec.now()
        wind_down(tgt, rec, load, sampler, p, healed, float(p["after_s"]), lambda m: log(f"[{name}] {m}"))
        verdict = check(rec.history, read_bound_s=float(p["read_bound_s"]), check_lost=sc.check_lost,
                        converge_samples=sampler.samples, healed_at=healed,
                        converge_bound_s=float(p["converge_timeout_s"]))
        violations = verdict.violations + ctx.violations
        status = "failed" if violations else "passed"
        if sc.known:  # a reproducer of a known bug: failing is expected, passing is news
            status = "xfail" if violations else "xpass"
            result["reason"] = f"known: {sc.known}"
        result.update(status=status, violations=violations, metrics=verdict.metrics, notes=ctx.notes)
        if results_dir is not None:
            results_dir.mkdir(parents=True, exist_ok=True)
            hist = results_dir / f"{name}-{target}-{time.strftime('%Y%m%d-%H%M%S')}.history.jsonl"
            rec.history.dump(hist)
            result["history"] = str(hist)
        if violations and tgt is not None:
            result["node_logs"] = {k: v[-1500:] for k, v in tgt.node_logs().items()}
    except Unsupported as exc:  # the target cannot inject this fault: said in the report, not a pass
        result.update(status="unsupported", reason=f"unsupported on {target}: {exc}")
    except Exception as exc:  # noqa: BLE001 - reported, the suite goes on
        result.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:400]}",
                      traceback=traceback.format_exc()[-3000:])
        if tgt is not None:
            with contextlib.suppress(Exception):
                result["node_logs"] = {k: v[-1500:] for k, v in tgt.node_logs().items()}
    finally:
        if load is not None:
            load.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if tgt is not None:
            with contextlib.suppress(Exception):
                tgt.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            result["workdir"] = str(workdir)
        result["duration_s"] = round(time.monotonic() - t_start, 1)
    return result


def write_report(results: list[dict[str, Any]], results_dir: Path, target: str,
                 timing: dict[str, Any] | None = None) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"run-{target}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"target": target, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "timing": timing or {}, "results": results}, indent=2, default=str))
    return path
