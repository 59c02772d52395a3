"""Routing for ``etcd://HOST:PORT[,HOST:PORT]/CLUSTER`` URLs (DESIGN.md §6).

key -> slot (mmh3) -> replica node ids (the slot map) -> live node addresses.

Both clients use the same :class:`ClusterRouter` over a
:class:`~memkv.client.cluster_view.ClusterView`, whose one watcher thread keeps
nodes and slot map current. The thread is owned by the router: it is started
by ``connect`` and stopped and joined by ``close()`` / ``aclose()`` (so close
your clients, or use them as context managers). No trio task is involved: the
trio ``Client`` reads immutable snapshots and, after a ``MOVED`` reply, waits
for a newer map in a worker thread (``trio.to_thread``), never on the event
loop. While etcd is down, the cached map keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from memkv.client.cluster_map import key_slot
from memkv.client.cluster_view import ClusterState, ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.client.url import NodeAddress, ParsedURL
from memkv.errors import NodeUnavailable

log = logging.getLogger("memkv.client")

CONNECT_TIMEOUT_S = 10.0
MOVED_WAIT_S = 1.0


class ClusterRouter:
    """The ``Router`` of a cluster client (see ``memkv.client.ops.Router``)."""

    clustered = True

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._addr_cache: dict[str, NodeAddress] = {}
        # namespaces the nodes said are overwritable (replies marked "ow"): reads of these ask the
        # other replicas for their versions in parallel with the read itself (client/ops.py)
        self.overwritable: set[str] = set()

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

    def write_replicas(self, key: bytes) -> tuple[list[NodeAddress], int]:
        """Where a write of ``key`` goes: the slot's live owners (primary first), then its pending
        destinations, and how many of those there are (at the end of the list).

        A destination is a slot's owner from the flip on, so it must get every write: it is never
        skipped, and a destination that is not registered (no address) fails the write."""
        st = self.view.state
        sm = st.slotmap
        if sm is None:
            raise NodeUnavailable(f"cluster {self.view.cluster!r} has no slot map yet (no node joined?)")
        s = key_slot(key, sm.slots)
        pending = sm.pending.get(s, ())
        owners = [a for a in (self._address(st, n) for n in sm.table[s] if n not in pending) if a is not None]
        dests = []
        for node_id in pending:
            addr = self._address(st, node_id)
            if addr is None:
                raise NodeUnavailable(f"slot {s} is moving to node {node_id}, which is not registered")
            dests.append(addr)
        return owners + dests, len(dests)

    def all_nodes(self) -> list[NodeAddress]:
        st = self.view.state
        return [a for a in (self._address(st, n) for n in sorted(st.nodes)) if a is not None]

    def stamp(self, meta: dict[str, Any]) -> None:
        meta["ep"] = self.view.state.epoch

    # -- after MOVED (blocking; the trio client runs this in a worker thread)
    def refresh_blocking(self, moved_epoch: int = 0) -> None:
        """After MOVED(epoch): get a map at least that new (wait briefly for the
        watch, else read it from etcd). When the node is behind us instead, give
        its watch a moment. Keeps the cached map when etcd is unreachable."""
        if moved_epoch > self.view.state.epoch:
            if self.view.wait_for(lambda st: st.epoch >= moved_epoch, MOVED_WAIT_S):
                return
            try:
                self.view.refresh()
            except EtcdUnavailable as exc:
                log.debug("slot map refresh failed: %s", exc)
        else:
            time.sleep(0.1)

    def refresh(self, moved_epoch: int = 0) -> None:
        self.refresh_blocking(moved_epoch)

    def close(self) -> None:
        self.view.stop()
        self.view.etcd.close()


class AsyncClusterRouter(ClusterRouter):
    """The same router for the trio ``Client``: ``refresh`` and ``aclose`` are awaitable."""

    async def refresh(self, moved_epoch: int = 0) -> None:  # type: ignore[override]
        import trio

        await trio.to_thread.run_sync(self.refresh_blocking, moved_epoch)

    async def aclose(self) -> None:
        import trio

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ClusterRouter.close, self)


def _open_view(parsed: ParsedURL, timeout: float) -> ClusterView:
    etcd = Etcd([(n.host, n.port) for n in parsed.nodes], timeout=min(timeout, 3.0))
    view = ClusterView(etcd, parsed.cluster)
    deadline = time.monotonic() + timeout
    while True:
        try:
            view.load()
            break
        except EtcdUnavailable as exc:
            if time.monotonic() > deadline:
                etcd.close()
                raise NodeUnavailable(f"cannot reach etcd for cluster {parsed.cluster!r}: {exc.message}") from None
            time.sleep(0.2)
    view.start()
    return view


def open_sync_cluster_router(parsed: ParsedURL, timeout: float = CONNECT_TIMEOUT_S) -> ClusterRouter:
    return ClusterRouter(_open_view(parsed, timeout))


async def open_cluster_router(parsed: ParsedURL, timeout: float = CONNECT_TIMEOUT_S) -> AsyncClusterRouter:
    import trio

    view = await trio.to_thread.run_sync(_open_view, parsed, timeout)
    return AsyncClusterRouter(view)
