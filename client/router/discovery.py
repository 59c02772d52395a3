"""Which memkv nodes a router follows, and where their KV events are (``memkv route --store URL``).

* ``etcd://HOST:PORT/CLUSTER``: every node registered in the cluster, as it
  joins and leaves. A node's record (``nodes/<id>``) carries what its KV-event
  subsystem advertises (memkv/events/node.py): ``kv_events``,
  ``kv_events_replay``, ``kv_events_topic``. A node whose lease lapses is
  dropped and every claim it made with it.
* ``memkv://HOST:PORT``: one standalone node; its STATS ``events`` section says
  where it publishes (with the tenant and token of ``$MEMKV_TENANT`` /
  ``$MEMKV_TOKEN`` when the node authenticates).
* ``tcp://HOST:PORT?node=ID[&replay=tcp://...&topic=BASE&host=H]``: a node's
  event endpoint given by hand.

The host a node is on (for the router's same-host test) is the host of its
event endpoint. :class:`StoreFollower` keeps a :class:`PrefixIndex` and its
:class:`EventFeeds` following exactly the nodes these name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from memkv.client.router.index import PrefixIndex, StoreNode
from memkv.client.router.zmq_feed import EventFeeds, FeedSpec
from memkv.client.url import parse_url
from memkv.events.wire import node_topic

DEFAULT_TOPIC = "kv"


@dataclass(frozen=True)
class StoreSource:
    """One memkv node as the router follows it."""

    node: StoreNode
    feed: FeedSpec


def _host_of(endpoint: str) -> str | None:
    return urlsplit(endpoint).hostname


def source(node_id: str, endpoint: str, replay: str | None, topic: str, host: str | None = None) -> StoreSource:
    return StoreSource(StoreNode(node_id, host=host or _host_of(endpoint)),
                       FeedSpec(node_id, "store", endpoint, replay, node_topic(topic, node_id)))


def from_services(node_id: str, services: dict[str, str]) -> StoreSource | None:
    """A node's cluster record -> where to follow it (None: it publishes no KV events)."""
    endpoint = services.get("kv_events")
    if not endpoint:
        return None
    return source(node_id, endpoint, services.get("kv_events_replay"), services.get("kv_events_topic", DEFAULT_TOPIC))


def from_tcp_url(url: str) -> StoreSource:
    parts = urlsplit(url)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if "node" not in q:
        raise ValueError(f"--store {url!r}: node=ID is required (the node id in its topics)")
    return source(q["node"], f"tcp://{parts.hostname}:{parts.port}", q.get("replay"), q.get("topic", DEFAULT_TOPIC),
                  q.get("host"))


def from_node(url: str, *, timeout: float = 10.0) -> StoreSource:
    """Ask a standalone node (memkv://) where it publishes (blocking)."""
    from memkv.client import SyncClient

    with SyncClient.connect(url, tenant=os.environ.get("MEMKV_TENANT") or None,
                            token=os.environ.get("MEMKV_TOKEN") or None, timeout=timeout) as client:
        st = client.stats()
    ev = st.get("events")
    if not isinstance(ev, dict) or not ev.get("endpoint"):
        raise ValueError(f"--store {url}: the node publishes no KV events (start it with --kv-events)")
    return source(str(ev["node"]), str(ev["endpoint"]), ev.get("replay_endpoint"), str(ev.get("topic", DEFAULT_TOPIC)))


class EtcdStores:
    """The nodes of a cluster with KV events, kept current from etcd (``current()`` never blocks)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        from memkv.client.cluster_view import open_view

        self.view: Any = open_view(parse_url(url), timeout)

    def current(self) -> dict[str, StoreSource]:
        out: dict[str, StoreSource] = {}
        for node_id, info in self.view.state.nodes.items():
            src = from_services(node_id, info.services)
            if src is not None:
                out[node_id] = src
        return out

    def close(self) -> None:
        self.view.stop()
        self.view.etcd.close()


def parse_store(url: str) -> StoreSource | EtcdStores:
    """``--store URL``: a fixed node (tcp://, memkv://) or a cluster to watch (etcd://); blocking."""
    scheme = url.partition("://")[0]
    if scheme == "tcp":
        return from_tcp_url(url)
    if scheme in ("memkv", "memkvs"):
        return from_node(url)
    if scheme == "etcd":
        return EtcdStores(url)
    raise ValueError(f"--store {url!r}: etcd://HOST:PORT/CLUSTER, memkv://HOST:PORT or tcp://HOST:PORT?node=ID")


class StoreFollower:
    """Keeps an index and its feeds following the memkv nodes of ``--store`` URLs.

    Nodes given by hand are always followed; a cluster's nodes as etcd lists
    them. ``refresh()`` (cheap, never blocks: the cluster views follow etcd on
    their own threads) adds the nodes that joined and drops those that left --
    a dropped node loses every claim it made -- and follows a node again from
    scratch when its endpoints changed (it restarted on other ports).
    """

    def __init__(self, index: PrefixIndex, feeds: EventFeeds, stores: list[StoreSource | EtcdStores]) -> None:
        self.index = index
        self.feeds = feeds
        self.fixed = {s.node.name: s for s in stores if isinstance(s, StoreSource)}
        self.clusters = [s for s in stores if isinstance(s, EtcdStores)]
        self.followed: dict[str, StoreSource] = {}
        self.refresh()

    def refresh(self) -> None:
        wanted = dict(self.fixed)
        for cluster in self.clusters:
            wanted.update(cluster.current())
        for name, src in list(self.followed.items()):
            if wanted.get(name) != src:
                self.feeds.remove(name)
                self.index.remove_store_node(name)
                del self.followed[name]
        for name, src in wanted.items():
            if name not in self.followed:
                self.index.add_store_node(src.node)
                self.feeds.add(src.feed)
                self.followed[name] = src

    def close(self) -> None:
        for cluster in self.clusters:
            cluster.close()
