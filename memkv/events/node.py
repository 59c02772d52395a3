"""A node's KV events: the blocks it holds, announced to routers in vLLM's format.

``memkv serve --kv-events tcp://HOST:PORT`` (or ``[events] endpoint``) adds this
subsystem to the node (memkv/tools/cli.py ``build_node``). It is a node
extension (memkv/server/extension.py) that declares:

* a **store observer** (memkv/engine/observer.py): every value that enters the
  index is looked at once -- four bytes decide whether it is an engine block
  (memkv/protocol/block_header.py); a block's header gives the engine's hash,
  its parent, its token ids, size, model and LoRA. Every value that leaves it
  (eviction, TTL, delete, purge, a slot handed off after a migration, a
  replacement, corruption) is one dict lookup. Claims are reference-counted
  per scope (``claims.py``);
* a **background task** that hands what the hooks produced to the publisher
  once per scheduling round (a ``put_many`` of 500 blocks is one batch, not
  500), announces what the node recovered from flash when it starts, and
  announces a scope again after the publisher lost a batch of it;
* a **STATS section** and **/metrics gauges**, and the endpoints the node
  **advertises** in its cluster record (``kv_events``, ``kv_events_replay``,
  ``kv_events_topic``), where routers discover them.

Streams (memkv/events/wire.py): the node stream ``BASE@NODE@`` (the default
stream; its seq 0 is ``AllBlocksCleared``, so a restarted node voids every
claim it made before anything else) and one stream per scope ``BASE@NODE@MODEL
@NAMESPACE@TENANT``. The tenant part is the namespace's key-space owner: empty
in shared namespaces, the tenant in tenant-scoped ones, so a router never
counts one tenant's blocks for another. ``cache_salt`` needs nothing more:
vLLM folds it into the first block's hash, so salted prompts have chains of
their own.

When events are off the node has no observer: the store's write path pays one
test of an empty tuple.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from memkv.errors import InvalidArgument
from memkv.events.claims import Claims, block_stored
from memkv.events.publisher import KVEventPublisher
from memkv.events.stream import DEFAULT_BUFFER_BATCHES, DEFAULT_BUFFER_BYTES
from memkv.events.wire import KVEvent, Scope, node_topic, parse_store_topic, store_topic
from memkv.protocol.block_header import MAGIC, PREFIX, read_block
from memkv.server.extension import Extension, NodeContext
from memkv.sizes import parse_size

if TYPE_CHECKING:
    from memkv.config import NodeConfig
    from memkv.engine.entry import Entry
    from memkv.engine.store import Store

log = logging.getLogger("memkv.events")

DEFAULT_TOPIC = "kv"
HEAD_READ = 4096  # bytes read to find a recovered value's header (a longer header is read again whole)
SCAN_BATCH = 256  # recovered values looked at between two yields to the node's other tasks
MAX_PENDING = 4096  # events held for one scheduling round before they are handed over at once
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class EventsConfig:
    """``[events]`` of the node's config (``--kv-events`` sets ``endpoint``)."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = DEFAULT_TOPIC
    buffer_batches: int = DEFAULT_BUFFER_BATCHES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    block_hash: str = "int"  # "int": the low 64 bits, as vLLM publishes by default; "bytes": the whole hash
    namespaces: frozenset[str] | None = None  # the namespaces whose blocks are announced (None: all)

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> EventsConfig | None:
        """The node's events settings, or None when it publishes none (no endpoint)."""
        raw = dict(cfg.extra.get("events") or {})
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidArgument(f"[events]: unknown keys {unknown} (known: {sorted(cls.__dataclass_fields__)})")
        if not raw.get("endpoint"):
            return None
        for key in ("endpoint", "replay_endpoint"):
            if raw.get(key) is not None and not str(raw[key]).startswith(("tcp://", "ipc://", "inproc://")):
                raise InvalidArgument(f"[events] {key}: a ZMQ endpoint like tcp://HOST:PORT, not {raw[key]!r}")
        if raw.get("replay_endpoint") is None:
            raw["replay_endpoint"] = default_replay_endpoint(str(raw["endpoint"]))
        if "buffer_bytes" in raw and isinstance(raw["buffer_bytes"], str):
            raw["buffer_bytes"] = parse_size(raw["buffer_bytes"])
        if raw.get("block_hash", "int") not in ("int", "bytes"):
            raise InvalidArgument('[events] block_hash: "int" (vLLM\'s default) or "bytes"')
        if raw.get("namespaces") is not None:
            unknown_ns = sorted(set(raw["namespaces"]) - set(cfg.namespaces))
            if unknown_ns:
                raise InvalidArgument(f"[events] namespaces: unknown namespaces {unknown_ns}")
            raw["namespaces"] = frozenset(raw["namespaces"])
        return cls(**raw)


def default_replay_endpoint(endpoint: str) -> str:
    """Where replays are served when ``replay_endpoint`` is not set: the next port (``:0``: any port).

    Without a replay endpoint a router that subscribes a moment after a batch
    went out (ZMQ's slow joiner) would miss it for good, so a node always has one.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return f"{endpoint}-replay"
    host, _, port = rest.rpartition(":")
    return f"tcp://{host}:{int(port) + 1 if port.isdigit() and int(port) else 0}"


class NodeEvents:
    """The KV-event subsystem of one node (a ``NodeExtension`` and the store's observer)."""

    def __init__(self, config: EventsConfig) -> None:
        self.config = config
        self.claims = Claims(as_int=config.block_hash == "int")
        self.publisher: KVEventPublisher | None = None
        self.store: Store | None = None
        self.node: NodeContext | None = None
        self.node_id = ""
        self._topics: dict[Scope, str] = {}
        self._pending: dict[Scope, list[KVEvent]] = {}
        self._pending_n = 0
        self._wake = trio.Event()
        self._reannounce: set[str] = set()  # topics the publisher cleared (filled from its thread)
        self._reannounce_lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self.recovered_announced = 0
        self.reannouncements = 0
        self.unreadable = 0

    def extend(self, node: NodeContext) -> Extension:
        self.node = node
        self.store = node.store
        self.node_id = node.node_id
        cfg = self.config
        self.publisher = KVEventPublisher(cfg.endpoint, replay_endpoint=cfg.replay_endpoint,
                                          topic=node_topic(cfg.topic, self.node_id),
                                          buffer_batches=cfg.buffer_batches, buffer_bytes=cfg.buffer_bytes,
                                          on_clear=self._cleared)
        log.info("kv events of node %s on %s (replay %s), topics %s*", self.node_id, self.publisher.endpoint,
                 self.publisher.replay_endpoint, node_topic(cfg.topic, self.node_id))
        return Extension("events", background=(self.run,), stats=self.stats, metrics=self.metrics,
                         store_observer=self, advertise=self.advertise)

    # -- the store's hooks (memkv/engine/observer.py): on the write path, keep them short --------
    def indexed(self, entry: Entry) -> None:
        ns = self.config.namespaces
        if (ns is not None and entry.namespace not in ns) or entry.length < PREFIX.size:
            return
        assert self.store is not None
        view = self.store.view(entry)
        if view[:4] != MAGIC:
            return
        self._track(entry, view)

    def dropped(self, entry: Entry, reason: str) -> None:
        got = self.claims.dropped(entry.ikey)
        if got is not None:
            self._add(*got)

    # -- what the hooks and the scans share ---------------------------------------------------
    def _track(self, entry: Entry, head: Any) -> None:
        header = read_block(head)
        if header is None:
            return
        scope = (header.model, entry.ikey[0], entry.ikey[1])
        event = self.claims.stored(entry.ikey, scope, header)
        if event is not None:
            self._add(scope, event)

    def _add(self, scope: Scope, event: KVEvent) -> None:
        events = self._pending.get(scope)
        if events is None:
            events = self._pending[scope] = []
        events.append(event)
        self._pending_n += 1
        if self._pending_n >= MAX_PENDING:
            self._flush()
        elif self._pending_n == 1:
            self._wake.set()

    def _flush(self) -> None:
        pending, self._pending, self._pending_n = self._pending, {}, 0
        assert self.publisher is not None
        for scope, events in pending.items():
            self.publisher.publish(events, topic=self._topic(scope))

    def _topic(self, scope: Scope) -> str:
        topic = self._topics.get(scope)
        if topic is None:
            topic = self._topics[scope] = store_topic(self.config.topic, self.node_id, scope)
        return topic

    def _read_header(self, entry: Entry) -> bytes | None:
        """The header bytes of a value, from the region or read back from flash (no promotion)."""
        assert self.store is not None
        head = self.store.head(entry, HEAD_READ)
        if head is None or len(head) < PREFIX.size or head[:4] != MAGIC:
            return head
        hlen = PREFIX.unpack(head[:PREFIX.size])[3]
        if len(head) < hlen <= entry.length:
            head = self.store.head(entry, hlen)
        return head

    # -- background ------------------------------------------------------------------------------
    async def run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        assert self.publisher is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_loop)
                await self._announce_recovered()
                while True:
                    await trio.sleep(0.1)
                    with self._reannounce_lock:
                        topics, self._reannounce = self._reannounce, set()
                    for topic in topics:
                        await self._announce_again(topic)
        finally:
            self.publisher.close()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._flush()

    async def _announce_recovered(self) -> None:
        """Announce the blocks the node holds from before it started (recovered from flash)."""
        assert self.store is not None
        store = self.store
        ns = self.config.namespaces
        for i, entry in enumerate(store.entries()):
            if (ns is None or entry.namespace in ns) and not self.claims.tracks(entry.ikey) and store.current(entry):
                head = self._read_header(entry)
                if head is None:
                    self.unreadable += 1
                elif head[:4] == MAGIC:
                    before = self.claims.values
                    self._track(entry, head)
                    self.recovered_announced += self.claims.values - before
            if i % SCAN_BATCH == SCAN_BATCH - 1:
                await trio.sleep(0)
        if self.recovered_announced:
            log.info("kv events: %d recovered blocks announced", self.recovered_announced)

    def _cleared(self, topic: str) -> None:
        """Publisher thread: it announced ``topic`` cleared after losing a batch; announce it again."""
        with self._reannounce_lock:
            self._reannounce.add(topic)

    async def _announce_again(self, topic: str) -> None:
        assert self.store is not None
        try:
            _, _, scope = parse_store_topic(topic)
        except ValueError:
            return
        self.reannouncements += 1
        keys: list[Hashable] = list(self.claims.one_value_per_block(scope))  # scope None: the node stream
        for i, key in enumerate(keys):
            entry = self.store.lookup(key)  # type: ignore[arg-type]
            if entry is not None:
                head = self._read_header(entry)
                header = read_block(head) if head is not None else None
                if header is not None:
                    self._add((header.model, entry.ikey[0], entry.ikey[1]),
                              block_stored(header, as_int=self.claims.as_int))
            if i % SCAN_BATCH == SCAN_BATCH - 1:
                await trio.sleep(0)

    # -- what the node reports -----------------------------------------------------------------
    def advertise(self) -> dict[str, str]:
        assert self.publisher is not None
        out = {"kv_events": self._reachable(self.publisher.endpoint), "kv_events_topic": self.config.topic}
        if self.publisher.replay_endpoint:
            out["kv_events_replay"] = self._reachable(self.publisher.replay_endpoint)
        return out

    def _reachable(self, endpoint: str) -> str:
        """A bound ``tcp://0.0.0.0:P`` as others reach it: the node's listen host, else this host's address."""
        scheme, _, rest = endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or host not in WILDCARD_HOSTS:
            return endpoint
        assert self.node is not None
        host = self.node.address().rpartition(":")[0].strip("[]")
        if host in WILDCARD_HOSTS:
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        return f"tcp://{f'[{host}]' if ':' in host else host}:{port}"

    def stats(self) -> dict[str, Any]:
        assert self.publisher is not None
        ps = self.publisher.stats
        return {"node": self.node_id, "endpoint": self._reachable(self.publisher.endpoint),
                "replay_endpoint": (self._reachable(self.publisher.replay_endpoint)
                                    if self.publisher.replay_endpoint else None),
                "topic": self.config.topic, "node_topic": node_topic(self.config.topic, self.node_id),
                "block_hash": self.config.block_hash, "blocks": len(self.claims), "values": self.claims.values,
                "scopes": len(self.claims.scopes()), "batches": ps.batches, "events": ps.events,
                "overflows": ps.overflows, "replay_requests": ps.replay_requests,
                "recovered_announced": self.recovered_announced, "reannouncements": self.reannouncements}

    def metrics(self) -> dict[str, float]:
        assert self.publisher is not None
        ps = self.publisher.stats
        return {"events_blocks": len(self.claims), "events_batches": ps.batches, "events_published": ps.events,
                "events_overflows": ps.overflows, "events_replay_requests": ps.replay_requests}
