"""Slot map computation: members (+ the previous map) -> slot -> R replicas. Pure functions.

The placement is consistent hashing with bounded loads, made sticky by the
previous map:

1. Keep every assignment of the previous map whose node is still a member
   (replica lists are compacted, so a surviving replica moves up to primary:
   the node that has the data serves the reads).
2. Fill the empty replica positions by walking the ring (``memkv.cluster.ring``)
   clockwise from the slot's point, taking the first node that is not full
   (load < ceil(mean) + 1.5%) and, when possible, is in a zone the slot does not use yet,
   else on a host it does not use yet (two-level placement: ``hosts``).
3. Balance: a node far below the mean (a newcomer) takes slots from the
   most loaded nodes, preferring the slots whose ring point lies closest
   before its own points; then nodes still above 1.08 x the mean (the mean
   fell because nodes joined) give slots to the least loaded nodes. No such
   move lowers a row's spread (its distinct zones, its distinct hosts).
4. Spread: a row whose replicas share a zone (or a host) while a node with room
   (below the load bound) in another zone (or on another host) could take one of them
   gives that replica to it. So two replicas of a slot share a host only when every
   node of every other host the row could use is full ("never two replicas on one
   host while another host has room"); with hosts of equal size, never.

So the most loaded node holds at most ~1.016 x the mean (1.08 x after
nodes joined, when moving less is worth more), adding a node moves
about S*R/(N+1) ownerships (all to the newcomer), and removing a node moves
only that node's ownerships. New replicas are appended at the end of a
slot's list (primary first = the replica most likely to hold the data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

from memkv.client.cluster_map import DEFAULT_SLOTS, NodeInfo, SlotMap
from memkv.cluster.ring import VNODES, Ring, slot_points

# rounds of balancing and spreading (3, 4) at most; they end long before (a round that moves
# nothing ends them), this only bounds a computation on input nobody foresaw
MAX_BALANCE_ROUNDS = 16


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


class Topology:
    """Where members are: node id -> zone, node id -> host. A node without a host is a host of its
    own (a node per machine, as before hosts were registered)."""

    def __init__(self, zones: Mapping[str, str], hosts: Mapping[str, str] | None) -> None:
        self.zone = zones
        self.host = {n: (hosts or {}).get(n) or f"\0{n}" for n in zones}
        self.zones = len(set(zones.values()))
        self.hosts = len(set(self.host.values()))

    def spread(self, row: Sequence[str]) -> tuple[int, int]:
        """(distinct zones, distinct hosts) of a row."""
        return len({self.zone[n] for n in row}), len({self.host[n] for n in row})

    def ideal(self, size: int) -> tuple[int, int]:
        """The best spread a row of ``size`` replicas can have over these members."""
        return min(size, self.zones), min(size, self.hosts)

    def swap_ok(self, cand: str, others: Sequence[str], victim: str | None) -> bool:
        """Replacing ``victim`` by ``cand`` in the row ``others + [victim]`` spreads it no less, in
        zones and in hosts (a newly filled position has no victim: any candidate is fine)."""
        if victim is None:
            return True
        a, b = self.spread([*others, cand]), self.spread([*others, victim])
        return a[0] >= b[0] and a[1] >= b[1]

    def improves(self, cand: str, others: Sequence[str], victim: str) -> bool:
        """Replacing ``victim`` by ``cand`` spreads the row more (and in neither level less)."""
        a, b = self.spread([*others, cand]), self.spread([*others, victim])
        return a[0] >= b[0] and a[1] >= b[1] and a != b


def hosts_of(nodes: Mapping[str, NodeInfo], members: Collection[str] | None = None) -> dict[str, str]:
    """Node id -> registered host of ``nodes`` (those of ``members``, default all) that registered one."""
    return {n: info.host for n, info in nodes.items() if info.host and (members is None or n in members)}


def load_cap(members: int, slots: int, replicas: int) -> int:
    """The load bound: ceil(mean) ownerships per member, plus 1.5 % (at least 1). A little slack
    over ceil(mean) keeps the greedy fill from getting stuck (forced to exceed the bound, then
    moving more than it must). A node below it has *room*."""
    cap = -(-slots * min(replicas, members) // members)
    return cap + max(1, cap // 64)


def placement_faults(table: Sequence[Sequence[str]], members: Mapping[str, str],
                     hosts: Mapping[str, str] | None = None, *, replicas: int | None = None) -> list[int]:
    """Slots whose row breaks the placement rule: its replicas share a zone (or a host) while a
    member with room (``load_cap``) outside the row would spread it more in place of one of them
    -- in zones first, then in hosts, never fewer of either. The rule in words: distinct zones
    when possible, else distinct hosts; never two replicas on one host while another host has
    room. (The test of ``compute_table``'s output, and an invariant of the control-plane
    simulator; ``replicas``: the map's R, default the longest row.)"""
    if not members:
        return []
    topo = Topology(members, hosts)
    r = replicas if replicas is not None else max((len(row) for row in table), default=1)
    cap = load_cap(len(members), len(table), r)
    load: Counter[str] = Counter(n for row in table for n in row)
    room = [n for n in sorted(members) if load[n] < cap]
    out = []
    for s, row in enumerate(table):
        if len(row) < 2 or topo.spread(row) == topo.ideal(len(row)):
            continue
        if any(topo.improves(u, [x for x in row if x != v], v) for u in room if u not in row for v in row):
            out.append(s)
    return out


def compute_table(members: Mapping[str, str], *, slots: int = DEFAULT_SLOTS, replicas: int = 1,
                  prev: Sequence[Sequence[str]] | None = None, vnodes: int = VNODES,
                  newcomers: Collection[str] = (), hosts: Mapping[str, str] | None = None) -> list[tuple[str, ...]]:
    """slot -> replica node ids (primary first) for ``members`` (node id -> zone) on ``hosts`` (node
    id -> host: the workers of one ``memkv serve --workers N`` share one; default: every node its own).

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
    cap = load_cap(len(ids), slots, replicas)
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

    # 2. fill empty positions: ring walk, bounded load; a new zone first, else a new host
    topo = Topology(members, hosts)
    zone_of, host_of = topo.zone, topo.host
    all_zones, all_hosts = set(members.values()), set(host_of.values())
    alive = _Alive(ring)
    filled: set[tuple[int, str]] = set()  # positions this computation filled (moving them again costs nothing)
    for n in ids:
        if load[n] >= cap:
            alive.kill(n)
    for s in range(slots):
        row = table[s]
        while len(row) < r_eff:
            pick = None
            used_zones = {zone_of[n] for n in row}
            used_hosts = {host_of[n] for n in row}
            levels = [lvl for lvl, possible in ((2, used_zones != all_zones), (1, used_hosts != all_hosts),
                                                (0, True)) if possible]
            for level in levels:
                i = alive.next_alive(ring.start(points[s]))
                steps = 0
                while i is not None and steps < alive.size:
                    n = ring.owners[i]
                    if n not in row and (level == 0 or (host_of[n] not in used_hosts and (
                            level == 1 or zone_of[n] not in used_zones))):
                        pick = n
                        break
                    steps += 1
                    i = alive.next_alive(i + 1)
                if pick is not None:
                    break
            if pick is None:  # everyone eligible is full: exceed the bound rather than under-replicate
                pick = min((n for n in ids if n not in row),
                           key=lambda n: (zone_of[n] in used_zones, host_of[n] in used_hosts, load[n], n))
            row.append(pick)
            filled.add((s, pick))
            load[pick] += 1
            if load[pick] >= cap:
                alive.kill(pick)

    moves = 0

    def move(s: int, victim: str, thief: str) -> None:
        nonlocal moves
        row = table[s]
        row.remove(victim)
        row.append(thief)
        load[victim] -= 1
        load[thief] += 1
        filled.add((s, thief))
        moves += 1

    def take() -> None:
        """3b. newcomers (far below the mean, or named) take slots from the most loaded nodes."""
        for u in sorted(ids, key=lambda n: (load[n], n)):
            if load[u] >= lo or (load[u] * 2 >= lo and u not in newcomers):
                continue
            order = sorted(range(slots), key=lambda s: (ring.distance_to(u, points[s]), s))
            for s in order:
                if load[u] >= lo:
                    break
                row = table[s]
                if u in row:
                    continue
                # the most loaded replica it may replace without spreading the row less (one whose
                # replacement spreads it more first)
                victims = [n for n in row if load[n] > lo and topo.swap_ok(u, [x for x in row if x != n], n)]
                if victims:
                    move(s, max(victims, key=lambda n: (topo.improves(u, [x for x in row if x != n], n), load[n],
                                                        n)), u)

    def give() -> None:
        """3a. nodes over the bound (it shrank: nodes were added; or the fill had to exceed it) give
        slots to the least loaded eligible node."""
        for o in sorted(n for n in ids if load[n] > hard):
            # the fill's own choices first: giving such a position to another node is no extra move
            for s in sorted((s for s in range(slots) if o in table[s]),
                            key=lambda s: ((s, o) not in filled, points[s])):
                if load[o] <= cap:
                    break
                others = [n for n in table[s] if n != o]
                cands = [n for n in ids if load[n] < cap and n not in table[s] and topo.swap_ok(n, others, o)]
                if cands:
                    move(s, o, min(cands, key=lambda n: (not topo.improves(n, others, o), load[n],
                                                         ring.distance_to(n, points[s]), n)))

    # 3 and 4 in rounds until a round moves nothing, so that the result is a fixed point: computing
    # again from it changes nothing (else every round of the rebalancer would find a little more to
    # move). They end: each move of 3a/3b evens loads without spreading any row less, each of 4
    # spreads a row more.
    for _ in range(MAX_BALANCE_ROUNDS):
        before = moves
        take()
        give()
        _spread_pass(table, topo, load, cap, ring, points, move, filled)
        if moves == before:
            break

    _balance_primaries(table, ids)
    return [tuple(row) for row in table]


def _spread_pass(table: list[list[str]], topo: Topology, load: Counter[str], cap: int, ring: Ring,
                 points: Sequence[int], move: Callable[[int, str, str], None], filled: set[tuple[int, str]]) -> None:
    """4. A row below its ideal spread gives a replica that shares a zone or a host with another
    to a node with room (load < cap) that spreads it more: the first such node clockwise from the
    slot's point, so that the choice is as sticky as the fill's; the replica given is one this
    computation placed if any (moving it again costs nothing). Rows at their ideal, and rows no
    node with room can improve (hosts and zones with room are counted, so that this is known
    before any walk), cost a set comprehension each."""
    if topo.zones == 1 and topo.hosts == len(topo.zone):
        return  # one zone, every node its own host: every row is at its ideal
    room_hosts: Counter[str] = Counter()
    room_zones: Counter[str] = Counter()
    alive = _Alive(ring)
    for n in topo.zone:
        if load[n] < cap:
            room_hosts[topo.host[n]] += 1
            room_zones[topo.zone[n]] += 1
        else:
            alive.kill(n)
    for s, row in enumerate(table):
        if len(row) < 2:
            continue
        ideal = topo.ideal(len(row))
        while room_hosts:
            zones = {topo.zone[n] for n in row}
            hosts = {topo.host[n] for n in row}
            if (len(zones), len(hosts)) == ideal:
                break
            if not (len(zones) < ideal[0] and any(z not in zones for z in room_zones)) and \
                    not (len(hosts) < ideal[1] and any(h not in hosts for h in room_hosts)):
                break  # no node with room in another zone or on another host
            pick = None
            # what this computation placed first (moving it again costs nothing), the primary last
            # (reads go there), the most loaded first
            victims = sorted(row, key=lambda n: ((s, n) not in filled, n == row[0], -load[n], n))
            i = alive.next_alive(ring.start(points[s]))
            steps = 0
            while i is not None and steps < alive.size and pick is None:
                n = ring.owners[i]
                if n not in row and (topo.zone[n] not in zones or topo.host[n] not in hosts):
                    for v in victims:
                        if topo.improves(n, [x for x in row if x != v], v):
                            pick = (v, n)
                            break
                steps += 1
                i = alive.next_alive(i + 1)
            if pick is None:
                break
            move(s, *pick)
            n = pick[1]
            if load[n] >= cap:
                alive.kill(n)
                for counter, key in ((room_hosts, topo.host[n]), (room_zones, topo.zone[n])):
                    counter[key] -= 1
                    if not counter[key]:
                        del counter[key]


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
                     prev: SlotMap | None = None, vnodes: int = VNODES,
                     hosts: Mapping[str, str] | None = None) -> SlotMap:
    """The next slot map (epoch = prev.epoch + 1, or 1 for a new cluster)."""
    if prev is not None:
        slots = prev.slots
    table = compute_table(members, slots=slots, replicas=replicas,
                          prev=prev.table if prev is not None else None, vnodes=vnodes, hosts=hosts)
    return SlotMap((prev.epoch + 1) if prev is not None else 1, slots, replicas, tuple(table), dict(members))


def moved_ownerships(old: Sequence[Sequence[str]], new: Sequence[Sequence[str]]) -> int:
    """How many (slot, node) ownerships ``new`` adds relative to ``old``."""
    return sum(len(set(b) - set(a)) for a, b in zip(old, new, strict=True))
