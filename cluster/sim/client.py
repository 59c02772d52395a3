"""A simulated cluster client that writes, as the real one does, and keeps the ledger of acks.

Each write (a put, or a versioned delete: a tombstone) goes where the real cluster client sends
it (``ClusterRouter.write_replicas`` over this client's view: the slot's registered owners and its
pending destinations -- the double write; an owner that is not registered counts as down,
``with_absent``), stamped with its map's epoch; the replies are combined
by the real client's rule (``replicated_outcome``: MOVED from any replica means refresh the map and run the write again;
dead or fenced owners are skipped, destinations are not; acknowledged when at least one owner
and every destination stored it; a delete in a write-once namespace skips no owner: ``every``, as
``memkv.client.core.ops.delete`` passes it). An acknowledged write goes to the checker's
ledger: from then on the simulation must not lose it while a copy of it lives.

It also reads (``Scenario.reads`` per second, drawn from an RNG of their own so that the rest of
a schedule does not change), as the real client does, at one instant of simulated time: the
slot's registered replicas in map order (``ClusterRouter.replicas``), a replica that is down
skipped for the next. In a write-once namespace the first that answers with a value is believed;
a miss (carrying the key's tombstone version, if any) falls back to the others in order, a value
no newer than a tombstone seen is not an answer, and the read repairs: the value onto the replicas
that missed it, the tombstone onto those that held an older value (``client/core/repair.py``). In
an overwritable namespace the newest state among the replicas that answer wins. What it returns
goes to the checker (*resurrected*: a value older than an acknowledged delete).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memkv.client.cluster_map import key_slot
from memkv.client.core.dispatch import MOVED_RETRIES, replicated_outcome, with_absent
from memkv.client.core.ops import every_owner
from memkv.client.core.routing import ClusterRouter
from memkv.cluster.effects import Program, Sleep, WaitView
from memkv.cluster.sim.loop import Process
from memkv.cluster.sim.net import NetActor
from memkv.cluster.sim.view import SimView
from memkv.errors import MemKVError, Moved
from memkv.protocol.opcodes import Op

if TYPE_CHECKING:
    from memkv.cluster.sim.node import SimNode, Value
    from memkv.cluster.sim.world import World


class SimClient(NetActor):
    call_timeout = 2.0
    router_cls = ClusterRouter  # the real router (a test swaps in a broken one)

    def __init__(self, world: World, name: str, keys: list[bytes], rate: float, value_size: int,
                 delete_every: int = 0) -> None:
        super().__init__(world.loop, name, world.net)
        self.world = world
        self.keys = keys
        self.on_failure = world.process_failed
        self.rate = rate
        self.value_size = value_size
        self.delete_every = delete_every  # every n-th write is a delete (0: none)
        self.writes = self.acked = self.reads = self.deletes_refused = 0
        self.read_rng = random.Random(f"client-reads-{world.scenario.seed}")

    def start(self) -> None:
        w = self.world
        self.view = SimView(self.loop, w.etcd, w.cluster, w.decoded, w.watch_delay)
        self.router = self.router_cls(self.view)  # type: ignore[arg-type]
        self.spawn(f"{self.name}/load", self._load())
        self.reading = self.world.scenario.reads > 0
        if self.reading:
            self.loop.call_later(self.read_rng.expovariate(self.world.scenario.reads), self._read_loop)

    def stop(self) -> None:
        self.kill_all()
        self.view.close()
        self.reading = False

    # -- reads
    def _read_loop(self) -> None:
        if not self.reading:
            return
        rng = self.read_rng
        deleted = self.world.checker.deleted_keys()
        if deleted and rng.random() < 0.7:  # mostly keys whose newest acknowledged write is a delete
            key = deleted[rng.randrange(len(deleted))]
        else:
            key = self.keys[rng.randrange(len(self.keys))]
        self.read(key)
        self.loop.call_later(rng.expovariate(self.world.scenario.reads), self._read_loop)

    def read(self, key: bytes) -> Value | None:
        """One read of ``key`` now (see the module's docstring); what it returns, after the checker
        saw it."""
        self.reads += 1
        nodes = self.world.net.nodes
        replicas = [n for n in (nodes.get(str(a)) for a in self.router.replicas(key)) if n is not None and n.alive]
        if self.world.scenario.write_once:
            found = self._read_write_once(key, replicas)
        else:
            states = [v for n in replicas if (v := n.data.get(key)) is not None]
            newest = max(states, key=lambda v: v.version, default=None)
            found = newest if newest is not None and not newest.tomb else None
        self.world.checker.read(key, found, [n.id for n in replicas])
        return found

    def _read_write_once(self, key: bytes, replicas: list[SimNode]) -> Value | None:
        missed: list[SimNode] = []
        stale: list[SimNode] = []
        dead = 0  # the newest tombstone seen
        found: Value | None = None
        for n in replicas:
            v = n.data.get(key)
            if v is None or v.tomb:
                missed.append(n)
                dead = max(dead, v.version if v is not None else 0)
                continue
            if not missed or v.version > dead:  # the first replica's value is believed as it is
                found = v
                break
            stale.append(n)  # older than a delete seen: not an answer; it gets the tombstone
        if found is not None and found.version <= dead:
            found = None
        for n in missed if found is not None else ():
            n.repair(key, found.version, found.size, found.slot, False)
        for n in stale if dead else ():
            n.repair(key, dead, 0, self._slot(key), True)
        return found

    def _slot(self, key: bytes) -> int:
        return key_slot(key, self.world.scenario.slots)

    def _load(self) -> Program[None]:
        rng = self.loop.rng
        while True:
            yield Sleep(rng.expovariate(self.rate))
            key = self.keys[rng.randrange(len(self.keys))]
            self.spawn(f"{self.name}/put", self._write(key, self.world.next_version()))

    def _write(self, key: bytes, version: int) -> Program[None]:
        """A put, or (every ``delete_every``-th write) a versioned delete: the same replicated write of
        the key's new state, a tombstone."""
        self.writes += 1
        tomb = bool(self.delete_every) and self.writes % self.delete_every == 0
        for _ in range(MOVED_RETRIES + 1):
            sm = self.view.state.slotmap
            try:
                nodes, pending = self.router.write_replicas(key)
            except MemKVError:
                return
            if not any(a is not None for a in nodes):
                return
            slot = key_slot(key, sm.slots)
            meta = {"key": key, "ver": version, "size": 0 if tomb else self.value_size, "slot": slot,
                    "ep": sm.epoch, "tomb": tomb}
            replies = yield Fanout(tuple(str(a) for a in nodes if a is not None), int(Op.PUT), meta)
            try:
                # a delete passes ``every`` as memkv.client.core.ops.delete does
                replicated_outcome(with_absent(nodes, replies), pending, every_owner if tomb else None)
            except Moved as exc:
                yield WaitView(lambda s, e=exc.epoch: s.epoch >= e, 1.0)
                continue
            except MemKVError:
                if tomb:
                    self.deletes_refused += 1
                return
            self.acked += 1
            self.world.checker.acked(key, version, slot, tomb)
            return

    def perform_io(self, proc: Process, tok: int, eff: Any) -> None:
        if not isinstance(eff, Fanout):
            super().perform_io(proc, tok, eff)
            return
        outcomes: list[Any] = [None] * len(eff.addrs)
        left = [len(eff.addrs)]

        def one(i: int, value: Any, error: BaseException | None) -> None:
            outcomes[i] = value if error is None else error
            left[0] -= 1
            if left[0] == 0:
                proc.wake(tok, outcomes, None)

        for i, addr in enumerate(eff.addrs):
            self.net.node_call(addr, eff.op, eff.meta, self.call_timeout, lambda v, e, i=i: one(i, v, e))


@dataclass(frozen=True, eq=False)
class Fanout:
    """The same call to several nodes at once; the outcomes (reply or error) in order -- what the
    real client's replicated write does with a ``Parallel`` of one call per replica."""

    addrs: tuple[str, ...]
    op: int
    meta: dict[str, Any]
