"""Slot map computation: members (+ the previous map) -> slot -> R replicas. Pure functions.

The placement is consistent hashing with bounded loads, made sticky by the
previous map:

1. Keep every assignment of the previous map whose node is still a member
   (replica lists are compacted, so a surviving replica moves up to primary:
   the node that has the data serves the reads).
2. Fill the empty replica positions by walking the ring (``memkv.cluster.ring``)
   clockwise from the slot's point, taking the first node that is not full
   (load < ceil(mean) + 1.5%) and, when possible, is in a zone the slot does not use yet.
3. Balance: a node far below the mean (a newcomer) takes slots from the
   most loaded nodes, preferring the slots whose ring point lies closest
   before its own points; then nodes still above 1.08 x the mean (the mean
   fell because nodes joined) give slots to the least loaded nodes.

So the most loaded node holds at most ~1.016 x the mean (1.08 x after
nodes joined, when moving less is worth more), adding a node moves
about S*R/(N+1) ownerships (all to the newcomer), and removing a node moves
only that node's ownerships. New replicas are appended at the end of a
slot's list (primary first = the replica most likely to hold the data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from memkv.client.cluster_map import DEFAULT_SLOTS, SlotMap
from memkv.cluster.ring import VNODES, Ring, slot_points


class _Alive:
    """Ring positions of nodes that are not full, with "next alive position" jumps."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.size = len(ring)
        self.parent = list(range(self.size + 1))
        self.alive_nodes = set(ring.members)
        self._positions: dict[str, list[int]] = {}
        for i, n in enumerate(ring.owners):
            self._positions.setdefault(n, []).append(i)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def next_alive(self, i: int) -> int | None:
        if not self.alive_nodes:
            return None
        j = self.find(i)
        if j == self.size:
            j = self.find(0)
        return None if j == self.size else j

    def kill(self, node: str) -> None:
        if node in self.alive_nodes:
            self.alive_nodes.discard(node)
            for i in self._positions.get(node, ()):
                self.parent[i] = i + 1


def _zone_ok(members: Mapping[str, str], cand: str, others: Sequence[str], victim: str | None) -> bool:
    zones = {members[o] for o in others}
    return members[cand] not in zones or (victim is not None and members[victim] in zones)


def compute_table(members: Mapping[str, str], *, slots: int = DEFAULT_SLOTS, replicas: int = 1,
                  prev: Sequence[Sequence[str]] | None = None, vnodes: int = VNODES,
                  newcomers: Collection[str] = ()) -> list[tuple[str, ...]]:
    """slot -> replica node ids (primary first) for ``members`` (node id -> zone).

    ``newcomers``: members that joined since the map ``prev`` was last balanced for (the
    rebalancer passes the members its map does not list yet). They take slots up to the mean even
    when a part of their share has already moved to them: computed again half-way through a join
    (after each round), the target still gives them their whole share."""
    ids = sorted(members)
    if not ids:
        return [() for _ in range(slots)]
    if prev is not None and len(prev) != slots:
        raise ValueError("the previous map has another slot count")
    r_eff = min(replicas, len(ids))
    total = slots * r_eff
    # A little slack over ceil(mean) keeps the greedy fill from getting stuck
    # (forced to exceed the bound, then moving more than it must).
    cap = -(-total // len(ids))
    cap += max(1, cap // 64)
    lo = total // len(ids)
    ring = Ring(members, vnodes)
    points = slot_points(slots)

    # 1. keep what survives
    table: list[list[str]] = []
    for s in range(slots):
        row: list[str] = []
        for n in prev[s] if prev is not None else ():
            if n in members and n not in row:
                row.append(n)
        table.append(row[:r_eff])
    load: Counter[str] = Counter({n: 0 for n in ids})
    for row in table:
        load.update(row)

    # Nodes above ``hard`` (nodes were added and the mean fell, or the fill had to exceed the
    # bound) are rebalanced by 3a; below it, leaving them be saves moves.
    hard = max(cap, int(total / len(ids) * 1.08))

    # 2. fill empty positions: ring walk, bounded load, zone-aware
    all_zones = set(members.values())
    alive = _Alive(ring)
    filled: set[tuple[int, str]] = set()  # positions this computation filled (moving them again costs nothing)
    for n in ids:
        if load[n] >= cap:
            alive.kill(n)
    for s in range(slots):
        row = table[s]
        while len(row) < r_eff:
            pick = None
            used_zones = {members[n] for n in row}
            for want_new_zone in ((True, False) if used_zones != all_zones else (False,)):
                i = alive.next_alive(ring.start(points[s]))
                steps = 0
                while i is not None and steps < alive.size:
                    n = ring.owners[i]
                    if n not in row and (not want_new_zone or members[n] not in used_zones):
                        pick = n
                        break
                    steps += 1
                    i = alive.next_alive(i + 1)
                if pick is not None:
                    break
            if pick is None:  # everyone eligible is full: exceed the bound rather than under-replicate
                pick = min((n for n in ids if n not in row), key=lambda n: (load[n], n))
            row.append(pick)
            filled.add((s, pick))
            load[pick] += 1
            if load[pick] >= cap:
                alive.kill(pick)

    def move(s: int, victim: str, thief: str) -> None:
        row = table[s]
        row.remove(victim)
        row.append(thief)
        load[victim] -= 1
        load[thief] += 1

    # 3b. newcomers (far below the mean, or named) take slots from the most loaded nodes
    for u in sorted(ids, key=lambda n: (load[n], n)):
        if load[u] * 2 >= lo and u not in newcomers:
            continue
        order = sorted(range(slots), key=lambda s: (ring.distance_to(u, points[s]), s))
        for s in order:
            if load[u] >= lo:
                break
            row = table[s]
            if u in row:
                continue
            victims = [n for n in row if load[n] > lo]
            if not victims:
                continue
            victim = max(victims, key=lambda n: (load[n], n))
            if _zone_ok(members, u, [n for n in row if n != victim], victim):
                move(s, victim, u)
    # 3a. nodes over the bound (it shrank: nodes were added; or the fill had to exceed it) give
    #     slots to the least loaded eligible node. Done after the fill, so that the result is a
    #     fixed point: computing again from it changes nothing (else every round of the
    #     rebalancer would find a little more to move).
    for o in sorted(n for n in ids if load[n] > hard):
        # the fill's own choices first: giving such a position to another node is no extra move
        for s in sorted((s for s in range(slots) if o in table[s]), key=lambda s: ((s, o) not in filled, points[s])):
            if load[o] <= cap:
                break
            others = [n for n in table[s] if n != o]
            cands = [n for n in ids if load[n] < cap and n not in table[s]
                     and _zone_ok(members, n, others, o)]
            if cands:
                move(s, o, min(cands, key=lambda n: (load[n], ring.distance_to(n, points[s]), n)))

    _balance_primaries(table, ids)
    return [tuple(row) for row in table]


def _balance_primaries(table: list[list[str]], ids: list[str]) -> None:
    """4. Primaries (first replica: where reads go) about as even as ownerships.

    Rows are only reordered (no ownership moves, so the movement bounds hold): a node
    holding more than ceil(mean) + 1.5% primaries hands rows to the least loaded other
    replica of the row, in slot order. Sticky: a balanced previous map is left as it is,
    so ``compute_table(prev=compute_table(...))`` changes nothing."""
    rows = [row for row in table if len(row) > 1]
    if not rows:
        return
    prim: Counter[str] = Counter({n: 0 for n in ids})
    prim.update(row[0] for row in table if row)
    n_rows = sum(1 for row in table if row)
    cap = -(-n_rows // len(ids))
    cap += max(1, cap // 64)
    for row in rows:
        p = row[0]
        if prim[p] <= cap:
            continue
        q = min(row[1:], key=lambda n: (prim[n], n))
        if prim[q] + 1 >= prim[p] or prim[q] >= cap:
            continue
        row.remove(q)
        row.insert(0, q)
        prim[p] -= 1
        prim[q] += 1


def compute_slot_map(members: Mapping[str, str], *, slots: int = DEFAULT_SLOTS, replicas: int = 1,
                     prev: SlotMap | None = None, vnodes: int = VNODES) -> SlotMap:
    """The next slot map (epoch = prev.epoch + 1, or 1 for a new cluster)."""
    if prev is not None:
        slots = prev.slots
    table = compute_table(members, slots=slots, replicas=replicas,
                          prev=prev.table if prev is not None else None, vnodes=vnodes)
    return SlotMap((prev.epoch + 1) if prev is not None else 1, slots, replicas, tuple(table), dict(members))


def moved_ownerships(old: Sequence[Sequence[str]], new: Sequence[Sequence[str]]) -> int:
    """How many (slot, node) ownerships ``new`` adds relative to ``old``."""
    return sum(len(set(b) - set(a)) for a, b in zip(old, new, strict=True))
