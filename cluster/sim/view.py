"""A simulated process's cache of the cluster: what ``ClusterView`` is in production.

It starts from a listing of ``/memkv/<cluster>/`` and then hears etcd's changes through a watch,
each after a delivery delay drawn for this watcher, in revision order (an etcd watch never
reorders). ``state`` is the same immutable ``ClusterState`` the production code reads (live
nodes, slot map and its revision, leader, revision), so the rebalancer and the migration
programs read it exactly as they read a ``ClusterView``. Waiters (``WaitView``) are woken when a
new state satisfies them, or when their timeout passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memkv.client.cluster_map import NodeInfo, SlotMap, leader_key, nodes_prefix, prefix, slotmap_key
from memkv.client.cluster_view import ClusterState
from memkv.cluster.sim.etcd import SimEtcd
from memkv.cluster.sim.loop import Loop


class Decoded:
    """Decoded slot maps and node records, shared by every view (they are immutable): a map is
    decoded once per revision, not once per watcher."""

    def __init__(self) -> None:
        self._maps: dict[int, SlotMap] = {}
        self._nodes: dict[bytes, NodeInfo] = {}
        self._nodes_after: dict[int, dict[str, NodeInfo]] = {}

    def slotmap(self, rev: int, raw: bytes) -> SlotMap:
        sm = self._maps.get(rev)
        if sm is None:
            if len(self._maps) > 256:
                self._maps.clear()
            sm = self._maps[rev] = SlotMap.decode(raw)
        return sm

    def node(self, raw: bytes) -> NodeInfo:
        info = self._nodes.get(raw)
        if info is None:
            info = self._nodes[raw] = NodeInfo.decode(raw)
        return info

    def nodes_after(self, rev: int, before: dict[str, NodeInfo], node_id: str,
                    raw: bytes | None) -> dict[str, NodeInfo]:
        """The live nodes after the node-record change at ``rev``. Every view applies the same
        changes in the same order, so the result is one dict shared by all of them (copying it
        per view would cost nodes x watchers per registration: a million at 1 000 nodes)."""
        after = self._nodes_after.get(rev)
        if after is None:
            if len(self._nodes_after) > 256:
                self._nodes_after.clear()
            after = dict(before)
            if raw is None:
                after.pop(node_id, None)
            else:
                after[node_id] = self.node(raw)
            self._nodes_after[rev] = after
        return after


class SimView:
    def __init__(self, loop: Loop, etcd: SimEtcd, cluster: str, decoded: Decoded,
                 delay: Callable[[], float]) -> None:
        self.loop = loop
        self.etcd = etcd
        self.decoded = decoded
        self.delay = delay
        self.cluster = cluster
        self._prefix = prefix(cluster)
        self._nodes_prefix = nodes_prefix(cluster)
        self._slotmap_key = slotmap_key(cluster)
        self._leader_key = leader_key(cluster)
        self._waiters: list[tuple[Callable[[ClusterState], bool], Callable[[bool], None], list[bool]]] = []
        self._last = loop.now
        self.alive = True
        self.bytes_received = 0
        self.state = self._listing()
        etcd.watchers.append(self._on_commit)

    def _listing(self) -> ClusterState:
        nodes: dict[str, NodeInfo] = {}
        sm, smrev, leader = None, 0, None
        for key, rec in sorted(self.etcd.kvs.items()):
            if key.startswith(self._nodes_prefix):
                nodes[key[len(self._nodes_prefix):]] = self.decoded.node(rec.value)
            elif key == self._slotmap_key:
                sm, smrev = self.decoded.slotmap(rec.mod_rev, rec.value), rec.mod_rev
            elif key == self._leader_key:
                leader = rec.value.decode()
        return ClusterState(nodes, sm, smrev, leader, self.etcd.rev)

    def close(self) -> None:
        self.alive = False
        if self._on_commit in self.etcd.watchers:
            self.etcd.watchers.remove(self._on_commit)
        self._waiters.clear()

    def _on_commit(self, rev: int, key: str, value: bytes | None) -> None:
        if not key.startswith(self._prefix):
            return
        self.bytes_received += len(key) + (len(value) if value is not None else 0)
        t = max(self._last, self.loop.now + self.delay())
        self._last = t
        self.loop.call_at(t, self._apply, rev, key, value)

    def _apply(self, rev: int, key: str, value: bytes | None) -> None:
        if not self.alive:
            return
        st = self.state
        nodes, sm, smrev, leader = st.nodes, st.slotmap, st.slotmap_revision, st.leader
        if key.startswith(self._nodes_prefix):
            nodes = self.decoded.nodes_after(rev, nodes, key[len(self._nodes_prefix):], value)
        elif key == self._slotmap_key:
            sm, smrev = (None, 0) if value is None else (self.decoded.slotmap(rev, value), rev)
        elif key == self._leader_key:
            leader = None if value is None else value.decode()
        self.state = ClusterState(nodes, sm, smrev, leader, rev)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        st = self.state
        keep = []
        for pred, cb, pending in self._waiters:
            if not pending[0]:
                continue
            if pred(st):
                pending[0] = False
                self.loop.call_later(0.0, cb, True)
            else:
                keep.append((pred, cb, pending))
        self._waiters = keep

    def wait(self, predicate: Callable[[ClusterState], bool], timeout: float, cb: Callable[[bool], None]) -> None:
        """``cb(True)`` once ``predicate(state)`` holds, ``cb(False)`` after ``timeout`` seconds."""
        if predicate(self.state):
            self.loop.call_later(0.0, cb, True)
            return
        pending = [True]
        self._waiters.append((predicate, cb, pending))

        def expire() -> None:
            if pending[0]:
                pending[0] = False
                cb(False)

        self.loop.call_later(timeout, expire)

    def __repr__(self) -> str:
        st: Any = self.state
        return f"SimView(epoch={st.epoch}, nodes={sorted(st.nodes)}, rev={st.revision})"
