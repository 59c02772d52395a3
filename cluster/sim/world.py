"""One simulated cluster running one scenario: nodes, candidates, a client, etcd, faults, checks.

``World(scenario).run()`` forms the cluster (every node starts, the first map is published and
reaches its target), starts the client's writes, plays the scenario's faults, waits for the last
one to heal, then for the map to converge (within ``Scenario.converge_bound``), and checks. The
result carries the violations, some numbers, and the trace: what happened, when, in order
(faults, registrations, every published map, the rebalancer's own log lines, violations).

``rebalancer``, ``node`` and ``client`` pick the classes that run: the real ones, or -- to show that
the checks catch a bad decision -- deliberately broken subclasses driven through the very same world.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from memkv.client.cluster_map import nodes_prefix, slotmap_key
from memkv.cluster.rebalancer import Rebalancer, drain_prefix, migrations_prefix
from memkv.cluster.sim.candidate import SimCandidate
from memkv.cluster.sim.checker import Checker, Violation
from memkv.cluster.sim.client import SimClient
from memkv.cluster.sim.etcd import SimEtcd
from memkv.cluster.sim.loop import Loop
from memkv.cluster.sim.net import COMMIT_MAX_S, Net
from memkv.cluster.sim.node import SimNode
from memkv.cluster.sim.scenario import Fault, NodeSpec, Scenario
from memkv.cluster.sim.view import Decoded, SimView
from memkv.cluster.slotmap import compute_table

WALL0 = 1.8e9  # the simulated wall clock starts here (records carry wall-clock times)
FORM_S = 30.0


@dataclass
class Result:
    scenario: Scenario
    violations: list[Violation]
    stats: dict[str, Any]
    trace: list[tuple[float, str, str]] = field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay(self) -> str:
        return f"python -m memkv.cluster.sim run {self.scenario.seed} --trace"

    def format_trace(self, last: int | None = None) -> str:
        lines = [f"{t:9.3f}  {who:<12} {what}" for t, who, what in self.trace]
        if last is not None and len(lines) > last:
            lines = [f"... {len(lines) - last} earlier lines (the whole trace: {self.replay()})"] + lines[-last:]
        return "\n".join(lines)

    def report(self, trace_lines: int | None = 200) -> str:
        out = [f"seed {self.scenario.seed}: " + ("ok" if self.ok else f"{len(self.violations)} violation(s)"),
               f"scenario: {self.scenario.to_json()}", f"stats: {self.stats}"]
        out += [f"  {v}" for v in self.violations[:20]]
        if not self.ok:
            out.append(f"replay: {self.replay()}")
        if trace_lines != 0:
            out.append(self.format_trace(trace_lines))
        return "\n".join(out)


class _TraceLog(logging.Handler):
    """The rebalancer's log lines go to the trace; an ERROR line (a step that raised) is a violation."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.INFO)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            msg += f": {record.exc_info[1]!r}"
        self.world.trace("log", msg)
        if record.levelno >= logging.ERROR:
            self.world.checker.violation("raised", msg)


class World:
    def __init__(self, scenario: Scenario, *, rebalancer: type[Rebalancer] = Rebalancer,
                 node: type[SimNode] = SimNode, client: type[SimClient] = SimClient) -> None:
        self.scenario = scenario
        self.node_cls = node
        self.client_cls = client
        self.cluster = "sim"
        self.loop = Loop(scenario.seed)
        self.rng = self.loop.rng
        self.etcd = SimEtcd(self.loop)
        self.net = Net(self.loop, self.etcd)
        self.decoded = Decoded()
        self.rebalancer_cls = rebalancer
        self._trace: list[tuple[float, str, str]] = []
        self.checker = Checker(self)
        self.nodes: dict[str, SimNode] = {}
        self.node_list: list[SimNode] = []
        self.candidates: list[SimCandidate] = []
        self._spares = list(scenario.spares)
        self._retired: set[str] = set()
        self._version = 0
        self._rounds = 0
        self._target_memo: tuple[Any, bool] = (None, False)
        self.client: SimClient | None = None
        self.etcd.watchers.append(self._trace_commit)

    # -- services for the actors
    def make_rebalancer(self, view: SimView, identity: str, *, lease: Any, alive: Any) -> Rebalancer:
        sc = self.scenario
        return self.rebalancer_cls(view, self.cluster, identity, lease=lease, alive=alive, mbps=sc.mbps,
                                   slots=sc.slots, replicas=sc.replicas, round_s=sc.round_s, clock=self.loop.clock,
                                   wall=lambda: WALL0 + self.loop.now, round_id=self._round_id)

    def _round_id(self) -> str:
        self._rounds += 1
        return f"r{self._rounds:04d}"

    def watch_delay(self) -> float:
        return 0.001 + self.rng.random() * 0.02

    def commit_delay(self) -> float:
        return self.rng.random() * COMMIT_MAX_S

    def next_version(self) -> int:
        self._version += 1
        return self._version

    def process_failed(self, name: str, error: BaseException) -> None:
        self.checker.violation("raised", f"process {name} died: {error!r}")

    def trace(self, who: str, what: str) -> None:
        self._trace.append((self.loop.now, who, what))

    def _trace_commit(self, rev: int, key: str, value: bytes | None) -> None:
        if key == slotmap_key(self.cluster) and value is not None:
            sm = self.decoded.slotmap(rev, value)
            self.trace("etcd", f"map epoch {sm.epoch} (rev {rev}): members {sorted(sm.members)}, "
                               f"{len(sm.pending)} pending {dict(list(sm.pending.items())[:6])}")
        elif key.startswith(nodes_prefix(self.cluster)):
            self.trace("etcd", f"{key.rsplit('/', 1)[1]} {'registered' if value is not None else 'unregistered'}")
        elif key.startswith(drain_prefix(self.cluster)):
            self.trace("etcd", f"drain {key.rsplit('/', 1)[1]} {'requested' if value is not None else 'cleared'}")
        elif key.endswith("/rebalancer/leader"):
            self.trace("etcd", f"leader {value.decode() if value is not None else '(none)'}")

    # -- the cluster
    def add_node(self, spec: NodeSpec) -> SimNode:
        n = self.node_cls(self, spec.id, spec.zone, spec.host, durable=self.scenario.durable,
                          candidate=self.scenario.standalone == 0)
        self.nodes[spec.id] = n
        self.node_list.append(n)
        return n

    @property
    def retired(self) -> set[str]:
        """Nodes that left for good (stopped, drained, crashed never to restart)."""
        return self._retired

    def registered(self) -> set[str]:
        p = nodes_prefix(self.cluster)
        return {k[len(p):] for k in self.etcd.kvs if k.startswith(p)}

    def drains(self) -> set[str]:
        p = drain_prefix(self.cluster)
        return {k[len(p):] for k in self.etcd.kvs if k.startswith(p)}

    def slotmap(self) -> Any:
        rec = self.etcd.kvs.get(slotmap_key(self.cluster))
        return self.decoded.slotmap(rec.mod_rev, rec.value) if rec is not None else None

    def converged(self) -> bool:
        """Where the rebalancer leaves the map: every live node registered and a member (but the
        drained, which have handed over and freed their values), nothing pending, no migration
        record, every slot on min(R, N) distinct members, the table equal to the rebalancer's own
        target for these members, and every node swept for this map (it holds nothing outside its
        slots that the owners lack)."""
        sm = self.slotmap()
        if sm is None:
            return False
        registered = self.registered()
        if registered != {n.id for n in self.node_list if n.alive}:
            return False
        members = {n: self.nodes[n].zone for n in sorted(registered - self.drains())} or {
            n: self.nodes[n].zone for n in sorted(registered)}
        if sm.pending or set(sm.members) != set(members):
            return False
        want = min(sm.replicas, len(members))
        if any(len(row) != want or len(set(row)) != want or not set(row) <= set(members) for row in sm.table):
            return False
        if any(k.startswith(migrations_prefix(self.cluster)) for k in self.etcd.kvs):
            return False
        prog = self.etcd.kvs.get(f"/memkv/{self.cluster}/rebalancer/progress")
        if prog is None or json.loads(prog.value).get("swept") != sm.epoch:
            return False  # the leader has not yet had every node free what it holds outside its slots
        for n in self.drains() & registered:  # a drained node is done once it has handed over and freed
            if not json.loads(self.etcd.kvs[drain_prefix(self.cluster) + n].value).get("freed"):
                return False
        key = (sm.epoch, tuple(sorted(members.items())))
        if self._target_memo[0] != key:
            at_target = compute_table(members, slots=sm.slots, replicas=sm.replicas, prev=sm.table,
                                      hosts={n: self.nodes[n].host for n in members}) == list(sm.table)
            self._target_memo = (key, at_target)
        return self._target_memo[1]

    def leader(self) -> str | None:
        rec = self.etcd.kvs.get(f"/memkv/{self.cluster}/rebalancer/leader")
        return rec.value.decode() if rec is not None else None

    def _preform(self) -> None:
        """Start from the converged map of the scenario's nodes, with their data in place."""
        from memkv.client.cluster_map import SlotMap
        from memkv.cluster.sim.node import Value

        sc = self.scenario
        members = {spec.id: spec.zone for spec in sc.nodes}
        table = compute_table(members, slots=sc.slots, replicas=sc.replicas,
                              hosts={spec.id: spec.host for spec in sc.nodes})
        self.etcd.put(slotmap_key(self.cluster), SlotMap(1, sc.slots, sc.replicas, tuple(table), members).encode())
        size = sc.slot_bytes // max(1, sc.values_per_slot)
        if size:
            for s, row in enumerate(table):
                for n in row:
                    node = self.nodes[n]
                    for i in range(sc.values_per_slot):
                        node.gen += 1
                        node.data[b"s%d.%d" % (s, i)] = Value(1, node.gen, size, s)

    # -- faults
    def _pick(self, *, members_left: int = 1) -> SimNode | None:
        """A live node that may go while at least ``members_left`` other members stay."""
        drains = self.drains()
        live = [n for n in self.node_list if n.alive and n.id not in drains and n.id not in self._retired]
        if len(live) <= members_left:
            return None
        return live[self.rng.randrange(len(live))]

    def _fault(self, f: Fault) -> None:
        kind = f.kind
        if kind == "join":
            if not self._spares:
                self.trace("FAULT", "join: no spare node left (skipped)")
                return
            node = self.add_node(self._spares.pop(0))
            self.trace("FAULT", f"join {node.id} ({node.zone}/{node.host})")
            node.start()
        elif kind in ("leave", "crash", "drain"):
            node = self._pick()
            if node is None:
                self.trace("FAULT", f"{kind}: no node may go (skipped)")
                return
            self.trace("FAULT", f"{kind} {node.id}" + (f", restart in {f.restart_after}s" if f.restart_after else ""))
            if kind == "leave":
                self.checker.gone_for_good(node)
                self._retired.add(node.id)
                node.stop()
            elif kind == "crash":
                if f.restart_after is None:
                    self.checker.gone_for_good(node)
                node.crash()
                if f.restart_after is not None:
                    self.loop.call_later(f.restart_after, self._restart, node)
                else:
                    self._retired.add(node.id)
            else:
                self._retired.add(node.id)
                self._drain(node)
        elif kind == "leader_crash":
            self._leader_crash(f, self.loop.now + f.duration)
        elif kind == "etcd_down":
            self.trace("FAULT", f"etcd down for {f.duration}s")
            self.etcd.set_up(False)
            self.loop.call_later(f.duration, self._heal, "etcd up", lambda: self.etcd.set_up(True))
        elif kind == "etcd_slow":
            self.trace("FAULT", f"etcd slow (up to +{f.magnitude}s) for {f.duration}s")
            self.net.etcd_extra = f.magnitude
            self.loop.call_later(f.duration, self._heal, "etcd fast", lambda: setattr(self.net, "etcd_extra", 0.0))
        elif kind == "rpc_jitter":
            self.trace("FAULT", f"node calls delayed by up to {f.magnitude}s (reordered) for {f.duration}s")
            self.net.rpc_jitter = f.magnitude
            self.loop.call_later(f.duration, self._heal, "node calls fast",
                                 lambda: setattr(self.net, "rpc_jitter", 0.0))
        elif kind == "copy_fail":
            node = self._pick(members_left=0)
            if node is not None:
                self.trace("FAULT", f"{node.id} refuses copies for {f.duration}s")
                node.refuse_copies_until = self.loop.now + f.duration
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _heal(self, what: str, fn: Any) -> None:
        self.trace("HEAL", what)
        fn()

    def _restart(self, node: SimNode | SimCandidate) -> None:
        if node.id in self._retired or node.alive:
            return
        self.trace("HEAL", f"restart {node.id}")
        node.start()

    def _drain(self, node: SimNode) -> None:
        """``memkv drain`` (request it, wait until no row names the node and its record says it
        handed over and freed its values), then the operator stops the node."""
        key = drain_prefix(self.cluster) + node.id

        def request() -> None:
            if not self.etcd.up:
                self.loop.call_later(0.5, request)
                return
            self.etcd.put(key, b'{"since": 0}')
            self.loop.call_later(0.3, poll)

        def poll() -> None:
            sm = self.slotmap()
            rec = self.etcd.kvs.get(key)
            if not node.alive:
                return
            if (self.etcd.up and sm is not None and all(node.id not in row for row in sm.table)
                    and rec is not None and json.loads(rec.value).get("freed")):
                self.trace("FAULT", f"{node.id} drained: stopped")
                self.checker.stopping_drained(node)
                node.stop()
                return
            self.loop.call_later(0.3, poll)

        request()

    def _leader_crash(self, f: Fault, deadline: float) -> None:
        sm = self.slotmap()
        leader = self.leader()
        if (sm is None or not sm.pending) and self.loop.now < deadline:
            self.loop.call_later(0.05, self._leader_crash, f, deadline)
            return
        victim: SimNode | SimCandidate | None = self.nodes.get(leader or "")
        if victim is None:
            victim = next((c for c in self.candidates if c.id == leader), None)
        if victim is None or not victim.alive:
            self.trace("FAULT", f"leader_crash: no live leader ({leader}) (skipped)")
            return
        if isinstance(victim, SimNode) and self._pick() is None:
            self.trace("FAULT", f"leader_crash: {victim.id} is the last member (skipped)")
            return
        mid = " mid-migration" if sm is not None and sm.pending else ""
        self.trace("FAULT", f"crash the leader {victim.id}{mid}"
                   + (f", restart in {f.restart_after}s" if f.restart_after else ""))
        if f.restart_after is None and isinstance(victim, SimNode):
            self.checker.gone_for_good(victim)
        victim.crash()
        if f.restart_after is not None:
            self.loop.call_later(f.restart_after, self._restart, victim)
        elif isinstance(victim, SimNode):
            self._retired.add(victim.id)
        else:
            self.loop.call_later(1.0, self._restart, victim)  # a candidate process is restarted by its supervisor

    # -- the run
    @contextmanager
    def _logs(self) -> Iterator[None]:
        logger = logging.getLogger("memkv.rebalancer")
        handler = _TraceLog(self)
        saved = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]

    def run(self) -> Result:
        sc = self.scenario
        loop = self.loop
        stats: dict[str, Any] = {}
        with self._logs():
            for spec in sc.nodes:
                node = self.add_node(spec)
                loop.call_later(self.rng.random() * 0.3, node.start)
            if sc.preformed:
                self._preform()
            for i in range(sc.standalone):
                c = SimCandidate(self, f"rb{i + 1}")
                self.candidates.append(c)
                loop.call_later(self.rng.random() * 0.3, c.start)
            if not loop.run(FORM_S, self.converged, 0.05):
                self.checker.violation("formation", f"the first map did not converge in {FORM_S}s")
                return self._result(stats)
            t0 = loop.now
            self.trace("WORLD", "formed; faults start")
            self.checker.counting = True
            keys = [b"k%05d" % i for i in range(sc.keys)]
            self.client = self.client_cls(self, "client", keys, sc.write_rate, sc.value_size, sc.delete_every)
            if sc.write_rate > 0:
                self.client.start()
            etcd0 = (self.etcd.writes, self.etcd.bytes_written)
            views0 = {n.id: n.view.bytes_received for n in self.node_list if n.alive}
            for f in sc.faults:
                loop.call_at(t0 + f.at, self._fault, f)
            t_heal = t0 + sc.heal_at()
            loop.run(t_heal)
            self.trace("WORLD", "every fault has healed")
            bound = sc.converge_bound()
            done = loop.run(t_heal + bound, self.converged, 0.05)
            stats["converge_s"] = round(loop.now - t_heal, 3)
            stats["etcd_writes"] = self.etcd.writes - etcd0[0]
            stats["etcd_bytes"] = self.etcd.bytes_written - etcd0[1]
            watched = sorted(n.view.bytes_received - views0[n.id] for n in self.node_list if n.alive and n.id in views0)
            stats["watch_bytes_per_watcher"] = watched[len(watched) // 2] if watched else 0
            if not done:
                sm = self.slotmap()
                self.checker.violation("converge", f"not converged {bound:.1f}s after the faults healed: "
                                                   f"registered {sorted(self.registered())}, alive "
                                                   f"{sorted(n.id for n in self.node_list if n.alive)}, map epoch "
                                                   f"{sm.epoch if sm else 0} members "
                                                   f"{sorted(sm.members) if sm else []} "
                                                   f"pending {len(sm.pending) if sm else 0}, leader {self.leader()}")
            else:
                stats.update(self.checker.final(self.slotmap()))
                if sc.reads > 0 and sc.write_rate > 0:
                    for key in self.checker.deleted_keys():  # every acknowledged delete still stands
                        self.client.read(key)
            if sc.write_rate > 0:
                self.client.stop()
            stats.update(writes=self.client.writes, acked_writes=self.client.acked, refused=dict(self.client.refused))
            if sc.reads > 0:
                stats.update(reads=self.client.reads, deletes_refused=self.client.deletes_refused)
        return self._result(stats)

    def _result(self, stats: dict[str, Any]) -> Result:
        stats.update(sim_s=round(self.loop.now, 3), events=self.loop.events, etcd_calls=self.net.etcd_calls,
                     node_calls=self.net.node_calls)
        return Result(self.scenario, list(self.checker.violations), stats, self._trace)


def run_seed(seed: int, **kw: Any) -> Result:
    return World(Scenario.random(seed), **kw).run()
