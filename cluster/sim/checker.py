"""The simulator's invariants, checked as the simulated cluster runs.

**No acknowledged write is lost while a live copy of it exists.** The ledger holds, per key, the
newest acknowledged version. A node *holds* a key when it has that version or a newer one. Then:

- *free*: a node that frees (``DROP_SLOTS``, or the purge before a copy) the last copy held by a
  live node of an acknowledged key violates it -- the control plane destroyed data nobody else had;
- *map*: a published slot map that changes a slot's owners (its row without pending
  destinations: where reads go, and what the rebalancer keeps) so that none of them holds an
  acknowledged key of the slot (a registered owner that is down holds what its flash holds)
  violates it -- the map points away from every copy -- unless the slot's pending destination
  holds it (it becomes an owner, or gives it back if the move is abandoned) or an owner this map
  (or an earlier one) removed still holds it (it hands it over when it frees the slot);
- *drain*: a node stopped after ``memkv drain`` said it can be, while it held the only copy;
- *final*: once the cluster has converged, every acknowledged key is held by at least one owner
  of its slot (a replica that missed a write while it was down stays behind: there is no
  anti-entropy, read repair fixes it; counted, not a violation).

**Every live owner has an acknowledged write** (*acks*, where the namespace's ``acks`` is ``all``,
the default of a durable one: README "Guarantees"). When a write is acknowledged, every owner and
pending destination of its slot in the client's map that held a live lease and ran without a
crash for the whole write (registered when the client began it, its registration and process
unbroken until the acknowledgement), and still is one of the slot's row, holds it -- the client
stored it there or had it relayed. An owner whose lease lapsed during the write may lack it (it
failed, as far as the cluster can tell); one that a flip removed meanwhile handed it over (*map*).

**One failure loses no acknowledged write** (*exposed*, ``acks = "all"``, R >= 2): "an
acknowledged durable write survives losing any one node with its disk". A node that leaves for
good (a crash it never restarts from, a stop) and takes with it the last surviving copy of an
acknowledged write violates it when the slot's row was whole at that moment: min(R, members)
owners, every other one registered and running -- the loss was that one failure's. Losing a
write that an earlier failure left on one copy (an owner whose lease lapsed, removed from the
row, not yet copied back) is two failures at once: not promised.

**No acknowledged delete is undone.** *resurrected*: a client read (as the real client reads,
``memkv.cluster.sim.client``) returns a value of a key older than a delete of it that was
acknowledged, unless the key is excused (below: every copy of its newest acknowledged state went
down). The client reads during the run and, once converged, every key whose newest acknowledged
write is a delete.

A key is *excused* from then on when failures took every copy the control plane could know of:
when a node crashes or its registration ends, and no other live, registered node of the slot's
row (owners and pending destinations, in the map of that moment) holds it. That is R or more
failures for a write that reached all R replicas, or fewer for one acknowledged while replicas
were down (the client skips dead owners) -- beyond what replication promises.

**Moves per membership change.** Every ownership a published map adds to a slot's owners is a
move. Each change of the member set (registered, not draining; N members before it, effective
replication r = min(R, N) before and r' after) adds to the allowance:

- a node leaving (crash, stop, drain): its ownerships at that moment, and the slots being moved
  to it (a copy in flight may still complete), since consistent hashing re-homes only the
  leaver's slots, ``+ 0.15 x S x r'/(N-1) + 3``;
- a node joining: ``1.4 x S x r'/(N+1) + S x (r' - r) + 2`` (its fair share, plus a whole new
  replica per slot when r grows);
- both: plus the deficit of members far below the new mean (``load < mean/2``: compute_table
  tops them up to the mean), ``sum(mean - load)`` over them.

The slack is for small S: with S = 32 or 64 and zone constraints, the fill can be forced over
the load bound (a row that already holds a node of the only other zone) and balancing back costs
a few moves; a map grown node by node starts a little unbalanced. Worst seen over 25 000
schedules: a join 1.34 x its fair share, a leave its load + 8 at S = 64. At S = 4096 and 65 536
the computation moves exactly the ideal (tests/test_cluster_ring.py; bench.control_plane: a join
130 ownerships for an ideal of 131, a leave exactly the leaver's).

**Placement** (at the end): the converged map breaks no placement rule
(``memkv.cluster.slotmap.placement_faults``: replicas of a slot in distinct zones when possible,
else on distinct hosts; never two on one host while a member of another host has room).

**Convergence** (checked by the world): after the faults heal, the map reaches the rebalancer's
own target for the live members within the scenario's bound.

Anything a program raises that it was not written to handle (a rebalancer step logging an
exception, a process dying) is a violation too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memkv.client.cluster_map import SlotMap, nodes_prefix, slotmap_key
from memkv.cluster.rebalancer import drain_prefix
from memkv.cluster.slotmap import placement_faults

if TYPE_CHECKING:
    from memkv.cluster.sim.node import SimNode, Value
    from memkv.cluster.sim.world import World


def placement(table: Any, zone: dict[str, str], host: dict[str, str]) -> dict[str, int]:
    """How the replicas of each slot spread over the topology: rows whose replicas share a zone
    although the members span enough zones, and likewise for hosts (measured: a row may share
    a host when every node of the other hosts is at the load bound; ``placement_faults`` is the
    rule, checked by ``final``)."""
    members = {n for row in table for n in row}
    zones, hosts = len({zone[n] for n in members}), len({host[n] for n in members})
    out = {"rows": 0, "zone_shared": 0, "host_shared": 0}
    for row in table:
        if len(row) < 2:
            continue
        out["rows"] += 1
        if len({zone[n] for n in row}) < min(len(row), zones):
            out["zone_shared"] += 1
        if len({host[n] for n in row}) < min(len(row), hosts):
            out["host_shared"] += 1
    return out


@dataclass
class Violation:
    t: float
    kind: str
    message: str

    def __str__(self) -> str:
        return f"[t={self.t:.3f}] {self.kind}: {self.message}"


@dataclass
class Change:
    t: float
    kind: str  # join | leave
    node: str
    members_before: int
    allowance: float
    moves: int = 0  # moves published while this was the latest change


@dataclass
class Checker:
    world: World
    ledger: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # acknowledged: key -> (version, slot)
    deletes: dict[bytes, int] = field(default_factory=dict)  # key -> version of its newest acknowledged delete
    resurrected: int = 0
    excused: dict[bytes, str] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    moves: int = 0
    allowance: float = 0.0
    counting: bool = False  # moves and changes count from the end of the cluster's formation
    maps: int = 0
    _members: frozenset[str] = frozenset()
    _registered: set[str] = field(default_factory=set)
    _draining: set[str] = field(default_factory=set)
    _last_owners: tuple[frozenset[str], ...] | None = None
    _map: SlotMap | None = None
    _lost: set[bytes] = field(default_factory=set)
    _due: dict[bytes, set[str]] = field(default_factory=dict)  # removed owners that still hold a key: hand-off due
    _life: Counter[str] = field(default_factory=Counter)  # per node: registrations ended + crashes (*acks*)
    _by_epoch: dict[int, SlotMap] = field(default_factory=dict)  # every published map
    acks_checked: int = 0  # owners the *acks* invariant found holding a write when it was acknowledged

    def __post_init__(self) -> None:
        w = self.world
        self._nodes_prefix = nodes_prefix(w.cluster)
        self._drain_prefix = drain_prefix(w.cluster)
        self._slotmap_key = slotmap_key(w.cluster)
        w.etcd.watchers.append(self._on_commit)

    def violation(self, kind: str, message: str, key: bytes | None = None) -> None:
        if key is not None:  # one violation per lost key (later maps repeat it)
            if key in self._lost:
                return
            self._lost.add(key)
        v = Violation(self.world.loop.now, kind, message)
        self.violations.append(v)
        self.world.trace("CHECK", str(v))

    # -- who holds what
    def _holders(self, key: bytes, version: int) -> list[str]:
        """Live nodes that hold ``key`` at ``version`` or newer."""
        return [n.id for n in self.world.node_list if self._holds(n.id, key, version)]

    def _row_holders(self, key: bytes, version: int, slot: int) -> list[str]:
        """Live, registered nodes of the slot's row (owners and destinations) that hold it."""
        row = self._map.table[slot] if self._map is not None else ()
        return [n for n in row if n in self._registered and self._holds(n, key, version)]

    def _excuse_lost(self, why: str) -> None:
        for key, (version, slot) in self.ledger.items():
            if key not in self.excused and not self._row_holders(key, version, slot):
                self.excused[key] = why
                self.world.trace("CHECK", f"excused {key!r} v{version}: {why}")

    # -- events
    def write_begins(self) -> dict[str, int]:
        """What *acks* needs from a write's start: the registered, running nodes and their life counts."""
        return {n: self._life[n] for n in self._registered if self.world.nodes[n].alive}

    def acked(self, key: bytes, version: int, slot: int, delete: bool = False, *,
              began: dict[str, int] | None = None, epoch: int | None = None) -> None:
        if began is not None and epoch in self._by_epoch and self.world.scenario.acks_all:
            self._every_live_owner(key, version, slot, began, self._by_epoch[epoch])
        if delete and self.deletes.get(key, 0) < version:
            self.deletes[key] = version
        old = self.ledger.get(key)
        if old is None or old[0] < version:
            self.ledger[key] = (version, slot)
            self.excused.pop(key, None)
            if not self._row_holders(key, version, slot):
                self.excused[key] = "the replicas that stored it were gone when the write was acknowledged"

    def _every_live_owner(self, key: bytes, version: int, slot: int, began: dict[str, int], sm: SlotMap) -> None:
        """*acks*: an acknowledged write is on every owner (and destination) of its slot in the
        client's map (of the write's last attempt) whose lease and process lasted the whole write and
        that still is one."""
        now = self._map.table[slot] if self._map is not None else ()
        for n in sm.table[slot]:
            if n not in began or began[n] != self._life[n] or n not in self._registered:
                continue
            if n not in now:
                continue  # a later map moved the slot away from it (it handed the slot over first: *map*)
            if not self._holds(n, key, version):
                self.violation("acks", f"acknowledged {key!r} v{version} (acks = all) is not on {n}, an owner of slot "
                                       f"{slot} in the client's map (epoch {sm.epoch}) registered and running for "
                                       f"the whole write; holders {self._holders(key, version)}", key)
                return
            self.acks_checked += 1

    def deleted_keys(self) -> list[bytes]:
        """Keys whose newest acknowledged write is a delete."""
        return [k for k, v in self.deletes.items() if self.ledger[k][0] == v]

    def read(self, key: bytes, found: Value | None, asked: list[str]) -> None:
        d = self.deletes.get(key, 0)
        if found is None or found.version >= d or key in self.excused:
            return
        self.resurrected += 1
        self.violation("resurrected", f"a read of {key!r} returned v{found.version}, deleted as of v{d} "
                                      f"(acknowledged); replicas asked {asked}, holding "
                                      f"{self._states(key)}", key)

    def _states(self, key: bytes) -> dict[str, str]:
        out = {}
        for n in self.world.node_list:
            v = n.data.get(key)
            if v is not None:
                out[n.id] = ("tomb " if v.tomb else "") + f"v{v.version}" + ("" if n.alive else " (down)")
        return out

    def node_down(self, node: SimNode, lost: dict[bytes, Value]) -> None:
        """``node`` crashed or stopped; ``lost``: the values that went with it (a volatile node's)."""
        self._life[node.id] += 1
        self._excuse_lost(f"{node.id} went down and no other live node of the slot held it")
        if not lost or self._map is None:
            return
        # A volatile node that comes back before its lease expires keeps its place in the map
        # without its data: the control plane cannot see that loss (a node's registration does
        # not say whether its data survived). What no other owner held is gone as far as the
        # map can tell.
        for key, v in lost.items():
            a = self.ledger.get(key)
            if a is None or v.version < a[0] or key in self.excused:
                continue
            s = a[1]
            pend = self._map.pending.get(s, ())
            if not any(n not in pend and n in self._registered and self._holds(n, key, a[0])
                       for n in self._map.table[s]):
                self.excused[key] = f"{node.id} lost it in a crash (volatile) and no other owner held it"

    def gone_for_good(self, node: SimNode) -> None:
        """*exposed*: ``node`` is about to leave for good (stop, or a crash it never restarts from);
        what it alone holds is lost. In an ``acks = "all"``
        namespace with R >= 2 that is a violation when the slot's row was otherwise whole."""
        sc = self.world.scenario
        if not sc.acks_all or sc.replicas < 2 or self._map is None:
            return
        sm = self._map
        want = min(sc.replicas, len(self._members | {node.id}))
        for key, (version, slot) in self.ledger.items():
            if key in self.excused or self._survivors(key, version) != [node.id]:
                continue
            pend = sm.pending.get(slot, ())
            own = [n for n in sm.table[slot] if n not in pend]
            whole = len(own) >= max(2, want) and all(n in self._registered and self.world.nodes[n].alive
                                             for n in own if n != node.id)
            if whole and node.id in own:
                self.violation("exposed", f"{node.id} left for good with the only copy of acknowledged {key!r} "
                                          f"v{version} (acks = all) while slot {slot}'s owners {own} were otherwise "
                                          f"registered and running: one failure lost it", key)

    def freed(self, node: SimNode, values: list[tuple[bytes, Value]], how: str) -> None:
        for key, v in values:
            a = self.ledger.get(key)
            if a is None or v.version < a[0]:
                continue
            if key in self.excused:
                # Every copy the control plane knew of went down -- but a durable node that comes
                # back brings its copy back: destroying the last copy that survives anywhere is a loss.
                if not self._survivors(key, a[0]):
                    sm = node.view.state.slotmap
                    where = (f"epoch {sm.epoch}: row {sm.table[a[1]]}, pending {sm.pending.get(a[1], ())}"
                             if sm else "none")
                    self.violation("lost-by-" + how, f"{node.id} freed the last surviving copy of acknowledged "
                                                     f"key {key!r} v{a[0]} (slot {a[1]}; its map {where}; "
                                                     f"excused earlier: {self.excused[key]})", key)
                continue
            if not self._holders(key, a[0]):
                sm = node.view.state.slotmap
                where = (f"epoch {sm.epoch}: row {sm.table[a[1]]}, pending {sm.pending.get(a[1], ())}"
                         if sm else "none")
                self.violation("lost-by-" + how, f"{node.id} freed the last live copy of acknowledged key {key!r} "
                                                 f"v{a[0]} (slot {a[1]}; its map {where})", key)

    def _on_commit(self, rev: int, key: str, value: bytes | None) -> None:
        if key.startswith(self._nodes_prefix):
            nid = key[len(self._nodes_prefix):]
            if value is None:
                self._registered.discard(nid)
                self._life[nid] += 1
                self._excuse_lost(f"{nid}'s registration ended and no other node of the slot held it")
            else:
                self._registered.add(nid)
            self._members_changed(nid)
        elif key.startswith(self._drain_prefix):
            nid = key[len(self._drain_prefix):]
            (self._draining.add if value is not None else self._draining.discard)(nid)
            self._members_changed(nid)
        elif key == self._slotmap_key and value is not None:
            self._on_map(SlotMap.decode(value) if self.world.decoded is None
                         else self.world.decoded.slotmap(rev, value))

    def _members_changed(self, nid: str) -> None:
        members = frozenset(self._registered - self._draining)
        if members == self._members:
            return
        before, self._members = self._members, members
        if not self.counting:
            return
        s = self.world.scenario
        n = len(before)
        load = Counter(x for row in (self._last_owners or ()) for x in row)
        n2 = len(members)
        lo = s.slots * min(s.replicas, max(1, n2)) // max(1, n2)
        # members far below the new mean (compute_table's 3b: load < mean / 2) are topped up to it
        deficit = sum(lo - load[x] for x in members if x != nid and 2 * load[x] < lo)
        if nid in members and nid not in before:
            r, r2 = min(s.replicas, n), min(s.replicas, n + 1)
            allowance = 1.4 * s.slots * r2 / (n + 1) + s.slots * (r2 - r) + 2 + deficit
            kind = "join"
        else:
            r2 = min(s.replicas, max(1, n - 1))
            pending = sum(1 for p in (self._map.pending.values() if self._map is not None else ()) if nid in p)
            allowance = (load[nid] + pending + self._spread_debt(members) + 0.15 * s.slots * r2 / max(1, n - 1) + 3
                         + deficit)
            kind = "leave"
        self.allowance += allowance
        self.changes.append(Change(self.world.loop.now, kind, nid, n, allowance))

    def _spread_debt(self, members: frozenset[str]) -> int:
        """Rows of the current owners (those of ``members``) that share a zone or a host although
        ``members`` could spread them (``placement_faults``): after a leave, each takes one move
        that is not the leaver's -- a row that had to share a zone while the zones' sizes differed
        must spread once they no longer do (the placement invariant requires it)."""
        nodes = self.world.nodes
        rows = [tuple(n for n in row if n in members) for row in (self._last_owners or ())]
        return len(placement_faults(rows, {n: nodes[n].zone for n in members}, {n: nodes[n].host for n in members},
                                    replicas=self.world.scenario.replicas))

    def _on_map(self, sm: SlotMap) -> None:
        self.maps += 1
        self._by_epoch[sm.epoch] = sm
        last, self._map = self._map, sm
        previous = self._last_owners
        if previous is None or last is None or len(last.table) != len(sm.table):
            owners = tuple(frozenset(n for n in row if n not in sm.pending.get(s, ()))
                           for s, row in enumerate(sm.table))
        else:  # only the rows this map changed (a round touches few of 65 536)
            touched = {s for s, (a, b) in enumerate(zip(last.table, sm.table, strict=True)) if a != b}
            touched |= set(last.pending) | set(sm.pending)
            lst = list(previous)
            for s in touched:
                lst[s] = frozenset(n for n in sm.table[s] if n not in sm.pending.get(s, ()))
            owners = tuple(lst)
        if previous is not None and self.counting:
            added = sum(len(new - old) for old, new in zip(previous, owners, strict=True) if new is not old)
            self.moves += added
            if added and self.changes:
                self.changes[-1].moves += added
        self._last_owners = owners
        for key, (version, slot) in self.ledger.items():
            own = owners[slot]
            if key in self.excused:
                if previous is not None and previous[slot] != own:
                    self._orphan_check(sm, key, version, slot, previous[slot], own)
                continue
            if previous is not None and previous[slot] == own and key not in self._due:
                continue  # this map did not change the slot's owners (one may be down, not yet seen)
            if any(self._holds(n, key, version, on_disk=True) for n in own):
                self._due.pop(key, None)
                continue
            if any(self._holds(n, key, version) for n in sm.pending.get(slot, ())):
                continue  # the destination has it: it becomes an owner, or gives it back if the move is abandoned
            # owners that this or an earlier map removed and that still hold it hand it over when
            # they free the slot (DROP_SLOTS): until then the key is due, not lost
            removed = (previous[slot] - own) if previous is not None else frozenset()
            due = {n for n in removed | self._due.get(key, set()) if self._holds(n, key, version)}
            if due:
                self._due[key] = due
                continue
            self.violation("map", f"epoch {sm.epoch}: owners {sorted(own)} of slot {slot} lack acknowledged "
                                  f"key {key!r} v{version} (held by {self._holders(key, version)})", key)

    def _orphan_check(self, sm: SlotMap, key: bytes, version: int, slot: int, before: frozenset[str],
                      own: frozenset[str]) -> None:
        """*orphan*: a slot whose owners are all gone (unregistered), given by this map to owners that lack an
        excused key (every copy the control plane knew of went down) while a node that holds it on
        its disk is down and comes back. The map must keep the slot with its owners until one of
        them is back (the rebalancer's grace), not hand it to nodes holding nothing of it -- a live
        migration destination that becomes an owner (it holds every write since its move began)
        included: the owners stay beside it."""
        if any(n in self._registered for n in before):
            return
        if not own <= self._registered:
            return  # decided on a view where these owners were still registered: the next map holds the slot
        survivors = self._survivors(key, version)
        if own & set(survivors):  # (an owner that is down holds it on its disk: it serves it once back)
            return
        if any(self._holds(n, key, version) for n in sm.pending.get(slot, ())):
            return
        down = [n for n in survivors if not self.world.nodes[n].alive]
        if down:
            self.violation("orphan", f"epoch {sm.epoch}: slot {slot} given to {sorted(own)}, which lack acknowledged "
                                  f"key {key!r} v{version}, while {down} (down, durable, coming back) hold it", key)

    def stopping_drained(self, node: SimNode) -> None:
        """The operator stops a node ``memkv drain`` said can be stopped: it must not hold the last
        copy of anything."""
        for key, (version, slot) in self.ledger.items():
            if key in self.excused or not self._holds(node.id, key, version) or self._map is None:
                continue
            pend = self._map.pending.get(slot, ())
            if not any(n != node.id and n not in pend and self._holds(n, key, version) for n in self._map.table[slot]):
                self.violation("lost-by-drain", f"{node.id} was drained and stopped holding the only copy of "
                                                f"acknowledged key {key!r} v{version} (slot {slot})", key)

    def _survivors(self, key: bytes, version: int) -> list[str]:
        """Nodes whose data holds ``key`` at ``version`` or newer, alive or down but coming back (a
        durable node keeps its data across a crash; a volatile one's is gone already)."""
        return [n.id for n in self.world.node_list if (n.alive or n.id not in self.world.retired)
                and (v := n.data.get(key)) is not None and v.version >= version]

    def _holds(self, node_id: str, key: bytes, version: int, *, on_disk: bool = False) -> bool:
        """Whether ``node_id`` is alive and holds ``key`` at ``version`` or newer; with ``on_disk``,
        also when it is down but still registered with its data on flash (the control plane rightly
        counts on it: it comes back with its data)."""
        n = self.world.nodes.get(node_id)
        if n is None or not (n.alive or (on_disk and n.durable and node_id in self._registered)):
            return False
        v = n.data.get(key)
        return v is not None and v.version >= version

    # -- at the end
    def final(self, sm: SlotMap) -> dict[str, Any]:
        behind = 0
        for key, (version, slot) in sorted(self.ledger.items()):
            row = sm.table[slot]
            held = [n for n in row if self._holds(n, key, version)]
            if key in self.excused:
                # excused: its copies went down with their nodes. A durable node that came back
                # brought its copy back; the owners must have it once the map has converged.
                if not held and self._holders(key, version):
                    self.violation("final", f"no owner {list(row)} of slot {slot} holds acknowledged key {key!r} "
                                            f"v{version} after convergence; {self._holders(key, version)} came back "
                                            f"with it (excused earlier: {self.excused[key]})", key)
                continue
            if not held:
                self.violation("final", f"no owner {list(row)} of slot {slot} holds acknowledged key {key!r} "
                                        f"v{version} after convergence", key)
            behind += len(row) - len(held)
        if self.moves > self.allowance:
            self.violation("moves", f"{self.moves} ownerships moved for {len(self.changes)} membership changes, "
                                    f"allowed {self.allowance:.1f}: " + ", ".join(
                                        f"{c.kind} {c.node} at N={c.members_before} (+{c.allowance:.1f}, "
                                        f"moved {c.moves})" for c in self.changes))
        nodes = self.world.nodes
        faults = placement_faults(sm.table, sm.members, {n: nodes[n].host for n in sm.members}, replicas=sm.replicas)
        if faults:
            self.violation("placement", f"{len(faults)} rows of the converged map share a zone or a host while a "
                                        f"member with room elsewhere would spread them more: slots {faults[:8]}")
        return {"placement": placement(sm.table, {n: v.zone for n, v in nodes.items()},
                                       {n: v.host for n, v in nodes.items()}),
                "acked_keys": len(self.ledger), "excused": len(self.excused), "replicas_behind": behind,
                "acked_deletes": len(self.deletes), "acks_checked": self.acks_checked,
                "moves": self.moves, "allowance": round(self.allowance, 1), "changes": len(self.changes),
                "maps": self.maps}
