"""A live view of one cluster's nodes and slot map, kept current from etcd.

``ClusterView.start()`` runs one watcher thread (named ``memkv-view-<cluster>``)
that lists everything under ``/memkv/<cluster>/``, watches from the listed
revision + 1, and on any error (etcd restart included) backs off, lists again
and watches again. It also re-lists every ``resync_s`` seconds, in case a
watch stream dies silently. ``stop()`` ends and joins the thread.

Readers take ``view.state`` (an immutable :class:`ClusterState`, swapped as a
whole), so the request path never takes a lock and never waits for etcd:
while etcd is down, the last known state keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memkv.client.cluster_map import NodeInfo, SlotMap, leader_key, nodes_prefix, prefix, slotmap_key
from memkv.client.etcd import KV, Etcd, EtcdUnavailable, WatchEvent
from memkv.client.url import ParsedURL
from memkv.errors import NodeUnavailable

log = logging.getLogger("memkv.cluster")


@dataclass(frozen=True)
class ClusterState:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)  # live (registered) nodes
    slotmap: SlotMap | None = None
    slotmap_revision: int = 0  # mod revision of the slotmap key (0: absent)
    leader: str | None = None
    revision: int = 0  # etcd revision this state reflects

    @property
    def epoch(self) -> int:
        return self.slotmap.epoch if self.slotmap is not None else 0


class ClusterView:
    def __init__(self, etcd: Etcd, cluster: str, *, resync_s: float = 10.0) -> None:
        self.etcd = etcd
        self.cluster = cluster
        self.resync_s = resync_s
        self.state = ClusterState()
        self.connected = False  # the watch is established (etcd reachable)
        self._prefix = prefix(cluster)
        self._nodes_prefix = nodes_prefix(cluster)
        self._slotmap_key = slotmap_key(cluster)
        self._leader_key = leader_key(cluster)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._queue: queue.Queue[list[WatchEvent] | Exception | None] | None = None
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[ClusterState], None]] = []

    # -- state updates
    def _publish(self, state: ClusterState) -> None:
        with self._changed:
            old = self.state
            if state.slotmap is not None and old.slotmap is not None and state.slotmap.epoch < old.slotmap.epoch:
                # Never go back in epochs (a stale read racing a newer watch event).
                state = ClusterState(state.nodes, old.slotmap, old.slotmap_revision, state.leader, state.revision)
            self.state = state
            self._changed.notify_all()
        for fn in self.listeners:
            try:
                fn(state)
            except Exception:  # noqa: BLE001 - a listener must not kill the watcher
                log.exception("cluster view listener failed")

    def _apply(self, kvs: list[KV], revision: int) -> ClusterState:
        nodes: dict[str, NodeInfo] = {}
        slotmap, smrev, leader = None, 0, None
        for kv in kvs:
            if kv.key.startswith(self._nodes_prefix):
                try:
                    info = NodeInfo.decode(kv.value)
                    nodes[info.node_id] = info
                except (ValueError, KeyError):
                    log.warning("ignoring malformed node record %s", kv.key)
            elif kv.key == self._slotmap_key:
                try:
                    slotmap, smrev = SlotMap.decode(kv.value), kv.mod_revision
                except (ValueError, KeyError, IndexError):
                    log.warning("ignoring malformed slot map")
            elif kv.key == self._leader_key:
                leader = kv.value.decode(errors="replace")
        return ClusterState(nodes, slotmap, smrev, leader, revision)

    def _apply_events(self, events: list[WatchEvent]) -> None:
        st = self.state
        nodes = dict(st.nodes)
        slotmap, smrev, leader, rev = st.slotmap, st.slotmap_revision, st.leader, st.revision
        for ev in events:
            rev = max(rev, ev.mod_revision)
            if ev.key.startswith(self._nodes_prefix):
                node_id = ev.key[len(self._nodes_prefix):]
                if ev.value is None:
                    nodes.pop(node_id, None)
                else:
                    try:
                        nodes[node_id] = NodeInfo.decode(ev.value)
                    except (ValueError, KeyError):
                        log.warning("ignoring malformed node record %s", ev.key)
            elif ev.key == self._slotmap_key:
                if ev.value is None:
                    slotmap, smrev = None, 0
                else:
                    try:
                        slotmap, smrev = SlotMap.decode(ev.value), ev.mod_revision
                    except (ValueError, KeyError, IndexError):
                        log.warning("ignoring malformed slot map")
            elif ev.key == self._leader_key:
                leader = None if ev.value is None else ev.value.decode(errors="replace")
        self._publish(ClusterState(nodes, slotmap, smrev, leader, rev))

    # -- blocking API
    def load(self) -> ClusterState:
        """List everything now (raises EtcdUnavailable)."""
        kvs, rev = self.etcd.get_prefix(self._prefix)
        self._publish(self._apply(kvs, rev))
        return self.state

    def refresh(self) -> ClusterState:
        """Read nodes and slot map again right now (after a MOVED); raises EtcdUnavailable."""
        return self.load()

    def wait_for(self, predicate: Callable[[ClusterState], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.state), timeout)

    # -- the watcher thread
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"memkv-view-{self.cluster}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        q = self._queue
        if q is not None:
            q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            watch_id = None
            try:
                st = self.load()
                q: queue.Queue[list[WatchEvent] | Exception | None] = queue.Queue()
                self._queue = q
                if self._stop.is_set():
                    return
                watch_id = self.etcd.watch_prefix(self._prefix, st.revision + 1, q.put)
                self.connected = True
                backoff = 0.1
                resync_at = time.monotonic() + self.resync_s
                while True:
                    try:
                        item = q.get(timeout=max(0.05, resync_at - time.monotonic()))
                    except queue.Empty:
                        break  # periodic re-list
                    if item is None:
                        return
                    if isinstance(item, Exception):
                        raise EtcdUnavailable(f"watch broke: {item!r}")
                    if item:
                        self._apply_events(item)
            except EtcdUnavailable as exc:
                if self.connected:
                    log.warning("etcd watch of cluster %s lost (%s); retrying", self.cluster, exc)
                self.connected = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # noqa: BLE001 - keep watching whatever happens
                log.exception("cluster view of %s failed; retrying", self.cluster)
                self.connected = False
                self._stop.wait(1.0)
            finally:
                if watch_id is not None:
                    self.etcd.cancel_watch(watch_id)


def open_view(parsed: ParsedURL, timeout: float) -> ClusterView:
    """A started view of the cluster of an ``etcd://`` URL (blocking: retries etcd for ``timeout`` s)."""
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
