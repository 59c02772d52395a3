"""One event stream: a topic, its gap-free sequence numbers and its replay buffer (pure, no I/O).

A publisher owns one stream per topic (docs/routing.md, "scopes"). Every batch
a stream publishes gets the next sequence number, so a subscriber that sees
seq N after N-2 knows it missed exactly one batch and asks the replay endpoint
for it. The buffer keeps the newest batches, bounded both in count (vLLM's
``buffer_steps``) and in bytes, so a burst of large batches cannot grow a node's
memory without limit; a subscriber that falls further behind than the buffer
gets a replay that starts later than it asked, sees the hole and resynchronises.

A stream's first batch (seq 0) is always ``[AllBlocksCleared]``: whatever this
publisher (or an earlier incarnation of it, before a restart) claimed before is
void, and only claims made after it count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from memkv.events.wire import AllBlocksCleared, EventBatch, KVEvent, encode_batch

DEFAULT_BUFFER_BATCHES = 10_000  # vLLM's buffer_steps default
DEFAULT_BUFFER_BYTES = 64 << 20


class EventStream:
    """Sequence numbers and the replay buffer of one topic."""

    def __init__(self, topic: str, *, buffer_batches: int = DEFAULT_BUFFER_BATCHES,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, clock: Callable[[], float] = time.time) -> None:
        if buffer_batches < 1 or buffer_bytes < 1:
            raise ValueError("the replay buffer must hold at least one batch")
        self.topic = topic.encode("utf-8")
        self._clock = clock
        self._max_batches = buffer_batches
        self._max_bytes = buffer_bytes
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffered_bytes = 0
        self._next_seq = 0
        self.dropped_from_buffer = 0
        # The first claim of every stream: earlier claims (a previous process) are void.
        self.first = self.add([AllBlocksCleared()])

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def add(self, events: Iterable[KVEvent]) -> tuple[int, bytes]:
        """Encode ``events`` as the next batch; returns (seq, payload) to publish."""
        payload = encode_batch(EventBatch(ts=self._clock(), events=list(events)))
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        self._buffered_bytes += len(payload)
        # Keep at least the newest batch even when it alone exceeds the byte bound.
        while len(self._buffer) > 1 and (len(self._buffer) > self._max_batches
                                         or self._buffered_bytes > self._max_bytes):
            _, old = self._buffer.popleft()
            self._buffered_bytes -= len(old)
            self.dropped_from_buffer += 1
        return seq, payload

    def replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        """Buffered batches with ``seq >= start_seq``, oldest first (may start later than asked)."""
        if not self._buffer or start_seq >= self._next_seq:
            return []
        oldest = self._buffer[0][0]
        skip = max(0, start_seq - oldest)
        return [self._buffer[i] for i in range(skip, len(self._buffer))]

    @property
    def oldest_seq(self) -> int | None:
        return self._buffer[0][0] if self._buffer else None

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    def __len__(self) -> int:
        return len(self._buffer)
