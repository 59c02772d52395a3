"""The I/O side of following event streams: ZMQ SUB + replay DEALER sockets, one thread.

Every source (an engine replica's vLLM publisher, or a memkv node's) gets a
SUB socket, a DEALER socket for vLLM's replay protocol, and a socket monitor.
One thread polls them all (ZMQ sockets stay on the thread that made them) and
turns what arrives into index updates, following :mod:`feed`'s rules.

Subscribing: when the SUB connects, what the source published before is
asked for by replay from 0 -- an engine's one stream, or (memkv's wildcard
request) every stream of a node, which is how the router learns the node's
scopes. A node's stream whose replay cannot reach back to its start (the
buffer is bounded) is asked for its contents again (memkv's resync request),
so a router that starts late still learns every block, not just the newest.

Disconnects: when a SUB loses its TCP connection (the publisher crashed or
restarted, the network broke, or heartbeats stopped), the source's claims are
cleared at once and its streams are treated as never synced. Sequence numbers
alone cannot tell a restarted publisher that already passed our last seq from
a gap, so the connection itself is the witness; the stale-claim window is one
disconnect notice (at most ``HEARTBEAT_TIMEOUT_MS`` for a silent peer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from memkv.client.router.feed import Action, FeedState
from memkv.client.router.index import PrefixIndex
from memkv.events.wire import (
    RESYNC_SEQ,
    AllBlocksCleared,
    WireError,
    decode_batch,
    parse_pub_frames,
    parse_replay_reply,
    parse_store_topic,
    replay_request,
)

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 1.0
POLL_MS = 50
HEARTBEAT_IVL_MS = 1000  # ZMTP heartbeats: a publisher that stopped answering counts as disconnected ...
HEARTBEAT_TIMEOUT_MS = 5000  # ... after this long
RESYNC_EVERY_S = 5.0  # a stream is asked for its contents again at most this often


@dataclass
class FeedSpec:
    """Where one source publishes. ``kind`` is "replica" (vLLM) or "store" (memkv node)."""

    name: str
    kind: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""  # subscription prefix; a store node: "BASE@NODE@"


@dataclass
class FeedStats:
    batches: int = 0
    decode_errors: int = 0
    replays: int = 0
    resyncs: int = 0
    disconnects: int = 0
    streams: dict[str, FeedState] = field(default_factory=dict)


class _Source:
    def __init__(self, ctx: zmq.Context, spec: FeedSpec) -> None:
        self.spec = spec
        self.stats = FeedStats()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sub.setsockopt(zmq.SUBSCRIBE, spec.topic.encode("utf-8"))
        self.sub.connect(spec.endpoint)
        self.ctx = ctx
        self.dealer: zmq.Socket | None = None
        self.resync_at: dict[bytes, float] = {}
        self.caught_up = False  # this connection's history was asked for (_catch_up_all)

    def replay(self, start: int, topic: bytes | None) -> list[tuple[bytes, int, bytes]]:
        """Ask for batches from ``start``; [] on no endpoint or no complete answer in time."""
        if self.spec.replay_endpoint is None:
            return []
        if self.dealer is None:
            self.dealer = self.ctx.socket(zmq.DEALER)
            self.dealer.setsockopt(zmq.LINGER, 0)
            self.dealer.connect(self.spec.replay_endpoint)
        self.stats.replays += 1
        self.dealer.send_multipart(replay_request(start, topic))
        out: list[tuple[bytes, int, bytes]] = []
        deadline = time.monotonic() + REPLAY_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.dealer.poll(int(left * 1000) + 1):
                break
            try:
                t, seq, payload = parse_replay_reply(self.dealer.recv_multipart())
            except WireError as exc:
                log.warning("%s: bad replay reply: %s", self.spec.name, exc)
                break
            if seq == -1:
                return out
            out.append((t, seq, payload))
        # No end marker in time: drop the socket so late replies cannot mix with the next replay.
        log.warning("%s: replay from %d did not complete in %.1fs", self.spec.name, start, REPLAY_TIMEOUT_S)
        self.dealer.close(linger=0)
        self.dealer = None
        return []

    def close(self) -> None:
        self.sub.disable_monitor()
        self.monitor.close(linger=0)
        self.sub.close(linger=0)
        if self.dealer is not None:
            self.dealer.close(linger=0)


class EventFeeds:
    """Follows every source's streams into a :class:`PrefixIndex` (a thread; start/close)."""

    def __init__(self, index: PrefixIndex, *, on_error: Callable[[str, Exception], None] | None = None) -> None:
        self.index = index
        self._ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._pending_add: list[FeedSpec] = []
        self._pending_remove: list[str] = []
        self._sources: dict[str, _Source] = {}
        self._running = False
        self._thread: threading.Thread | None = None
        self._on_error = on_error

    # -- any thread ------------------------------------------------------------------
    def add(self, spec: FeedSpec) -> None:
        if spec.kind not in ("replica", "store"):
            raise ValueError(f"unknown source kind {spec.kind!r}")
        with self._lock:
            self._pending_add.append(spec)

    def remove(self, name: str) -> None:
        with self._lock:
            self._pending_remove.append(name)

    def stats(self) -> dict[str, FeedStats]:
        return {name: s.stats for name, s in list(self._sources.items())}

    def start(self) -> EventFeeds:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="memkv-router-feeds", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> EventFeeds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the feed thread ---------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        try:
            while self._running:
                self._apply_membership(poller)
                for sock, _ in poller.poll(POLL_MS):
                    for src in list(self._sources.values()):
                        if sock is src.sub:
                            self._drain(src)
                        elif sock is src.monitor:
                            self._monitor(src)
        finally:
            for src in self._sources.values():
                src.close()
            self._sources.clear()

    def _apply_membership(self, poller: zmq.Poller) -> None:
        with self._lock:
            adds, self._pending_add = self._pending_add, []
            removes, self._pending_remove = self._pending_remove, []
        for name in removes:
            src = self._sources.pop(name, None)
            if src is not None:
                poller.unregister(src.sub)
                poller.unregister(src.monitor)
                src.close()
        for spec in adds:
            src = _Source(self._ctx, spec)
            self._sources[spec.name] = src
            poller.register(src.sub, zmq.POLLIN)
            poller.register(src.monitor, zmq.POLLIN)

    def _monitor(self, src: _Source) -> None:
        while src.monitor.poll(0):
            event = parse_monitor_message(src.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                src.stats.disconnects += 1
                log.info("%s: publisher disconnected; its claims are void until it is back", src.spec.name)
                self._clear_all(src)
                src.caught_up = False
                for state in src.stats.streams.values():
                    state.last = None
            elif event == zmq.EVENT_CONNECTED and not src.caught_up:
                self._catch_up_all(src)  # from now on live batches reach us; what came before, by replay

    def _drain(self, src: _Source) -> None:
        for _ in range(1000):  # bounded, so membership changes and other sources get their turn
            try:
                frames = src.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                topic, seq, payload = parse_pub_frames(frames)
            except WireError as exc:
                src.stats.decode_errors += 1
                log.warning("%s: %s", src.spec.name, exc)
                continue
            self._live(src, topic, seq, payload)

    def _state(self, src: _Source, topic: bytes) -> FeedState:
        key = topic.decode("utf-8", "replace")
        state = src.stats.streams.get(key)
        if state is None:
            state = src.stats.streams[key] = FeedState()
        return state

    def _live(self, src: _Source, topic: bytes, seq: int, payload: bytes) -> None:
        if not src.caught_up and src.spec.kind == "store":
            # A live batch can arrive before the connect notice. A node's history is taken in
            # order first: its node stream's AllBlocksCleared (seq 0) must come before any
            # scope's claims, or it would void claims learned a moment earlier.
            self._catch_up_all(src)
        state = self._state(src, topic)
        action = state.on_live(seq)
        if action is Action.DUPLICATE:
            return
        if action is Action.RESTART:
            self._clear(src, topic)
        if action is not Action.APPLY:
            self._catch_up(src, topic, upto=seq)
        self._apply(src, topic, seq, payload)

    def _catch_up_all(self, src: _Source) -> None:
        """On (re)connecting: the history of every stream of the source that we do not follow yet."""
        src.caught_up = True
        store = src.spec.kind == "store"
        replayed = src.replay(0, (src.spec.topic + "*").encode() if store else None)
        topics = list(dict.fromkeys(t for t, _, _ in replayed))
        if store:  # the node stream first: its seq 0 voids what came before every scope's history
            topics.sort(key=lambda t: not self._is_node_stream(t))
        for topic in topics:
            state = self._state(src, topic)
            if state.last is not None:
                continue  # already following it live
            mine = [r for r in replayed if r[0] == topic]
            plan = state.after_replay([seq for _, seq, _ in mine], None)
            for i in plan.apply:
                self._apply(src, topic, mine[i][1], mine[i][2])
            if store and plan.incomplete:
                self._resync(src, topic)

    def _catch_up(self, src: _Source, topic: bytes, upto: int | None) -> None:
        state = self._state(src, topic)
        store = src.spec.kind == "store"
        replayed = src.replay(state.replay_from, topic if store else None)  # vLLM's ROUTER takes no topic frame
        replayed = [r for r in replayed if r[0] == topic]
        plan = state.after_replay([seq for _, seq, _ in replayed], upto)
        if plan.clear_first:
            log.info("%s: missed batches on %r could not be replayed; claims cleared", src.spec.name, topic)
            self._clear(src, topic)
        for i in plan.apply:
            _, seq, payload = replayed[i]
            self._apply(src, topic, seq, payload)
        if store and plan.incomplete:
            self._resync(src, topic)

    def _resync(self, src: _Source, topic: bytes) -> None:
        """Ask a memkv node to announce a stream's contents again (its history is gone from the buffer)."""
        now = time.monotonic()
        if now < src.resync_at.get(topic, 0.0):
            return
        src.resync_at[topic] = now + RESYNC_EVERY_S
        src.stats.resyncs += 1
        log.info("%s: %r: replay incomplete; asking the node to announce its contents again", src.spec.name, topic)
        src.replay(RESYNC_SEQ, topic)

    @staticmethod
    def _is_node_stream(topic: bytes) -> bool:
        try:
            return parse_store_topic(topic)[2] is None
        except WireError:
            return False

    def _apply(self, src: _Source, topic: bytes, seq: int, payload: bytes) -> None:
        state = self._state(src, topic)
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            # Unknown content: whatever it said is lost, so no claim of this stream can be trusted.
            src.stats.decode_errors += 1
            log.warning("%s: %s", src.spec.name, exc)
            self._clear(src, topic)
            state.applied(seq)
            return
        src.stats.batches += 1
        if src.spec.kind == "replica":
            self.index.apply_replica_events(src.spec.name, batch.events)
        else:
            try:
                _, _, scope = parse_store_topic(topic)
            except WireError as exc:
                src.stats.decode_errors += 1
                log.warning("%s: %s", src.spec.name, exc)
            else:
                if scope is not None:
                    self.index.apply_store_events(src.spec.name, scope, batch.events)
                elif any(isinstance(ev, AllBlocksCleared) for ev in batch.events):
                    self.index.clear_store(src.spec.name)  # the node stream: every claim of the node
        state.applied(seq)

    def _clear(self, src: _Source, topic: bytes) -> None:
        if src.spec.kind == "replica":
            self.index.clear_replica(src.spec.name)
            return
        try:
            _, _, scope = parse_store_topic(topic)
        except WireError:
            return
        self.index.clear_store(src.spec.name, scope)

    def _clear_all(self, src: _Source) -> None:
        if src.spec.kind == "replica":
            self.index.clear_replica(src.spec.name)
        else:
            self.index.clear_store(src.spec.name)
