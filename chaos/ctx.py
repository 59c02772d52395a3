"""What a scenario works with: :class:`Ctx` (the target, the recorder, the parameters, the
load; fault/heal/info events; expectations), the convergence predicate, and probes --
requests sent straight to one node, outside the load generator, recorded with what must
happen to them (``expect``: "refused" must not be acknowledged, "served" must return an
acknowledged value; :mod:`chaos.checker` judges both).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.checker import slot_map_problems
from chaos.history import Op, Recorder, crc
from chaos.load import BLOCKS_NS, LoadGenerator, make_value
from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot
from memkv.cluster.slotmap import compute_table
from memkv.errors import MemKVError


@dataclass
class Ctx:
    target: Any
    rec: Recorder
    p: dict[str, Any]
    load: LoadGenerator
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # expectations of the scenario that failed

    @property
    def victim(self) -> str:
        return str(self.p["victim"])

    @property
    def ttl(self) -> float:
        return float(self.p["lease_ttl"])

    def fault(self, what: str) -> float:
        return self.rec.event("fault", what)

    def heal(self, what: str) -> float:
        return self.rec.event("heal", what)

    def info(self, what: str) -> float:
        t = self.rec.event("info", what)
        self.notes.append(what)
        return t

    def expect(self, ok: bool, what: str) -> bool:
        """A scenario-specific invariant (the history checker's are in :mod:`chaos.checker`):
        recorded as an info event, and as a violation when ``ok`` is false."""
        self.info(("ok: " if ok else "VIOLATED: ") + what)
        if not ok:
            self.violations.append(what)
        return ok

    def sleep(self, s: float) -> None:
        time.sleep(max(0.0, s))

    def wait(self, pred: Callable[[Any], bool], timeout: float, what: str) -> Any:
        return self.target.wait(pred, timeout, what)

    def wait_gone(self, node_id: str, timeout: float | None = None) -> None:
        """Until ``node_id``'s lease expired and the map no longer names it."""
        self.wait(lambda st: node_id not in st.nodes and st.slotmap is not None
                  and node_id not in st.slotmap.members, timeout or self.ttl * 4 + 20, f"{node_id} out of the map")

    def wait_converged(self, timeout: float | None = None) -> None:
        """Until every slot is back on R live replicas with nothing pending (see :func:`converged`)."""
        gone = set(self.p.get("expect_gone", ()))
        self.wait(lambda st: converged(self.target, st, gone), timeout or float(self.p["converge_timeout_s"]),
                  "converged")

    def wait_member(self, node_id: str, timeout: float = 60.0) -> None:
        self.wait(lambda st: node_id in st.nodes and st.slotmap is not None and node_id in st.slotmap.members,
                  timeout, f"{node_id} back in the map")


def converged(target: Any, st: Any, expect_gone: set[str]) -> bool:
    """The map is where the rebalancer will leave it: every live node a member, nothing moving,
    every slot on R live replicas, and the table equal to the rebalancer's own target for these
    members -- not merely fully replicated. (A node that restarts after its slots were
    re-replicated elsewhere is a member holding nothing until the next round moves slots back;
    counting that as converged ended the wait just before that round, which then looked like
    a cluster that never converged.)"""
    sm = st.slotmap
    if sm is None:
        return False
    alive = target.alive() - expect_gone
    registered = set(st.nodes)
    live = alive & registered
    if (not alive <= registered or set(sm.members) != live or getattr(sm, "pending", None)
            or slot_map_problems(sm.table, live, sm.replicas)):
        return False
    members = {n: st.nodes[n].zone for n in live}
    return compute_table(members, slots=sm.slots, replicas=sm.replicas, prev=sm.table) == list(sm.table)



# -- probes: requests sent straight to one node, outside the load generator
def open_probe(ctx: Ctx, node_id: str, *, epoch: int | None, timeout: float) -> SyncClient:
    host, port = ctx.target.address(node_id)
    c = SyncClient.connect(f"memkv://{host}:{port}", transport="tcp", timeout=timeout)  # connected now
    c.router.epoch = epoch  # requests carry this slot-map epoch, as a cluster client's would
    return c


def owned_key(sm: Any, node_id: str, tag: str) -> str:
    for i in range(100_000):
        k = f"probe/{tag}/{i}"
        if node_id in sm.table[key_slot(k.encode(), sm.slots)]:
            return k
    raise RuntimeError(f"no key owned by {node_id}")


def probe_put(ctx: Ctx, client: SyncClient, key: str, *, expect: str, label: str) -> Op:
    value = make_value(key, label, 256)
    t0 = ctx.rec.now()
    try:
        client.put(key, value, namespace=BLOCKS_NS)
        op = Op("put", key, t0, ctx.rec.now(), True, "ok", crc(value), BLOCKS_NS, phase="probe", expect=expect)
    except (MemKVError, OSError) as exc:
        op = Op("put", key, t0, ctx.rec.now(), False, "error", crc(value), BLOCKS_NS, type(exc).__name__,
                phase="probe", expect=expect)
    ctx.rec.add(op)
    return op


def probe_get(ctx: Ctx, client: SyncClient, key: str, *, ns: str = BLOCKS_NS, expect: str = "served") -> Op:
    """A read sent to one node; ``expect="served"``: it must return an acknowledged value of the key."""
    t0 = ctx.rec.now()
    try:
        got = client.get(key, namespace=ns)
        op = Op("get", key, t0, ctx.rec.now(), True, "miss" if got is None else "ok",
                None if got is None else crc(got), ns, phase="probe", expect=expect)
    except (MemKVError, OSError) as exc:
        op = Op("get", key, t0, ctx.rec.now(), False, "error", None, ns, type(exc).__name__, phase="probe",
                expect=expect)
    ctx.rec.add(op)
    return op
