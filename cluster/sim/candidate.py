"""A standalone rebalancer candidate (``memkv rebalancer URL``) in the simulation.

It holds a lease of its own (``LeaseHolder``: granted, renewed every third of the TTL, valid for
90 % of it), keeps a view of the cluster and runs the real ``Rebalancer``'s campaign. Crashing it
kills the campaign wherever it is -- mid-copy, mid-flip -- and its lease expires on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memkv.client.etcd import EtcdUnavailable
from memkv.cluster.effects import ETCD, Program, Sleep
from memkv.cluster.rebalancer import Rebalancer
from memkv.cluster.sim.net import NetActor
from memkv.cluster.sim.view import SimView

if TYPE_CHECKING:
    from memkv.cluster.sim.world import World


class SimCandidate(NetActor):
    def __init__(self, world: World, name: str) -> None:
        super().__init__(world.loop, name, world.net)
        self.world = world
        self.id = name
        self.on_failure = world.process_failed
        self.alive = False
        self.lease: int | None = None
        self.valid_until = 0.0
        self.rebalancer: Rebalancer | None = None
        self.etcd_timeout = max(1.0, min(3.0, world.scenario.lease_ttl / 2))

    def start(self) -> None:
        w = self.world
        self.alive = True
        self.view = SimView(self.loop, w.etcd, w.cluster, w.decoded, w.watch_delay)
        self.spawn(f"{self.id}/lease", self._lease_loop())
        self.rebalancer = w.make_rebalancer(self.view, self.id, lease=lambda: self.lease,
                                            alive=lambda: self.loop.now < self.valid_until)
        self.spawn(f"{self.id}/rebalancer", self.rebalancer.campaign())
        w.trace(self.id, "starts")

    def crash(self) -> None:
        if self.halt():
            self.lease, self.valid_until, self.rebalancer = None, 0.0, None

    def _lease_loop(self) -> Program[None]:
        ttl = self.world.scenario.lease_ttl
        while True:
            try:
                t0 = self.loop.now
                if self.lease is None:
                    self.lease = yield ETCD.grant(ttl)
                    self.valid_until = t0 + ttl * 0.9
                else:
                    left = yield ETCD.keepalive(self.lease)
                    if left <= 0:
                        self.lease, self.valid_until = None, 0.0
                        continue
                    self.valid_until = t0 + min(left, ttl) * 0.9
            except EtcdUnavailable:
                pass
            yield Sleep(ttl / 3)
