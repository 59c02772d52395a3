"""ZMQ publisher of KV-event streams: a PUB socket, a ROUTER replay socket, one thread.

Why a thread: ZMQ sockets must stay on one thread and pyzmq has no trio
integration, so (as vLLM's ``ZmqEventPublisher``) one thread owns both sockets
and everything that touches them; callers on any thread (the node's trio loop)
only put event lists on a bounded queue, which never blocks them.

Overflow: if the queue is full the events are *not* silently dropped (a
router would keep believing a removed block is there, with no gap to notice).
The topic's *epoch* moves on instead: whatever is still queued for it from
the earlier epoch is discarded (it precedes the hole), the thread publishes
``AllBlocksCleared`` on that topic before anything of the new epoch, and calls
``on_clear(topic)`` so that the owner announces its current contents again.
Routers see a void-everything event in sequence, never a wrong claim.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq

from memkv.events.stream import DEFAULT_BUFFER_BATCHES, DEFAULT_BUFFER_BYTES, EventStream
from memkv.events.wire import (
    END_SEQ,
    RESYNC_SEQ,
    AllBlocksCleared,
    KVEvent,
    WireError,
    parse_replay_request,
    pub_frames,
    seq_bytes,
)

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 100_000  # vLLM's max_queue_size default
DEFAULT_HWM = 100_000


@dataclass
class PublisherStats:
    batches: int = 0
    events: int = 0
    replay_requests: int = 0
    replayed_batches: int = 0
    bad_replay_requests: int = 0
    overflows: int = 0  # batches lost to a full queue
    clears: int = 0  # AllBlocksCleared published after a loss or a resync request
    resyncs: int = 0
    per_topic_seq: dict[str, int] = field(default_factory=dict)


class KVEventPublisher:
    """Publishes event batches on per-topic streams; serves vLLM's replay protocol.

    ``endpoint`` and ``replay_endpoint`` are bound (``tcp://HOST:PORT``; port 0
    picks a free one, read it back from :attr:`endpoint`). ``topic`` is the
    default stream, created (and so announced as cleared) at start; other
    topics are created on first use, each starting with its own cleared event.
    """

    def __init__(self, endpoint: str, *, replay_endpoint: str | None = None, topic: str = "",
                 buffer_batches: int = DEFAULT_BUFFER_BATCHES, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 max_queue: int = DEFAULT_QUEUE, hwm: int = DEFAULT_HWM,
                 on_clear: Callable[[str], None] | None = None) -> None:
        self._buffer_batches = buffer_batches
        self._buffer_bytes = buffer_bytes
        self._on_clear = on_clear
        self._queue: queue.Queue[tuple[str, int, list[KVEvent]] | None] = queue.Queue(maxsize=max_queue)
        self._overflowed: set[str] = set()
        self._overflow_lock = threading.Lock()
        self._epochs: dict[str, int] = {}  # topic -> epoch: moves on when a batch of the topic is lost
        self._cleared_epoch: dict[str, int] = {}  # publisher thread: the epoch whose AllBlocksCleared went out
        self.stats = PublisherStats()
        self.default_topic = topic
        self._streams: dict[str, EventStream] = {}
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = _bind(self._pub, endpoint)
        self._replay: zmq.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = _bind(self._replay, replay_endpoint)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="memkv-kv-events", daemon=True)
        self._thread.start()
        self.publish([], topic=topic)  # creates the default stream: its seq 0 is AllBlocksCleared

    # -- any thread ------------------------------------------------------------------
    def publish(self, events: Iterable[KVEvent], *, topic: str | None = None) -> None:
        """Queue ``events`` as one batch on ``topic`` (default stream if None). Never blocks."""
        if not self._running:
            raise RuntimeError("publisher is closed")
        name = self.default_topic if topic is None else topic
        epoch = self._epochs.get(name, 0)
        try:
            self._queue.put_nowait((name, epoch, list(events)))
        except queue.Full:
            with self._overflow_lock:
                self._epochs[name] = max(self._epochs.get(name, 0), epoch + 1)
                self._overflowed.add(name)
                self.stats.overflows += 1

    def close(self, timeout: float = 2.0) -> None:
        """Publish what is queued, then stop the thread and close the sockets."""
        if not self._running:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the publisher thread --------------------------------------------------------
    def _stream(self, topic: str) -> EventStream:
        stream = self._streams.get(topic)
        if stream is None:
            stream = EventStream(topic, buffer_batches=self._buffer_batches, buffer_bytes=self._buffer_bytes)
            self._streams[topic] = stream
            self._send(stream, *stream.first, events=1)
        return stream

    def _send(self, stream: EventStream, seq: int, payload: bytes, *, events: int) -> None:
        self._pub.send_multipart(pub_frames(stream.topic, seq, payload))
        self.stats.batches += 1
        self.stats.events += events
        self.stats.per_topic_seq[stream.topic.decode()] = seq

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._serve_replay()
            self._handle_overflow()
            try:
                item = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if item is None:
                break
            topic, epoch, events = item
            latest = self._epochs.get(topic, 0)
            self._clear_up_to(topic, min(epoch, latest))
            if epoch < latest:
                continue  # queued before a batch of this topic was lost: void, like everything before it
            stream = self._stream(topic)
            if events:
                self._send(stream, *stream.add(events), events=len(events))

    def _handle_overflow(self) -> None:
        with self._overflow_lock:
            topics, self._overflowed = self._overflowed, set()
        for topic in topics:
            self._clear_up_to(topic, self._epochs.get(topic, 0))

    def _clear_up_to(self, topic: str, epoch: int) -> None:
        """Publish ``AllBlocksCleared`` on ``topic`` once per lost epoch, before anything of a later one."""
        if self._cleared_epoch.get(topic, 0) >= epoch:
            return
        self._cleared_epoch[topic] = epoch
        self.stats.clears += 1
        log.warning("kv events: %r announced cleared (a batch of it was lost, or a router asked for its "
                    "contents again); its blocks are announced again", topic)
        stream = self._stream(topic)
        self._send(stream, *stream.add([AllBlocksCleared()]), events=1)
        if self._on_clear is not None:
            self._on_clear(topic)

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        try:
            identity, start, topic = parse_replay_request(frames)
        except WireError as exc:
            self.stats.bad_replay_requests += 1
            log.warning("kv events: bad replay request: %s", exc)
            if frames and len(frames) >= 2 and frames[1] == b"":
                self._replay.send_multipart((frames[0], b"", b"", END_SEQ, b""))
            return
        self.stats.replay_requests += 1
        name = self.default_topic if topic is None else topic.decode("utf-8", "replace")
        if start == RESYNC_SEQ:
            if name in self._streams:
                self.stats.resyncs += 1
                with self._overflow_lock:  # as after a lost batch: cleared in sequence, then announced again
                    self._epochs[name] = self._epochs.get(name, 0) + 1
                    self._overflowed.add(name)
        elif name.endswith("*"):
            for t, stream in list(self._streams.items()):
                if t.startswith(name[:-1]):
                    self._send_replay(identity, stream, start)
        elif name in self._streams:
            self._send_replay(identity, self._streams[name], start)
        self._replay.send_multipart((identity, b"", b"", END_SEQ, b""))

    def _send_replay(self, identity: bytes, stream: EventStream, start: int) -> None:
        assert self._replay is not None
        for seq, payload in stream.replay(start):
            self._replay.send_multipart((identity, b"", stream.topic, seq_bytes(seq), payload))
            self.stats.replayed_batches += 1


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``endpoint`` (a ``tcp://H:0`` port is chosen by the OS) and return the bound address."""
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
