"""Which nodes hold a key: the standalone router (one node) and the cluster router (slot map).

A router answers from what it already knows and never waits: the cluster
router reads the current immutable ``ClusterState`` snapshot of its
``ClusterView`` (kept fresh by the view's watcher thread, docs/cluster.md).
Its two blocking methods, ``refresh`` (after ``MOVED``: wait for a newer
slot map) and ``close`` (stop the watcher), are run by executors as
``Blocking`` requests, in a worker thread under trio.

The workers of one ``memkv serve --workers N`` (standalone) are a third router,
``WorkersRouter``: a key goes to the worker that holds its slot, and batches are
split by it like a cluster's by replica list (``client/core/ops.py``), the
parts sent in parallel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from memkv.client.cluster_map import DEFAULT_SLOTS, key_slot
from memkv.client.cluster_view import ClusterState, ClusterView, open_view
from memkv.client.etcd import EtcdUnavailable
from memkv.client.url import NodeAddress, ParsedURL
from memkv.errors import NodeUnavailable

log = logging.getLogger("memkv.client")

MOVED_WAIT_S = 1.0
CONNECT_TIMEOUT_S = 10.0


class Router(Protocol):
    """Maps keys to the nodes holding them (replicas, preferred first)."""

    clustered: bool
    # namespaces the nodes said are overwritable (replies marked "ow"): replicas may disagree, so
    # reads compare versions (client/core/repair.py)
    overwritable: set[str]

    def replicas(self, key: bytes) -> list[NodeAddress]: ...

    def write_replicas(self, key: bytes) -> tuple[list[NodeAddress | None], int]:
        """Where a write goes: the replicas (None: an owner that cannot be reached, not registered),
        and how many of them (at the end) are destinations of a slot being moved (which a write
        may not skip)."""

    def all_nodes(self) -> list[NodeAddress]: ...

    def stamp(self, meta: dict[str, Any]) -> None:
        """Add routing fields (the slot-map epoch) to a request's meta."""

    def refresh(self, moved_epoch: int) -> None:
        """Blocking: after ``MOVED(epoch)``, get a slot map at least that new."""

    def close(self) -> None:
        """Blocking: release what the router holds."""


@dataclass
class StandaloneRouter:
    """One node holds everything. ``epoch``: stamp requests with this slot-map epoch (a tool or test
    talking to one node of a cluster directly, as a client that believes that map)."""

    node: NodeAddress
    epoch: int | None = None
    clustered = False
    overwritable: set[str] = field(default_factory=set)

    def replicas(self, key: bytes) -> list[NodeAddress]:
        return [self.node]

    def write_replicas(self, key: bytes) -> tuple[list[NodeAddress | None], int]:
        return [self.node], 0

    def all_nodes(self) -> list[NodeAddress]:
        return [self.node]

    def stamp(self, meta: dict[str, Any]) -> None:
        if self.epoch is not None:
            meta["ep"] = self.epoch

    def refresh(self, moved_epoch: int) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class WorkersRouter:
    """The workers of one ``memkv serve --workers N`` (standalone): each key belongs to one worker,
    by slot -- worker ``I`` holds slots ``[I*S/N, (I+1)*S/N)`` of ``S = DEFAULT_SLOTS`` -- so every
    client of the host puts a key where the others will look for it. The layout is what the first
    worker said in its HELLO reply (``ClientCore.connect``); the same N addresses in the same order
    on every worker, so every client routes alike. A worker that is down is down for its keys (a
    miss or ``NodeUnavailable``, no other worker has them); its supervisor restarts it."""

    workers: tuple[NodeAddress, ...]
    clustered = False
    overwritable: set[str] = field(default_factory=set)

    def worker_of(self, key: bytes) -> int:
        return key_slot(key, DEFAULT_SLOTS) * len(self.workers) // DEFAULT_SLOTS

    def replicas(self, key: bytes) -> list[NodeAddress]:
        return [self.workers[self.worker_of(key)]]

    def write_replicas(self, key: bytes) -> tuple[list[NodeAddress | None], int]:
        return self.replicas(key), 0

    def all_nodes(self) -> list[NodeAddress]:
        return list(self.workers)

    def stamp(self, meta: dict[str, Any]) -> None:
        return None

    def refresh(self, moved_epoch: int) -> None:
        return None

    def close(self) -> None:
        return None


def worker_layout(asked: NodeAddress, advertised: Sequence[str]) -> tuple[NodeAddress, ...]:
    """The workers' addresses from a HELLO's ``workers`` (``HOST:PORT`` each, as they listen): one that
    listens on every interface (``0.0.0.0``, ``::``) is reached on the host the client asked."""
    out = []
    for a in advertised:
        host, _, port = str(a).rpartition(":")
        host = host.strip("[]")
        out.append(NodeAddress(asked.host if host in ("", "0.0.0.0", "::") else host, int(port)))
    return tuple(out)


class ClusterRouter:
    """key -> slot (mmh3) -> replica node ids (the slot map) -> live node addresses."""

    clustered = True

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._addr_cache: dict[str, NodeAddress] = {}
        self.overwritable: set[str] = set()

    @classmethod
    def open(cls, parsed: ParsedURL, timeout: float = CONNECT_TIMEOUT_S) -> ClusterRouter:
        """Blocking: read the cluster from etcd and start watching it."""
        return cls(open_view(parsed, timeout))

    @property
    def state(self) -> ClusterState:
        return self.view.state

    @property
    def epoch(self) -> int:
        return self.view.state.epoch

    def _address(self, st: ClusterState, node_id: str) -> NodeAddress | None:
        info = st.nodes.get(node_id)
        if info is None:
            return None  # not registered (its lease expired): not a live replica
        addr = self._addr_cache.get(info.addr)
        if addr is None:
            host, port = info.host_port
            addr = self._addr_cache[info.addr] = NodeAddress(host, port)
        return addr

    def replicas(self, key: bytes) -> list[NodeAddress]:
        """The live replicas of ``key``'s slot, primary first (may be empty)."""
        st = self.view.state
        sm = st.slotmap
        if sm is None:
            raise NodeUnavailable(f"cluster {self.view.cluster!r} has no slot map yet (no node joined?)")
        out = []
        for node_id in sm.table[key_slot(key, sm.slots)]:
            addr = self._address(st, node_id)
            if addr is not None:
                out.append(addr)
        return out

    def write_replicas(self, key: bytes) -> tuple[list[NodeAddress | None], int]:
        """Where a write of ``key`` goes: the slot's owners (primary first; None for one that is
        not registered), then its pending destinations, and how many of those there are (at the
        end of the list).

        An owner that is not registered (its lease expired: paused, cut off from etcd) is still
        an owner -- it serves its slots again once it registers -- so it stays in the list, as
        down (``dispatch.with_absent``): a write that may skip a dead owner skips it (acks "one"), a
        write that may skip no owner fails -- an acks "all" write (acknowledged without it, the
        write has one copy fewer once the owner is back serving the slot, and losing the other
        loses it) and a write-once delete (acknowledged without it, it would be undone by reads
        once the owner is back); both found by the control-plane simulator, docs/control-plane.md.
        A destination is a slot's owner from the flip on, so it must get every write: it is never
        skipped, and a destination that is not registered (no address) fails the write."""
        st = self.view.state
        sm = st.slotmap
        if sm is None:
            raise NodeUnavailable(f"cluster {self.view.cluster!r} has no slot map yet (no node joined?)")
        s = key_slot(key, sm.slots)
        pending = sm.pending.get(s, ())
        owners: list[NodeAddress | None] = [self._address(st, n) for n in sm.table[s] if n not in pending]
        dests = []
        for node_id in pending:
            addr = self._address(st, node_id)
            if addr is None:
                raise NodeUnavailable(f"slot {s} is moving to node {node_id}, which is not registered")
            dests.append(addr)
        return [*owners, *dests], len(dests)

    def all_nodes(self) -> list[NodeAddress]:
        st = self.view.state
        return [a for a in (self._address(st, n) for n in sorted(st.nodes)) if a is not None]

    def stamp(self, meta: dict[str, Any]) -> None:
        meta["ep"] = self.view.state.epoch

    def refresh(self, moved_epoch: int) -> None:
        """After MOVED(epoch): get a map at least that new (wait briefly for the watch, else
        read it from etcd). When the node is behind us instead, give its watch a moment.
        Keeps the cached map when etcd is unreachable."""
        if moved_epoch > self.view.state.epoch:
            if self.view.wait_for(lambda st: st.epoch >= moved_epoch, MOVED_WAIT_S):
                return
            try:
                self.view.refresh()
            except EtcdUnavailable as exc:
                log.debug("slot map refresh failed: %s", exc)
        else:
            time.sleep(0.1)

    def close(self) -> None:
        self.view.stop()
        self.view.etcd.close()


def group_by_owner(router: Router, keys: Sequence[bytes]) -> dict[NodeAddress, list[int]]:
    """Indices of ``keys`` grouped by their first replica, preserving order."""
    groups: dict[NodeAddress, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(router.replicas(k)[0], []).append(i)
    return groups


def group_by_replicas(router: Router, keys: Sequence[bytes]) -> list[tuple[tuple[NodeAddress, ...], list[int]]]:
    """Indices of ``keys`` grouped by their whole replica list (primary first).

    In a cluster, keys with the same primary may have different other replicas,
    so writes (sent to every replica) and reads (failing over to the next
    replica) are split by the full list; standalone, this is one group.
    """
    groups: dict[tuple[NodeAddress, ...], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(tuple(router.replicas(k)), []).append(i)
    return list(groups.items())
