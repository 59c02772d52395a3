"""A simulated cluster client that writes, as the real one does, and keeps the ledger of acks.

Each write (a put, or a versioned delete: a tombstone) goes where the real cluster client sends
it (``ClusterRouter.write_replicas`` over this client's view: the slot's registered owners and its
pending destinations -- the double write), stamped with its map's epoch; the replies are combined
by the real client's rule (``replicated_outcome``: MOVED from any replica means refresh the map and run the write again;
dead or fenced owners are skipped, destinations are not; acknowledged when at least one owner
and every destination stored it). An acknowledged write goes to the checker's
ledger: from then on the simulation must not lose it while a copy of it lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memkv.client.cluster_map import key_slot
from memkv.client.core.dispatch import MOVED_RETRIES, replicated_outcome
from memkv.client.core.routing import ClusterRouter
from memkv.cluster.effects import Program, Sleep, WaitView
from memkv.cluster.sim.loop import Process
from memkv.cluster.sim.net import NetActor
from memkv.cluster.sim.view import SimView
from memkv.errors import MemKVError, Moved
from memkv.protocol.opcodes import Op

if TYPE_CHECKING:
    from memkv.cluster.sim.world import World


class SimClient(NetActor):
    call_timeout = 2.0

    def __init__(self, world: World, name: str, keys: list[bytes], rate: float, value_size: int,
                 delete_every: int = 0) -> None:
        super().__init__(world.loop, name, world.net)
        self.world = world
        self.keys = keys
        self.on_failure = world.process_failed
        self.rate = rate
        self.value_size = value_size
        self.delete_every = delete_every  # every n-th write is a delete (0: none)
        self.writes = self.acked = 0

    def start(self) -> None:
        w = self.world
        self.view = SimView(self.loop, w.etcd, w.cluster, w.decoded, w.watch_delay)
        self.router = ClusterRouter(self.view)  # type: ignore[arg-type]
        self.spawn(f"{self.name}/load", self._load())

    def stop(self) -> None:
        self.kill_all()
        self.view.close()

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
            if not nodes:
                return
            slot = key_slot(key, sm.slots)
            meta = {"key": key, "ver": version, "size": 0 if tomb else self.value_size, "slot": slot,
                    "ep": sm.epoch, "tomb": tomb}
            outcomes = yield Fanout(tuple(str(a) for a in nodes), int(Op.PUT), meta)
            try:
                replicated_outcome(outcomes, pending)
            except Moved as exc:
                yield WaitView(lambda s, e=exc.epoch: s.epoch >= e, 1.0)
                continue
            except MemKVError:
                return
            self.acked += 1
            self.world.checker.acked(key, version, slot)
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
