"""The rebalancer (docs/cluster.md): leader-elected, moves slots while the cluster serves.

This module is the rebalancer's state machine, written as sans-IO programs
(``memkv.cluster.effects``): every etcd access, node call and wait is a ``yield``, and the time
comes from an injected clock. ``memkv.cluster.rebalancer_run`` drives it in production (real etcd,
real node RPCs, a thread); ``memkv.cluster.sim`` drives the same code in a deterministic
simulation (in-memory etcd and nodes, simulated clock, injected faults).

One rebalancer leads per cluster: whoever creates ``/memkv/<c>/rebalancer/leader``
with its lease (every node runs a candidate unless ``[cluster] rebalancer =
false``; ``memkv rebalancer URL`` runs one as its own process with its own
lease). When the leader dies its lease expires and another candidate takes
over within about one lease TTL.

What it does, in a loop, from the state in etcd (nothing is kept in memory
that a new leader would need):

1. **Loss**: nodes whose lease expired are removed from every slot's replica
   list at once (they cannot serve; survivors move up to primary). A slot
   whose owners are all gone keeps its live migration destination as owner.
   And a slot whose owners are all gone keeps them too, for ``orphan_grace_s``
   (``[cluster] orphan_grace``), unavailable (or served by the promoted
   destination alone): their durable values are on their disks, and the first
   of them that comes back is an owner again at once, serving them and the
   source of the re-replication. Handing the slot to nodes that hold none of
   it instead (what the loss step did) answered reads of acknowledged durable
   writes with misses until the old owners were back *and* the next converged
   map's sweep had them hand their values over. Only once the grace has
   passed with none of them back do they leave the row (an empty row is then
   given to live nodes; the sweep still hands over whatever an old owner
   brings back later). The grace runs from when the leader first saw it, and
   a new leader starts it again.
2. **Target**: the slot map for the live, non-draining members
   (``memkv.cluster.slotmap.compute_table``, sticky to the current map).
3. **Rounds**: the slots whose target adds a replica are moved in rounds,
   sized by bytes (``throttle`` MB/s x ``ROUND_S``; empty slots cost nothing).
   A round:

   a. publishes the map with each moving slot's destination appended to its
      row and listed in ``pending`` (etcd transaction on the map's revision
      and on our leadership; epoch + 1). Clients now send every write of the
      slot to the old replicas *and* the destination ("double write"); reads
      still go to the old primary. A record ``migrations/<id>`` says what moves;
   b. copies: the source node pushes the slot's values to the destination
      (``MIGRATE_PUSH``, memkv/cluster/migration_job.py) chunk by chunk, throttled;
      the copy keeps write versions, so it never overwrites a double-written
      newer value; progress goes to the record. Then every other owner the
      flip will remove hands over what the destination still lacks (the same
      push with ``missing_only``: keys are compared, values move only where
      the replicas differ -- a write acknowledged while an owner was down);
   c. flips, in one etcd transaction guarded by the map's revision and our
      leadership (epoch + 1): the destination becomes a full replica and the
      replicas the target drops leave the row (never below R replicas);
   d. frees the old copies (``DROP_SLOTS`` on each node that left a row, once
      its own map has the flip) and deletes the record.

   If the destination dies (or leaves) mid-copy, the round drops it from the
   pending rows instead: the slot stays with its old owners.
4. **Resume**: a map that still has ``pending`` slots is an unfinished round
   of an earlier leader: the new leader copies them again (the same job id when
   the record is still there, so the source continues its cursor; else from
   the start, which is harmless: copies keep versions) and flips.

Drain: ``/memkv/<c>/drain/<node>`` (``memkv drain``) takes the node out of the
target; once no row names it, the node hands its values over to their owners and
frees them, and the record says ``freed`` (then it can be stopped); the key is
deleted once the node has left.

Idle, the leader waits for the cluster view to change (any key under ``/memkv/<c>/``: a node,
the map, a drain or throttle request) or for its next timer (membership settling, the back-off
after a failed round), at most ``IDLE_S``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memkv.client.cluster_map import SlotMap, leader_key, slotmap_key
from memkv.client.etcd import EtcdUnavailable
from memkv.cluster.effects import ETCD, NodeCall, Parallel, Program, Sleep, WaitView
from memkv.cluster.slotmap import compute_slot_map, compute_table, hosts_of
from memkv.errors import AuthError, MemKVError, NodeUnavailable, PermissionDenied
from memkv.protocol.opcodes import Op

log = logging.getLogger("memkv.rebalancer")

DEFAULT_MBPS = 200.0
# A round copies about this many seconds' worth at the throttle. Each round writes the slot map
# twice (pending, flip) and every node and client receives both: at 1 000 nodes x 65 536 slots
# 2 s rounds wrote 50 MB per join to each watcher, 60 s rounds 6 MB (docs/control-plane.md).
ROUND_S = 30.0
POLL_S = 0.2
IDLE_S = 1.0
SETTLE_S = 0.5
ORPHAN_GRACE_S = 30.0  # how long a slot whose owners are all gone waits for one of them (step 1)
RECORD_EVERY_S = 0.5
MAX_PUSH_FAILURES = 6
COPY_WORKERS = 8


def migrations_prefix(cluster: str) -> str:
    return f"/memkv/{cluster}/migrations/"


def drain_prefix(cluster: str) -> str:
    return f"/memkv/{cluster}/drain/"


def throttle_key(cluster: str) -> str:
    return f"/memkv/{cluster}/rebalancer/throttle"


def progress_key(cluster: str) -> str:
    return f"/memkv/{cluster}/rebalancer/progress"


@dataclass
class Move:
    slot: int
    src: str
    dst: str


@dataclass
class Group:
    src: str
    dst: str
    slots: list[int]
    bytes_total: int = 0
    bytes_done: int = 0
    values_done: int = 0
    done: bool = False
    failed: str | None = None
    finished: bool = False  # its copy program has ended (done, failed, or raised)
    handover: bool = False  # an owner that leaves the slots sends what the destination still lacks

    def to_json(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "slots": self.slots, "bytes_total": self.bytes_total,
                "bytes_done": self.bytes_done, "values_done": self.values_done, "done": self.done,
                "failed": self.failed, "handover": self.handover}


@dataclass
class Round:
    id: str
    epoch: int
    groups: list[Group]
    target: dict[int, tuple[str, ...]]
    started: float  # wall-clock seconds (the record is read by other processes: ``memkv status``)
    resumed: bool = False

    def record(self, leader: str, state: str, now: float) -> bytes:
        return json.dumps({"id": self.id, "leader": leader, "state": state, "epoch": self.epoch,
                           "started": self.started, "updated": now, "resumed": self.resumed,
                           "moves": [g.to_json() for g in self.groups]}).encode()


def under_replicated(sm: SlotMap, live: set[str]) -> int:
    want = min(sm.replicas, max(1, len(live)))
    n = 0
    for s, row in enumerate(sm.table):
        pend = sm.pending.get(s, ())
        if sum(1 for x in row if x in live and x not in pend) < want:
            n += 1
    return n


class Rebalancer:
    """One rebalancer candidate: :meth:`campaign` is its whole life, as a program.

    ``view``: the candidate's cache of the cluster (``.state``: a ``ClusterState``); ``lease``: the
    lease its leadership key is attached to (None while it has none); ``alive``: whether that lease
    is surely valid (a fenced node must not lead); ``clock``/``wall``: monotonic and wall-clock
    seconds (injected: the simulator runs this on simulated time); ``round_id``: new round ids;
    ``round_s``: the copying time a round is sized for (bytes = throttle x round_s): each round
    writes the slot map twice, so at scale fewer, longer rounds write far fewer bytes to etcd and
    its watchers (docs/control-plane.md)."""

    def __init__(self, view: Any, cluster: str, identity: str, *, lease: Callable[[], int | None],
                 alive: Callable[[], bool], mbps: float = DEFAULT_MBPS, slots: int = 4096, replicas: int = 1,
                 settle_s: float = SETTLE_S, round_s: float = ROUND_S, orphan_grace_s: float = ORPHAN_GRACE_S,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 round_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12]) -> None:
        self.view = view
        self.cluster = cluster
        self.identity = identity
        self.lease = lease
        self.alive = alive
        self.mbps = mbps
        self.slots = slots
        self.replicas = replicas
        self.settle_s = settle_s
        self.round_s = round_s
        self.orphan_grace_s = orphan_grace_s
        self.clock = clock
        self.wall = wall
        self.round_id = round_id
        # after a round that could not copy some slots (they stayed with their old owners): wait before retrying
        self._retry_at = 0.0
        self._failed_rounds = 0
        self.leading = False
        self._lease_held: int | None = None
        self._seen: Any = None
        self._seen_at = 0.0
        self._tlock = threading.Lock()  # production runs copy programs on threads: _next_t is shared
        self._next_t = 0.0
        self._target_key: Any = None
        self._target_val: list[tuple[str, ...]] = []
        self._target_from: list[frozenset[str]] = []
        self.bytes_moved = 0
        self.rounds = 0
        self._idle = False
        self._swept = 0  # the epoch of the last converged map every node was swept for
        # slot -> (when this leader first saw it without a live owner, the owners it keeps): step 1's grace
        self._orphaned: dict[int, tuple[float, tuple[str, ...]]] = {}
        self._departed: dict[int, dict[str, float]] = {}  # slot -> owners step 1 removed -> when

    # -- election
    def campaign(self) -> Program[None]:
        """Campaign for the leader key; lead while we hold it; campaign again. Never returns
        (the driver stops it)."""
        key = leader_key(self.cluster)
        while True:
            lease = self.lease()
            if lease is None or not self.alive():
                yield Sleep(POLL_S)
                continue
            try:
                mine = yield ETCD.create(key, self.identity, lease=lease)
                if not mine:
                    kv, _ = yield ETCD.get(key)
                    if kv is not None and kv.value.decode() == self.identity:
                        # Our name, but this campaign did not create it: an earlier life of this
                        # candidate (restarted within its old lease's TTL). Leading on it would tie
                        # our leadership to a lease that expires under us -- and nobody would
                        # campaign again. Remove it and campaign anew.
                        yield ETCD.delete_if(key, self.identity)
                        continue
            except EtcdUnavailable:
                yield Sleep(0.5)
                continue
            if not mine:
                yield Sleep(POLL_S * 2)
                continue
            # act only once our own view shows our leadership (still_leader requires it)
            if not (yield WaitView(lambda st: st.leader == self.identity, 2.0)):
                continue
            log.info("%s leads the rebalancer of cluster %s", self.identity, self.cluster)
            # (a leadership of ours that ended earlier may have left _idle set; records of rounds led
            # by others since then are cleared at the first idle step)
            self.leading, self._lease_held, self._idle = True, lease, False
            self._orphaned.clear()  # (an earlier leadership's clocks: the grace starts again, bounded)
            self._departed.clear()
            try:
                yield from self._lead()
            except Exception:  # noqa: BLE001 - keep campaigning whatever happens
                log.exception("rebalancer step failed")
                yield Sleep(0.5)
            finally:
                self.leading = False

    def still_leader(self) -> bool:
        """Our lease is the one we won with, it is valid, and the leader key (as our view last
        saw it) names us: a key that expired or was deleted ends the leadership."""
        if not self.alive() or self.lease() != self._lease_held:
            return False
        return bool(self.view.state.leader == self.identity)

    def _lead(self) -> Program[None]:
        while self.still_leader():
            seen = self.view.state.revision
            try:
                acted = yield from self.step()
            except EtcdUnavailable as exc:
                log.warning("rebalancer: etcd unavailable (%s)", exc.message)
                yield Sleep(0.5)
                continue
            if not acted:
                yield WaitView(lambda st, seen=seen: st.revision != seen, self._idle_wait())

    def _idle_wait(self) -> float:
        """Until the next timer of ours: membership settling, the back-off after a failed round, the
        end of a slot's grace (step 1)."""
        now = self.clock()
        graces = [since + self.orphan_grace_s for since, _ in self._orphaned.values()]
        timers = [t - now for t in (self._seen_at + self.settle_s, self._retry_at, *graces) if t > now]
        return max(POLL_S / 4, min([IDLE_S, *timers]))

    # -- etcd helpers
    def _publish(self, sm: SlotMap, revision: int) -> Program[bool]:
        ok = yield ETCD.put_if(slotmap_key(self.cluster), sm.encode(), mod_revision=revision,
                               guard=(leader_key(self.cluster), self.identity))
        if ok:
            yield WaitView(lambda st: st.epoch >= sm.epoch, 2.0)
        return bool(ok)

    def _read_map(self) -> Program[tuple[SlotMap | None, int]]:
        kv, _ = yield ETCD.get(slotmap_key(self.cluster))
        if kv is None:
            return None, 0
        return SlotMap.decode(kv.value), kv.mod_revision

    def _drains(self) -> Program[dict[str, dict[str, Any]]]:
        """Drain requests: node -> its record (``freed``: it has handed over and freed everything)."""
        kvs, _ = yield ETCD.get_prefix(drain_prefix(self.cluster))
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            try:
                rec = json.loads(kv.value)
            except ValueError:
                rec = None
            out[kv.key.rsplit("/", 1)[1]] = rec if isinstance(rec, dict) else {}
        return out

    def _sweep(self, sm: SlotMap) -> Program[None]:
        """Once the map has converged: every node frees what it holds of slots it does not own,
        handing the owners what they lack first (``DROP_SLOTS`` of every slot) -- values a failed
        free left behind, values of a node that came back after its slots had moved on. Done once
        per converged map (``progress.swept``), retried with the back-off if a node failed."""
        failed = []
        for node in sorted(self.view.state.nodes):
            try:
                yield from self._call(node, int(Op.DROP_SLOTS), {"slots": list(range(sm.slots)), "nslots": sm.slots,
                                                                  "epoch": sm.epoch})
            except MemKVError as exc:
                failed.append(f"{node}: {exc.message}")
        if failed:
            log.warning("rebalancer: sweeping the map of epoch %d failed on %s", sm.epoch, "; ".join(failed))
            self._failed_rounds += 1
            self._retry_at = self.clock() + min(30.0, 0.5 * 2 ** self._failed_rounds)
            return
        self._failed_rounds = 0
        if (yield from self._progress("idle", swept=sm.epoch)):
            self._swept = sm.epoch

    def _release(self, node: str, sm: SlotMap, rec: dict[str, Any]) -> Program[None]:
        """A drained node that owns no slot any more: it hands its values over to their slots'
        owners and frees them (``DROP_SLOTS`` of every slot); then its drain record says ``freed``
        and ``memkv drain`` tells the operator it can be stopped. (Stopping it as soon as the map
        no longer names it would lose the writes it alone took while the map was changing.)"""
        try:
            yield from self._call(node, int(Op.DROP_SLOTS), {"slots": list(range(sm.slots)), "nslots": sm.slots,
                                                              "epoch": sm.epoch})
        except MemKVError as exc:
            log.warning("rebalancer: drained node %s could not hand over and free its values: %s", node, exc.message)
            return
        yield ETCD.put(drain_prefix(self.cluster) + node, json.dumps({**rec, "freed": True, "epoch": sm.epoch}))

    def _throttle(self) -> Program[float]:
        try:
            kv, _ = yield ETCD.get(throttle_key(self.cluster))
            if kv is not None:
                return float(kv.value.decode())
        except (EtcdUnavailable, ValueError):
            pass
        return self.mbps

    def _progress(self, state: str, **extra: Any) -> Program[bool]:
        d = {"leader": self.identity, "state": state, "bytes_moved": self.bytes_moved, "rounds": self.rounds,
             "updated": self.wall(), **extra}
        try:
            yield ETCD.put(progress_key(self.cluster), json.dumps(d))
        except EtcdUnavailable:
            return False
        return True

    def _target(self, members: dict[str, str], sm: SlotMap, base: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """The target table for ``members``, sticky to ``base`` (remembered: the leader asks again
        at every change of the view, and the map rarely changed since). Members the map was not
        balanced for yet (``sm.members``) are newcomers: they get their whole share even when the
        target is computed again half-way through their join."""
        newcomers = frozenset(members) - frozenset(sm.members)
        hosts = hosts_of(self.view.state.nodes, members)
        key = (tuple(sorted(members.items())), tuple(sorted(hosts.items())), newcomers, sm.slots, sm.replicas)
        if key == self._target_key and self._on_the_way(base):
            return self._target_val  # rounds are moving the map towards it: keep it (same moves in total)
        self._target_val = compute_table(members, slots=sm.slots, replicas=sm.replicas, prev=base,
                                         newcomers=newcomers, hosts=hosts)
        self._target_key, self._target_from = key, [frozenset(r) for r in base]
        return self._target_val

    def _aim(self, members: dict[str, str], sm: SlotMap, base: list[tuple[str, ...]],
             held: dict[int, tuple[str, ...]]) -> list[tuple[str, ...]]:
        """The target, but a held slot (step 1) stays as it is: nothing moves for it while it waits
        for its owners, and the others' target is computed as if it had none."""
        if not held:
            return self._target(members, sm, base)
        target = list(self._target(members, sm, [() if s in held else row for s, row in enumerate(base)]))
        for s in held:
            target[s] = base[s]
        return target

    def _on_the_way(self, base: list[tuple[str, ...]]) -> bool:
        """Every row is still where the target was computed from, or already where it leads."""
        return len(base) == len(self._target_from) and all(
            (b := frozenset(row)) == self._target_from[s] or b == frozenset(self._target_val[s])
            for s, row in enumerate(base))

    # -- one step of the loop; True when it changed something
    def step(self) -> Program[bool]:
        st = self.view.state
        if not st.nodes:
            return False
        if st.slotmap is None:
            first = compute_slot_map({n: info.zone for n, info in st.nodes.items()}, slots=self.slots,
                                     replicas=self.replicas, hosts=hosts_of(st.nodes))
            return (yield from self._publish(first, 0))
        drains = yield from self._drains()
        st = self.view.state  # after the read: decisions on the freshest view (a node may have come back)
        live = {n: info.zone for n, info in st.nodes.items()}
        sm = st.slotmap
        if not live or sm is None:
            return False
        in_map = {n for row in sm.table for n in row}
        for n in sorted(set(drains) - set(live) - in_map):
            yield ETCD.delete(drain_prefix(self.cluster) + n)
        for n in sorted(set(drains) & set(live) - in_map):
            if not drains[n].get("freed"):
                yield from self._release(n, sm, drains[n])
        members = {n: z for n, z in live.items() if n not in drains} or dict(live)

        # 1. loss: dead nodes leave every row and every pending list at once -- but the owners of a
        # slot that has none left stay, within the grace (``held``: slot -> those owners)
        held = self._held(sm, live)
        if any(n not in live for n in in_map):
            table = tuple(held.get(s, ()) + tuple(n for n in row if n in live and n not in held.get(s, ()))
                          for s, row in enumerate(sm.table))
            pending = {s: p2 for s, p in sm.pending.items() if (p2 := tuple(n for n in p if n in live))}
            now = self.clock()
            for s, row in enumerate(sm.table):  # owners leaving a row that keeps a live owner: remembered
                if any(n in live for n in table[s] if n not in sm.pending.get(s, ())):
                    for n in row:
                        if n not in live and n not in sm.pending.get(s, ()):
                            self._departed.setdefault(s, {})[n] = now
            for s, p in list(pending.items()):
                if all(n in p for n in table[s] if n not in held.get(s, ())):
                    # every owner is gone: the destination becomes the owner. It has every write
                    # acknowledged since the move began (clients never skip a destination) and part
                    # of the copy: abandoning it would throw those away.
                    del pending[s]
            if table != sm.table or pending != sm.pending:
                lost = sorted(n for n in in_map if n not in live)
                log.info("rebalancer: nodes %s are gone; %d slots lose a replica%s", lost,
                         sum(1 for row in sm.table if any(n not in live for n in row)),
                         f"; {len(held)} slots lost every replica and keep their owners (unavailable) for up to "
                         f"{self.orphan_grace_s:g}s" if held else "")
                return (yield from self._publish(SlotMap(sm.epoch + 1, sm.slots, sm.replicas, table, sm.members,
                                                         pending), st.slotmap_revision))

        base = [tuple(n for n in row if n not in sm.pending.get(s, ())) for s, row in enumerate(sm.table)]
        target = self._aim(members, sm, base, held)

        if sm.pending:
            return (yield from self._resume(sm, st.slotmap_revision, base, target, members))

        if base == target:
            if sm.members != members:
                return (yield from self._publish(SlotMap(sm.epoch + 1, sm.slots, sm.replicas, sm.table, members),
                                                 st.slotmap_revision))
            if not self._idle:
                yield from self._clear_records()
                self._idle = True
            if self._swept != sm.epoch and self.clock() >= self._retry_at and not held:
                yield from self._sweep(sm)
            return False
        # let membership settle (several nodes starting together join in one plan)
        key = (frozenset(members.items()), frozenset(live))
        now = self.clock()
        if key != self._seen:
            self._seen, self._seen_at = key, now
            return False
        if now - self._seen_at < self.settle_s:
            return False
        if now < self._retry_at:  # the last round could not copy everything: back off before the next
            return False

        moves: list[Move] = []
        orphans: dict[int, tuple[str, ...]] = {}
        for s in range(sm.slots):
            adds = [n for n in target[s] if n not in base[s]]
            if not adds:
                continue
            if not base[s]:
                orphans[s] = target[s]  # every replica was lost (and the grace has passed): nothing to copy
                continue
            moves.append(Move(s, base[s][0], adds[0]))
        if orphans:
            table = list(sm.table)
            for s, row in orphans.items():
                table[s] = row
            log.warning("rebalancer: %d slots had no replica left for %gs; assigned empty (an old owner that "
                        "comes back hands its values over when it is swept)", len(orphans), self.orphan_grace_s)
            return (yield from self._publish(SlotMap(sm.epoch + 1, sm.slots, sm.replicas, tuple(table), sm.members),
                                             st.slotmap_revision))
        if not moves:  # only removals left (a replica over R, the last slots of a drained node)
            return (yield from self._remove(sm, st.slotmap_revision, target, members))
        return (yield from self._start_round(sm, st.slotmap_revision, moves, target, members, len(moves)))

    def _held(self, sm: SlotMap, live: dict[str, str]) -> dict[int, tuple[str, ...]]:
        """Slots that have no live owner (a live migration destination aside, which step 1 makes
        an owner beside them), for less than the grace: slot -> the owners its row keeps (step 1).
        Those are its owners that are gone and the ones that left its row within the grace (owners
        rarely go at the same instant: the first one's lease expires first, and it leaves the row
        while the other still looks alive) -- the ones among them that are back are owners again at
        once. The grace runs from when this leader first saw the slot without a live owner."""
        now = self.clock()
        for s in list(self._departed):
            left = self._departed[s]
            for n in [n for n, t in left.items() if now - t >= self.orphan_grace_s]:
                del left[n]
            if not left:
                del self._departed[s]
        held: dict[int, tuple[str, ...]] = {}
        for s, row in enumerate(sm.table):
            owners = tuple(n for n in row if n not in sm.pending.get(s, ()))
            rec = self._orphaned.get(s)
            if rec is None:
                if any(n in live for n in owners):
                    continue
                left = tuple(n for n in sorted(self._departed.get(s, {})) if n not in owners)
                if not owners and not left:
                    continue
                rec = self._orphaned[s] = (now, owners + left)
            since, keep = rec
            if now - since >= self.orphan_grace_s or any(n in live for n in owners):
                del self._orphaned[s]  # it has an owner again (one came back), or the grace has passed
                continue
            held[s] = keep
        return held

    def _call(self, node: str, op: int, meta: dict[str, Any]) -> Program[dict[str, Any]]:
        info = self.view.state.nodes.get(node)
        if info is None:
            raise NodeUnavailable(f"node {node} is not registered")
        return (yield NodeCall(info.addr, op, meta))  # type: ignore[no-any-return]

    def _slot_sizes(self, node: str, nslots: int) -> Program[dict[int, int]]:
        try:
            r = yield from self._call(node, int(Op.SLOT_SIZES), {"nslots": nslots})
        except MemKVError as exc:
            log.warning("rebalancer: slot sizes of %s: %s", node, exc.message)
            return {}
        return dict(zip(r["slots"], r["bytes"], strict=True))

    def _start_round(self, sm: SlotMap, revision: int, moves: list[Move], target: list[tuple[str, ...]],
                     members: dict[str, str], left: int) -> Program[bool]:
        mbps = yield from self._throttle()
        budget = int(mbps * 1e6 * self.round_s) if mbps > 0 else 1 << 30
        sizes: dict[str, dict[int, int]] = {}
        by_group: dict[tuple[str, str], list[Move]] = {}
        for m in moves:
            by_group.setdefault((m.src, m.dst), []).append(m)
        for src in sorted({m.src for m in moves}):
            sizes[src] = yield from self._slot_sizes(src, sm.slots)
        # interleave groups until the byte budget is used (empty slots are free)
        chosen: dict[tuple[str, str], list[int]] = {}
        used = 0
        queues = {g: list(ms) for g, ms in by_group.items()}
        while queues and used < budget:
            for g in list(queues):
                q = queues[g]
                # all empty slots of the group first, then one non-empty
                while q and sizes[g[0]].get(q[0].slot, 0) == 0:
                    chosen.setdefault(g, []).append(q.pop(0).slot)
                if q and used < budget:
                    m = q.pop(0)
                    chosen.setdefault(g, []).append(m.slot)
                    used += sizes[g[0]].get(m.slot, 0)
                if not q:
                    del queues[g]
        groups = [Group(src, dst, slots, sum(sizes[src].get(s, 0) for s in slots))
                  for (src, dst), slots in chosen.items()]
        table = list(sm.table)
        pending: dict[int, tuple[str, ...]] = {}
        for g in groups:
            for s in g.slots:
                table[s] = sm.table[s] + (g.dst,)
                pending[s] = (g.dst,)
        new = SlotMap(sm.epoch + 1, sm.slots, sm.replicas, tuple(table), sm.members, pending)
        # asking the sources took time: a node that joined, left or was drained meanwhile makes this plan stale
        drains = set((yield from self._drains()))
        now_live = {n: info.zone for n, info in self.view.state.nodes.items()}
        if ({n: z for n, z in now_live.items() if n not in drains} or now_live) != members:
            log.info("rebalancer: membership changed while planning a round; planning again")
            return True
        rnd = Round(self.round_id(), new.epoch, groups, {s: target[s] for s in pending}, self.wall())
        if not (yield from self._put_record(migrations_prefix(self.cluster) + rnd.id,
                                            rnd.record(self.identity, "starting", self.wall()))):
            return True  # no longer the leader
        if not (yield from self._publish(new, revision)):
            yield ETCD.delete(migrations_prefix(self.cluster) + rnd.id)
            return True
        log.info("rebalancer: round %s: %d slots (%s), %d moves left", rnd.id, len(pending),
                 ", ".join(f"{g.src}->{g.dst}:{len(g.slots)}" for g in groups), left)
        yield from self._progress("migrating", moves_left=left, round=rnd.id)
        return (yield from self._run_round(rnd, members, mbps))

    def _resume(self, sm: SlotMap, revision: int, base: list[tuple[str, ...]], target: list[tuple[str, ...]],
                members: dict[str, str]) -> Program[bool]:
        live = self.view.state.nodes
        bad = [s for s, p in sm.pending.items() if len(p) != 1 or p[0] not in target[s] or not base[s]
               or p[0] not in live]
        if bad:  # cannot finish these (destination gone or no longer wanted): back to the old owners
            keep = yield from self._give_back(sm, {s: sm.pending[s][0] for s in bad if len(sm.pending[s]) == 1})
            # (giving back took time: a slot whose owners have all gone meanwhile keeps its destination,
            # which step 1 makes the owner)
            now_live = self.view.state.nodes
            bad = [s for s in bad if s not in keep and any(n in now_live for n in base[s])]
            if not bad:
                yield Sleep(0.5)  # until an owner answers, or their leases expire (step 1)
                return False
            table = list(sm.table)
            pending = dict(sm.pending)
            for s in bad:
                table[s] = base[s]
                pending.pop(s)
            log.info("rebalancer: abandoning %d pending slots", len(bad))
            return (yield from self._publish(SlotMap(sm.epoch + 1, sm.slots, sm.replicas, tuple(table), sm.members,
                                                     pending), revision))
        by_group: dict[tuple[str, str], list[int]] = {}
        for s, p in sorted(sm.pending.items()):
            by_group.setdefault((base[s][0], p[0]), []).append(s)
        rid, old_groups = None, {}
        try:
            kvs, _ = yield ETCD.get_prefix(migrations_prefix(self.cluster))
        except EtcdUnavailable:
            kvs = []
        for kv in kvs:
            try:
                rec = json.loads(kv.value)
            except ValueError:
                continue
            slots = {s for mv in rec.get("moves", []) for s in mv.get("slots", [])}
            if slots == set(sm.pending) and rid is None:
                rid = rec["id"]
                old_groups = {(mv["src"], mv["dst"]): mv for mv in rec["moves"] if not mv.get("handover")}
            else:
                yield ETCD.delete(kv.key)
        groups = []
        for (src, dst), slots in by_group.items():
            g = Group(src, dst, slots)
            old = old_groups.get((src, dst))
            if old is not None:
                g.bytes_total, g.bytes_done, g.values_done = old["bytes_total"], old["bytes_done"], old["values_done"]
            groups.append(g)
        rnd = Round(rid or self.round_id(), sm.epoch, groups, {s: target[s] for s in sm.pending}, self.wall(),
                    resumed=True)
        log.info("rebalancer: resuming round %s (%d pending slots)", rnd.id, len(sm.pending))
        yield from self._progress("migrating", round=rnd.id, resumed=True)
        return (yield from self._run_round(rnd, members, (yield from self._throttle())))

    # -- copying
    def _pace(self, nbytes: int, mbps: float) -> Program[None]:
        """The throttle: ``mbps`` for all copies of this rebalancer together."""
        if mbps <= 0 or nbytes <= 0:
            return
        with self._tlock:
            now = self.clock()
            self._next_t = max(self._next_t, now) + nbytes / (mbps * 1e6)
            wait = self._next_t - now
        if wait > 0:
            yield Sleep(wait)

    def _copy(self, rnd: Round, g: Group, mbps: float) -> Program[None]:
        try:
            yield from self._copy_group(rnd, g, mbps)
        finally:
            g.finished = True

    def _copy_group(self, rnd: Round, g: Group, mbps: float) -> Program[None]:
        chunk = int(min(8 << 20, max(256 << 10, mbps * 1e6 * 0.25))) if mbps > 0 else 8 << 20
        failures = 0
        while True:
            nodes = self.view.state.nodes
            if not self.still_leader():
                g.failed = "leadership lost"
                return
            if g.dst not in nodes:
                g.failed = f"destination {g.dst} is gone"
                return
            if g.src not in nodes:
                g.failed = f"source {g.src} is gone"
                return
            try:
                nslots = self.view.state.slotmap.slots
                r = yield from self._call(g.src, int(Op.MIGRATE_PUSH),
                                          {"job": f"{rnd.id}:{g.src}:{g.dst}" + (":h" if g.handover else ""),
                                           "slots": g.slots, "nslots": nslots, "dest": nodes[g.dst].addr,
                                           "epoch": rnd.epoch, "max_bytes": chunk, "missing_only": g.handover})
            except MemKVError as exc:
                # a refused push (AuthError/PermissionDenied: no or a wrong cluster secret) is a failure like
                # any other: the slots stay with their old owners and a later round retries; never flip uncopied
                failures += 1
                hint = (" (is the cluster secret the same on every node and rebalancer? see README \"Security\")"
                        if isinstance(exc, AuthError | PermissionDenied) else "")
                log.warning("rebalancer: push %s->%s failed (%s)%s", g.src, g.dst, exc.message, hint)
                if failures >= MAX_PUSH_FAILURES:
                    g.failed = exc.message
                    return
                yield Sleep(0.5)
                continue
            failures = 0
            g.bytes_done += int(r.get("bytes", 0))
            g.values_done += int(r.get("values", 0))
            self.bytes_moved += int(r.get("bytes", 0))
            if r.get("done"):
                g.done = True
                return
            yield from self._pace(int(r.get("bytes", 0)), mbps)

    def _copier(self, rnd: Round, queue: deque[Group], mbps: float) -> Program[None]:
        """One of at most COPY_WORKERS concurrent copiers: groups one after the other."""
        while queue:
            yield from self._copy(rnd, queue.popleft(), mbps)

    def _record(self, rnd: Round, key: str) -> Program[None]:
        """The round's record, rewritten while its copies run (progress for ``memkv status``)."""
        while not all(g.finished for g in rnd.groups):
            try:
                if not (yield from self._put_record(key, rnd.record(self.identity, "copying", self.wall()))):
                    return
            except EtcdUnavailable:
                pass
            yield Sleep(RECORD_EVERY_S)

    def _put_record(self, key: str, value: bytes) -> Program[bool]:
        """Write a round's record only while the leader key still names us: a leader whose lease
        lapsed mid-round must not write a record back after the next leader cleared the records
        (an idle leader never clears again, so it would stay: simulator seed 16125)."""
        return bool((yield ETCD.put_if(key, value, mod_revision=None, guard=(leader_key(self.cluster), self.identity))))

    def _copy_all(self, rnd: Round, groups: list[Group], key: str, mbps: float) -> Program[None]:
        queue = deque(groups)
        copiers = tuple(self._copier(rnd, queue, mbps) for _ in range(max(1, min(COPY_WORKERS, len(queue)))))
        yield Parallel((*copiers, self._record(rnd, key)))

    def _handovers(self, rnd: Round) -> list[Group]:
        """For each copied slot, the other owners the flip will remove: each sends the destination
        what it still lacks. Replicas can differ (a write is acknowledged by the owners that were
        alive), and the copy came from one of them only."""
        sm = self.view.state.slotmap
        live = self.view.state.nodes
        by: dict[tuple[str, str], list[int]] = {}
        for g in rnd.groups:
            if not g.done or g.handover or sm is None:
                continue
            for s in g.slots:
                pend = sm.pending.get(s, ())
                for o in sm.table[s]:
                    if o not in pend and o != g.src and o in live and o not in rnd.target.get(s, ()):
                        by.setdefault((o, g.dst), []).append(s)
        return [Group(src, dst, slots, handover=True) for (src, dst), slots in sorted(by.items())]

    def _hand_over(self, epoch: int, by: dict[tuple[str, str], list[int]],
                   target: dict[int, tuple[str, ...]]) -> Program[list[Group]]:
        """Run hand-overs: each ``(src, dst) -> slots`` sends dst what it lacks of those slots
        (``MIGRATE_PUSH`` with ``missing_only``), under a record of their own; the groups, done or not."""
        if not by:
            return []
        groups = [Group(src, dst, slots, handover=True) for (src, dst), slots in sorted(by.items())]
        rnd = Round(self.round_id(), epoch, groups, target, self.wall())
        key = migrations_prefix(self.cluster) + rnd.id
        self._idle = False
        yield from self._copy_all(rnd, groups, key, (yield from self._throttle()))
        try:
            yield ETCD.delete(key)
        except EtcdUnavailable:
            pass
        return groups

    def _give_back(self, sm: SlotMap, slots: dict[int, str]) -> Program[set[int]]:
        """Before a move is abandoned: its destination (``slots``: slot -> destination) got the
        clients' writes since the move began, and an owner that took such a write may be gone
        since. The destination hands the slot's first live owner what that one lacks. Returns the
        slots that must stay pending: a live destination that could not give back (no owner
        answered) holds writes nobody else may have; when the owners' leases expire it becomes
        the owner (step 1)."""
        live = self.view.state.nodes
        by: dict[tuple[str, str], list[int]] = {}
        keep: set[int] = set()
        for s, dst in sorted(slots.items()):
            owners = [n for n in sm.table[s] if n != dst and n not in sm.pending.get(s, ()) and n in live]
            if dst in live:
                if owners:
                    by.setdefault((dst, owners[0]), []).append(s)
                else:
                    keep.add(s)
        for g in (yield from self._hand_over(sm.epoch, by, {})):
            if not g.done:
                log.warning("rebalancer: %s could not give %d abandoned slots back to %s (%s); they stay pending",
                            g.src, len(g.slots), g.dst, g.failed)
                keep.update(g.slots)
        return keep

    def _run_round(self, rnd: Round, members: dict[str, str], mbps: float) -> Program[bool]:
        self._idle = False
        key = migrations_prefix(self.cluster) + rnd.id
        yield from self._copy_all(rnd, rnd.groups, key, mbps)
        handovers = self._handovers(rnd) if self.still_leader() else []
        if handovers:
            rnd.groups.extend(handovers)
            yield from self._copy_all(rnd, handovers, key, mbps)
        if not self.still_leader():
            return True  # the next leader resumes from the map's pending slots
        try:
            yield from self._put_record(key, rnd.record(self.identity, "flipping", self.wall()))
        except EtcdUnavailable:
            pass
        ok_slots = {s: g.dst for g in rnd.groups if g.done and not g.handover for s in g.slots}
        for g in rnd.groups:
            if g.handover and not g.done:
                for s in g.slots:
                    ok_slots.pop(s, None)  # a leaving owner could not hand over: the slot stays as it is
        sm_now = self.view.state.slotmap
        keep: set[int] = set()
        if sm_now is not None:
            keep = yield from self._give_back(sm_now, {s: g.dst for g in rnd.groups if not g.handover
                                                       for s in g.slots if s not in ok_slots and s in sm_now.pending})
        drops: dict[str, set[int]] = {}
        try:  # a destination drained while its copy ran does not take the slots: they would only move back
            draining = set((yield from self._drains()))
        except EtcdUnavailable:
            draining = set()
        for _ in range(10):
            sm, rev = yield from self._read_map()
            if sm is None:
                return True
            live = self.view.state.nodes
            table = list(sm.table)
            pending = dict(sm.pending)
            drops = {}
            r_eff = min(sm.replicas, len(members))
            for g in rnd.groups:
                for s in g.slots:
                    if pending.get(s) != (g.dst,) or s in keep:
                        continue
                    row_wo = tuple(n for n in sm.table[s] if n != g.dst)
                    if ok_slots.get(s) == g.dst and g.dst in live and g.dst not in draining:
                        tgt = rnd.target.get(s, ())
                        kept = [n for n in row_wo if n in tgt]
                        removed = [n for n in row_wo if n not in tgt]
                        need = max(0, r_eff - len(kept) - 1)
                        table[s] = (*kept, g.dst, *removed[:need])
                        for n in removed[need:]:
                            drops.setdefault(n, set()).add(s)
                    elif any(n in live for n in row_wo) or g.dst not in live:
                        table[s] = row_wo
                    else:
                        table[s] = (g.dst,)  # the owners are gone (see step 1): the destination is what is left
                    pending.pop(s)
            done_members = sm.members
            if not pending:
                base = [tuple(r) for r in table]
                if base == self._aim(members, sm, base, self._held(sm, live)):
                    done_members = members
            new = SlotMap(sm.epoch + 1, sm.slots, sm.replicas, tuple(table), done_members, pending)
            if not self.still_leader():
                return True
            if (yield from self._publish(new, rev)):
                break
        else:
            return True
        failed = [f"{g.src}->{g.dst}{' (hand-over)' if g.handover else ''}: {g.failed}"
                  for g in rnd.groups if not g.done]
        if failed:
            self._failed_rounds += 1
            self._retry_at = self.clock() + min(30.0, 0.5 * 2 ** self._failed_rounds)
            log.warning("rebalancer: round %s left slots with their old owners: %s", rnd.id, "; ".join(failed))
        else:
            self._failed_rounds = 0
        self.rounds += 1
        log.info("rebalancer: round %s flipped at epoch %d (%d slots moved)", rnd.id, new.epoch, len(ok_slots))
        yield from self._free(drops, new)
        try:
            yield ETCD.delete(key)
        except EtcdUnavailable:
            pass
        return True

    def _free(self, drops: dict[str, set[int]], sm: SlotMap) -> Program[None]:
        """``DROP_SLOTS`` on each node that left rows of ``sm`` (once its own map has ``sm``)."""
        for node, slots in sorted(drops.items()):
            if node not in self.view.state.nodes:
                continue  # not registered: nothing to free there now
            try:
                yield from self._call(node, int(Op.DROP_SLOTS), {"slots": sorted(slots), "nslots": sm.slots,
                                                                  "epoch": sm.epoch})
            except MemKVError as exc:
                log.warning("rebalancer: freeing %d slots on %s failed: %s", len(slots), node, exc.message)

    def _remove(self, sm: SlotMap, revision: int, target: list[tuple[str, ...]],
                members: dict[str, str]) -> Program[bool]:
        """Rows that only lose owners: each leaving owner first hands over to the slot's remaining
        primary what that one lacks, then the map drops it (the rows of failed hand-overs stay)."""
        live = self.view.state.nodes
        by: dict[tuple[str, str], list[int]] = {}
        drops: dict[str, set[int]] = {}
        for s, row in enumerate(sm.table):
            for o in row:
                if o not in target[s] and target[s]:
                    drops.setdefault(o, set()).add(s)
                    if o in live:
                        by.setdefault((o, target[s][0]), []).append(s)
        table = list(target)
        done_members = members
        groups = yield from self._hand_over(sm.epoch, by, {s: target[s] for slots in by.values() for s in slots})
        if groups and not self.still_leader():
            return True
        for g in groups:
            if not g.done:
                log.warning("rebalancer: %s could not hand over %d slots to %s (%s); they keep it",
                            g.src, len(g.slots), g.dst, g.failed)
                self._failed_rounds += 1
                self._retry_at = self.clock() + min(30.0, 0.5 * 2 ** self._failed_rounds)
                done_members = sm.members
                for s in g.slots:
                    table[s] = sm.table[s]
                    drops.get(g.src, set()).discard(s)
        new = SlotMap(sm.epoch + 1, sm.slots, sm.replicas, tuple(table), done_members)
        if not (yield from self._publish(new, revision)):
            return True
        yield from self._free(drops, new)
        return True

    def _clear_records(self) -> Program[None]:
        kvs, _ = yield ETCD.get_prefix(migrations_prefix(self.cluster))
        for kv in kvs:
            yield ETCD.delete(kv.key)
        kv, _ = yield ETCD.get(progress_key(self.cluster))
        if kv is None or json.loads(kv.value).get("state") != "idle":
            yield from self._progress("idle")
