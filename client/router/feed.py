"""What a subscriber does with each sequence number it sees (pure; no sockets).

One :class:`FeedState` per event stream (one publisher, one topic). The I/O
driver (``zmq_feed``) asks it what to do with each live batch and with the
result of a replay; the rules, in the order they are checked:

1. never synced (just subscribed, or after a restart): ask for a replay from 0
   so claims made before we subscribed are learned;
2. ``seq == last + 1``: apply;
3. ``seq == 0`` after others: the publisher restarted (its sequence began
   again). Every claim it made is void: clear the source, then treat as never
   synced;
4. ``0 < seq <= last``: a batch we already have (a replay and the live stream
   overlap right after subscribing): ignore it. A restarted publisher is
   recognised by its connection, not by its numbers: the I/O side clears a
   source whose TCP connection broke (``zmq_feed``), since a new incarnation
   that already passed our last seq would otherwise look like a gap;
5. ``seq > last + 1``: a gap; replay ``last + 1 ..``. If the replay covers the
   gap, apply it in order. If it does not (buffer overrun, no replay endpoint,
   no answer in time), batches were lost and a lost ``BlockRemoved`` would
   leave a stale claim, so the source is cleared (every claim void) and the
   batches we do have after the hole are applied: the index may under-claim,
   never over-claim (a memkv node can then be asked to announce the stream's
   contents again: ``zmq_feed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Action(Enum):
    APPLY = "apply"
    REPLAY = "replay"  # from FeedState.replay_from, then call after_replay
    RESTART = "restart"  # clear the source, then replay from 0
    DUPLICATE = "duplicate"  # already applied: drop it


@dataclass(frozen=True)
class ReplayPlan:
    clear_first: bool  # the hole could not be filled: clear before applying
    apply: tuple[int, ...]  # indices into the replayed list, in order
    incomplete: bool = False  # the replay did not reach back to where it was asked to start


class FeedState:
    """Sequence bookkeeping of one stream."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.gaps = 0
        self.resyncs = 0
        self.restarts = 0
        self.duplicates = 0

    def on_live(self, seq: int) -> Action:
        if self.last is None:
            return Action.REPLAY
        if seq == self.last + 1:
            return Action.APPLY
        if seq == 0:
            self.restarts += 1
            self.last = None
            return Action.RESTART
        if seq <= self.last:
            self.duplicates += 1
            return Action.DUPLICATE
        self.gaps += 1
        return Action.REPLAY

    @property
    def replay_from(self) -> int:
        return 0 if self.last is None else self.last + 1

    def after_replay(self, replayed: Sequence[int], upto: int | None) -> ReplayPlan:
        """Given the seqs a replay returned (ascending), which to apply, below ``upto`` (the live seq).

        ``upto`` None: a replay on subscribing, with no live batch yet.
        """
        start = self.replay_from
        usable = [i for i, s in enumerate(replayed) if s >= start and (upto is None or s < upto)]
        covered = [replayed[i] for i in usable]
        complete = (not covered and (upto is None or upto == start)) or (
            bool(covered) and covered[0] == start and covered == list(range(start, start + len(covered)))
            and (upto is None or covered[-1] == upto - 1))
        if self.last is None and not complete:
            # Subscribing late: the index for this source is empty, so missing early
            # history can only under-claim; no clear is needed.
            clear = False
        else:
            clear = not complete
        if clear:
            self.resyncs += 1
        if covered:
            self.last = covered[-1]
        return ReplayPlan(clear_first=clear, apply=tuple(usable), incomplete=not complete)

    def applied(self, seq: int) -> None:
        self.last = seq
