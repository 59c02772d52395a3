"""A simulated cluster client that writes, as the real one does, and keeps the ledger of acks.

A write is the real client's operation, run here: a put is ``memkv.client.core.ops.put``'s
``dispatch.write(PutCall)`` and a versioned delete ``ops.delete``'s ``dispatch.write(DeleteCall,
every=every_owner)``, each under ``dispatch.restarting`` (MOVED: wait for the newer map, run it
again), with the simulator's version. So everything the real client decides is decided by its own
code, and the rule of acknowledgement (``acks = "all"`` or ``"one"``) is the real one:
``ClusterRouter.write_replicas`` over this client's view (the slot's owners, an unregistered one as
absent, then its pending destinations: the double write), ``with_absent``, the relay of the write to
the registered owners it missed where the replies say ``all`` (the namespace's ``acks``:
``relay_missed``, ``RELAY`` to an owner that stored it, which copies it on; else
``NotEnoughReplicas``), and ``replicated_outcome`` (MOVED from any replica wins; a destination is
never skipped; one owner suffices where acks are ``one``, where they are ``all`` an owner the map
names but that is not registered fails the write; a write-once delete skips no owner). What
this module performs is only the requests of those programs: ``NodeCall`` on the simulated network
(the reply's meta through the call's own ``finish``), ``Parallel``, and the ``Blocking`` refresh
after MOVED (wait for the newer map, as ``ClusterRouter.refresh``). An acknowledged write goes to
the checker's ledger: from then on the simulation must not lose it while a copy of it lives.

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
from typing import TYPE_CHECKING, Any

from memkv.client.cluster_map import key_slot
from memkv.client.core import ops
from memkv.client.core.calls import Call, DeleteCall, PutCall
from memkv.client.core.dispatch import restarting, write
from memkv.client.core.requests import Blocking, NodeCall, Parallel
from memkv.client.core.routing import MOVED_WAIT_S, ClusterRouter
from memkv.cluster.effects import Program, Sleep
from memkv.cluster.sim.loop import Process
from memkv.cluster.sim.net import NetActor
from memkv.cluster.sim.node import NS
from memkv.cluster.sim.view import SimView
from memkv.errors import MemKVError
from memkv.protocol.codec import Frame

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
        self.refused: dict[str, int] = {}  # writes not acknowledged, by the error the caller got
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
        """A put, or (every ``delete_every``-th write) a versioned delete: the real client's operation."""
        self.writes += 1
        tomb = bool(self.delete_every) and self.writes % self.delete_every == 0
        router = self.router
        began = self.world.checker.write_begins()
        # ops.delete and ops.put, with the simulator's version
        call: Call = DeleteCall({"k": key, "ver": version, "ns": NS}) if tomb else PutCall(
            key, b"", namespace=NS, ttl=None, pin=False, extra={"ver": version})
        try:
            yield from restarting(router, write, router, call, key, every=ops.every_owner if tomb else None)
        except MemKVError as exc:
            name = type(exc).__name__
            self.refused[name] = self.refused.get(name, 0) + 1
            if tomb:
                self.deletes_refused += 1
            return
        self.acked += 1
        # (the map of its last attempt: the epoch it was stamped with)
        self.world.checker.acked(key, version, key_slot(key, self.world.scenario.slots), tomb, began=began,
                                 epoch=call.meta["ep"])

    def perform_io(self, proc: Process, tok: int, eff: Any) -> None:
        """The requests of the real client's operations (``memkv.client.core.requests``)."""
        if isinstance(eff, NodeCall):
            call = eff.call

            def reply(value: Any, error: BaseException | None) -> None:
                if error is None:
                    try:  # the call's own reading of the reply (``every_owner`` from "all", ...)
                        value = call.finish(Frame(int(call.op), 0, 0, value), [])
                    except MemKVError as exc:
                        error = exc
                proc.wake(tok, value, error)

            # (a copy of the meta, as the bytes on a wire: a later attempt stamps its own epoch)
            self.net.node_call(str(eff.node), int(call.op), dict(call.meta), self.call_timeout, reply)
        elif isinstance(eff, Parallel):
            self._gather(proc, tok, eff)
        elif isinstance(eff, Blocking) and eff.fn == self.router.refresh:
            self._refresh(proc, tok, int(eff.args[0]))
        else:
            super().perform_io(proc, tok, eff)

    def _gather(self, proc: Process, tok: int, eff: Parallel) -> None:
        """``Parallel``: every operation's return value or the ``MemKVError`` it ended with, in order."""
        n = len(eff.ops)
        results: list[Any] = [None] * n
        left = [n]

        def done(i: int, value: Any, error: BaseException | None) -> None:
            if error is not None and not isinstance(error, MemKVError):
                proc.children = []
                proc.wake(tok, None, error)  # a bug, not an outcome: the operation dies of it
                return
            results[i] = value if error is None else error
            left[0] -= 1
            if left[0] == 0:
                proc.children = []
                proc.wake(tok, results, None)

        if n == 0:
            self.loop.call_later(0.0, proc.wake, tok, [], None)
            return
        proc.children = [self.spawn(f"{proc.name}/{i}", op, lambda v, e, i=i: done(i, v, e))
                         for i, op in enumerate(eff.ops)]

    def _refresh(self, proc: Process, tok: int, moved_epoch: int) -> None:
        """``ClusterRouter.refresh`` after MOVED: wait briefly for a map at least that new; when the node
        was behind instead, give its watch a moment."""
        if moved_epoch > self.view.state.epoch:
            self.view.wait(lambda st: st.epoch >= moved_epoch, MOVED_WAIT_S, lambda ok: proc.wake(tok, None, None))
        else:
            self.loop.call_later(0.1, proc.wake, tok, None, None)

