"""The simulated network: how etcd calls and node calls travel, and how they fail.

Every call has a request latency and a reply latency, drawn from the world's RNG. An etcd call
is applied at etcd when the request arrives (a process's calls arrive in the order it sent them,
as on its one gRPC channel); if etcd is down the caller hears ``EtcdUnavailable``
(fast, as a refused connection); if the round trip exceeds the caller's timeout the caller hears
``EtcdUnavailable`` at its timeout *although the call may still be applied later* -- a timed-out
write is not a failed write, exactly the case the rebalancer's revision-guarded publishes exist
for. A node call reaches the node's current process only: a crashed node refuses connections, a
node that crashes while serving a call closes it (``ConnectionLost``), a call that takes longer
than the caller's timeout fails with ``TimeoutError`` while the node may go on with it. Faults
make etcd slow, and make node calls slow and out of order (``rpc_jitter``: each message gets an
extra delay up to that many seconds, so two calls can overtake each other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memkv.client.etcd import EtcdUnavailable
from memkv.cluster.effects import EtcdCall, NodeCall
from memkv.cluster.sim.loop import Actor, Loop, Process
from memkv.errors import ConnectionLost
from memkv.errors import TimeoutError as CallTimeout
from memkv.protocol.opcodes import Op

if TYPE_CHECKING:
    from memkv.cluster.sim.etcd import SimEtcd
    from memkv.cluster.sim.node import SimNode


COMMIT_MAX_S = 0.05  # a simulated node commits a write at most this long after its checks


class Net:
    def __init__(self, loop: Loop, etcd: SimEtcd) -> None:
        self.loop = loop
        self.rng = loop.rng
        self.etcd = etcd
        self.nodes: dict[str, SimNode] = {}  # by address
        self.etcd_extra = 0.0  # a slow etcd: extra latency up to this (s)
        self.rpc_jitter = 0.0  # slow, reordered node calls: extra delay up to this (s)
        self.etcd_calls = 0
        self.node_calls = 0
        self._etcd_fifo: dict[Any, float] = {}  # actor -> when its last etcd call reaches etcd

    def etcd_latency(self) -> float:
        d = 0.0005 + self.rng.random() * 0.002
        if self.etcd_extra:
            d += self.rng.random() * self.etcd_extra
        return d

    def rpc_latency(self) -> float:
        d = 0.0002 + self.rng.random() * 0.001
        if self.rpc_jitter:
            d += self.rng.random() * self.rpc_jitter
        return d

    def etcd_call(self, proc: Process, tok: int, eff: EtcdCall, timeout: float) -> None:
        self.etcd_calls += 1
        loop = self.loop
        d1, d2 = self.etcd_latency(), self.etcd_latency()
        # one gRPC channel per process: its calls reach etcd in the order they were sent
        actor = proc.actor
        last = self._etcd_fifo.get(actor, 0.0)
        if loop.now + d1 <= last:
            d1 = last - loop.now + 1e-6
        self._etcd_fifo[actor] = loop.now + d1
        if not self.etcd.up:
            loop.call_later(d1 + d2, proc.wake, tok, None, EtcdUnavailable("etcd (simulated) is down"))
            return
        late = d1 + d2 > timeout
        if late:
            loop.call_later(timeout, proc.wake, tok, None, EtcdUnavailable(f"etcd call timed out after {timeout}s"))

        def apply() -> None:
            try:
                value, error = getattr(self.etcd, eff.method)(*eff.args, **eff.kwargs), None
            except EtcdUnavailable as exc:
                value, error = None, exc
            if not late:
                loop.call_later(d2, proc.wake, tok, value, error)

        loop.call_later(d1, apply)

    def node_call(self, addr: str, op: int, meta: dict[str, Any], timeout: float,
                  done: Callable[[Any, BaseException | None], None]) -> None:
        """Call node ``addr``; ``done(reply, error)`` once: its reply, its error, or ours."""
        self.node_calls += 1
        loop = self.loop
        open_ = [True]

        def reply(value: Any, error: BaseException | None) -> None:
            if open_[0]:
                open_[0] = False
                done(value, error)

        target = self.nodes.get(addr)
        d1, d2 = self.rpc_latency(), self.rpc_latency()
        if target is None or not target.alive:
            loop.call_later(d1 + d2, reply, None, ConnectionLost(f"{addr}: connection refused"))
            return
        incarnation = target.incarnation

        def deliver() -> None:
            if not target.alive or target.incarnation != incarnation:
                loop.call_later(d2, reply, None, ConnectionLost(f"{addr} closed the connection"))
                return
            target.serve(op, meta, lambda v, e: loop.call_later(d2, reply, v, e))

        loop.call_later(d1, deliver)
        if not (op in (Op.PUT, Op.DELETE) and d1 + d2 + COMMIT_MAX_S < timeout):
            # (a client write is served within the commit delay, or the node dies and closes the
            # call: its timeout cannot fire, and writes are most of the simulation's calls)
            loop.call_later(timeout, reply, None, CallTimeout(f"{addr}: no reply in {timeout}s"))


class NetActor(Actor):
    """An actor that talks to etcd and to nodes over the simulated network."""

    etcd_timeout = 1.0
    call_timeout = 60.0

    def __init__(self, loop: Loop, name: str, net: Net) -> None:
        super().__init__(loop, name)
        self.net = net

    def perform_io(self, proc: Process, tok: int, eff: Any) -> None:
        if isinstance(eff, EtcdCall):
            self.net.etcd_call(proc, tok, eff, self.etcd_timeout)
        elif isinstance(eff, NodeCall):
            self.net.node_call(eff.addr, eff.op, eff.meta, self.call_timeout,
                               lambda v, e: proc.wake(tok, v, e))
        else:
            super().perform_io(proc, tok, eff)

