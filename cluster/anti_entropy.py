"""Anti-entropy: replicas compare per-slot digests in the background and repair what differs.

Reads repair what they touch (client/core/repair.py); a replica that missed writes or deletes
nobody reads would stay behind for ever. So every cluster node, every ``anti_entropy_interval``
seconds (``[cluster]``; 0: off), walks the slots it shares with each other replica of them:

1. ``SLOT_DIGESTS {slots, nslots}`` on the peer: one digest per slot, a sum (mod 2^64) of the
   xxh3 of each live value's ``(namespace, scope, key, version)`` -- order-free, so the two sides
   hash the same set the same way; compared with this node's own.
2. For the slots whose digests differ, ``SLOT_STATES {slots, nslots}``: the peer's
   ``[namespace, scope, key, version, tombstone]`` per key (values and tombstones).
3. :func:`to_push`: what this node holds newer than the peer -- a value newer than the peer's
   value or tombstone, or a tombstone newer than a value the peer still holds -- is sent with the
   slot copies' own path (``migration.send_states``: ``PUT_MANY`` / ``DELETE_MANY`` with
   versions, as the cluster identity); the peer keeps the newer of what it has and what it gets,
   as for any copy. What the peer holds newer, the peer pushes here in its own walk.

Tombstones are not in the digest and are pushed only onto an older value: a tombstone where the
peer holds nothing would only make the peer keep it again (a fresh retention each time, passed
back and forth for ever); the key is absent there either way.

Rate limit: ``anti_entropy_batch`` slots per ``SLOT_STATES`` call, at most ``anti_entropy_rate``
slots/s; slots with a pending migration are left to the migration. The digests are computed from
the index at each walk (one pass over this node's index per walk, one over the peer's per
``SLOT_DIGESTS``), and the states of a batch of divergent slots by one more pass each: a CPU
cost proportional to the keys held, bounded by the interval.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Iterator
from typing import Any

import trio
import xxhash

from memkv.client.cluster_map import key_slot
from memkv.cluster import migration_job
from memkv.cluster.migration import copy_item, send_states
from memkv.cluster.migration_job import IKey
from memkv.engine.store import Store
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.opcodes import Op
from memkv.server.binary import Reply
from memkv.server.extension import Operation
from memkv.server.requests import Access, Call

log = logging.getLogger("memkv.cluster.anti_entropy")

INTERNAL = Access(internal=True)
DEFAULT_INTERVAL_S = 30.0
DEFAULT_BATCH = 64
DEFAULT_RATE = 256.0  # slots per second
_MASK = (1 << 64) - 1

State = tuple[int, bool]  # (version, tombstone)


def state_hash(ikey: IKey, version: int) -> int:
    ns, scope, key = ikey
    return xxhash.xxh3_64_intdigest(b"%s\0%s\0%s" % (ns.encode(), scope.encode(), key) + struct.pack("<Q", version))


def _digests(store: Store, slots: frozenset[int], nslots: int, out: dict[int, int]) -> Iterator[None]:
    """Fill ``out`` (slot -> digest of the live values held in it, 0: none), one step per batch
    of the index."""
    out.update(dict.fromkeys(slots, 0))
    now = store.now()
    slot_of = functools.partial(key_slot, slots=nslots)
    for batch in store.entries_in_slots(slots, slot_of):
        for e in batch:
            if e.expires is not None and e.expires <= now:
                continue
            s = slot_of(e.key)
            out[s] = (out[s] + state_hash(e.ikey, e.version)) & _MASK
        yield


def _states(store: Store, slots: frozenset[int], nslots: int, out: dict[IKey, State]) -> Iterator[None]:
    """Fill ``out`` with what this node holds in ``slots``: live values and tombstones, each with its
    version; one step per batch of the index."""
    now = store.now()
    slot_of = functools.partial(key_slot, slots=nslots)
    for ikey, version in store.tombstones_in_slots(slots, slot_of):
        out[ikey] = (version, True)
    for batch in store.entries_in_slots(slots, slot_of):
        for e in batch:
            if e.expires is None or e.expires > now:
                out[e.ikey] = (e.version, False)
        yield


async def _run(steps: Iterator[None]) -> None:
    """A pass over the index on the node's own thread (the store is not thread-safe), letting
    requests run between its batches."""
    for _ in steps:
        await trio.sleep(0)


async def digests(store: Store, slots: frozenset[int], nslots: int) -> dict[int, int]:
    out: dict[int, int] = {}
    await _run(_digests(store, slots, nslots, out))
    return out


async def states(store: Store, slots: frozenset[int], nslots: int) -> dict[IKey, State]:
    out: dict[IKey, State] = {}
    await _run(_states(store, slots, nslots, out))
    return out


def to_push(mine: dict[IKey, State], theirs: dict[IKey, State]) -> list[IKey]:
    """The keys whose state here should be sent to the peer (see the module doc)."""
    out = []
    for ikey, (version, tomb) in mine.items():
        pv, ptomb = theirs.get(ikey, (0, False))
        if version <= pv:
            continue
        if tomb and (pv == 0 or ptomb):
            continue  # nothing older to undo there
        out.append(ikey)
    return out


class AntiEntropy:
    """The node's anti-entropy walk and the two operations its peers call."""

    def __init__(self, store: Store, member: Any, opts: dict[str, Any]) -> None:
        self.store = store
        self.member = member
        self.interval = float(opts.get("anti_entropy_interval", DEFAULT_INTERVAL_S))
        self.batch = int(opts.get("anti_entropy_batch", DEFAULT_BATCH))
        self.rate = float(opts.get("anti_entropy_rate", DEFAULT_RATE))
        if self.interval < 0 or self.batch < 1 or self.rate <= 0:
            raise InvalidArgument("[cluster] anti_entropy_interval >= 0, anti_entropy_batch >= 1, "
                                  "anti_entropy_rate > 0")
        self.walks = 0
        self.slots_compared = 0
        self.slots_divergent = 0
        self.values_pushed = 0
        self.tombstones_pushed = 0
        self.errors = 0
        self.last_walk_s = 0.0

    def operations(self) -> tuple[Operation, ...]:
        return (Operation("SLOT_DIGESTS", INTERNAL, self.slot_digests, opcode=int(Op.SLOT_DIGESTS)),
                Operation("SLOT_STATES", INTERNAL, self.slot_states, opcode=int(Op.SLOT_STATES)))

    async def slot_digests(self, session: Any, req: Call) -> Reply:
        slots, nslots = migration_job.slots_of(req.meta)
        d = await digests(self.store, slots, nslots)
        return Reply({"slots": sorted(d), "digests": [d[s] for s in sorted(d)]})

    async def slot_states(self, session: Any, req: Call) -> Reply:
        slots, nslots = migration_job.slots_of(req.meta)
        st = await states(self.store, slots, nslots)
        return Reply({"states": [[ns, scope, key, v, t] for (ns, scope, key), (v, t) in st.items()]})

    # -- the walk
    async def run(self) -> None:
        if self.interval <= 0:
            return
        await self.member.registered.wait()
        while True:
            await trio.sleep(self.interval)
            t0 = time.monotonic()
            try:
                await self.walk()
            except MemKVError as exc:  # a peer gone mid-walk: the next walk tries again
                self.errors += 1
                log.info("anti-entropy walk stopped: %s", exc)
            self.walks += 1
            self.last_walk_s = time.monotonic() - t0

    async def walk(self) -> None:
        """One pass over the slots this node shares with each other live replica: this node's
        digests in one pass over its index, each peer's in one call, then the states of the
        divergent slots ``anti_entropy_batch`` at a time, at most ``anti_entropy_rate`` slots/s."""
        view = self.member.view
        sm = view.state.slotmap if view is not None else None
        if sm is None:
            return
        me = self.member.node_id
        nodes = view.state.nodes
        shared: dict[str, list[int]] = {}
        for s, row in enumerate(sm.table):
            if me not in row or s in sm.pending:
                continue
            for peer in row:
                if peer != me and peer in nodes:
                    shared.setdefault(peer, []).append(s)
        if not shared:
            return
        mine = await digests(self.store, frozenset(s for v in shared.values() for s in v), sm.slots)
        for peer, slots in shared.items():
            differ = await self.compare(nodes[peer].addr, slots, sm.slots, mine)
            for i in range(0, len(differ), self.batch):
                part = self.still_shared(peer, differ[i:i + self.batch], sm.slots)
                if part:
                    await self.repair(nodes[peer].addr, part, sm.slots)
                await trio.sleep(len(part) / self.rate)
            await trio.sleep(len(slots) / self.rate)

    def still_shared(self, peer: str, slots: list[int], nslots: int) -> list[int]:
        """Those of ``slots`` that this node and ``peer`` still both own, with no migration pending,
        in the node's current map: a walk never pushes values into a slot that has moved meanwhile
        (the peer may have freed it already)."""
        view = self.member.view
        sm = view.state.slotmap if view is not None else None
        if sm is None or sm.slots != nslots:
            return []
        me = self.member.node_id
        return [s for s in slots if s not in sm.pending and me in sm.table[s] and peer in sm.table[s]]

    async def compare(self, addr: str, slots: list[int], nslots: int, mine: dict[int, int]) -> list[int]:
        """The slots whose digest on the peer at ``addr`` differs from this node's (``mine``)."""
        from memkv.client.core.calls import SimpleCall

        meta = {"slots": slots, "nslots": nslots}
        theirs = await trio.to_thread.run_sync(self.member.migration.call, addr, SimpleCall(Op.SLOT_DIGESTS, meta))
        self.slots_compared += len(slots)
        differ = [s for s, d in zip(theirs.get("slots", []), theirs.get("digests", []), strict=True)
                  if mine.get(s) != d]
        self.slots_divergent += len(differ)
        return differ

    async def repair(self, addr: str, slots: list[int], nslots: int) -> None:
        """Send the peer at ``addr`` what this node holds newer than it in ``slots`` (:func:`to_push`)."""
        from memkv.client.core.calls import SimpleCall

        call = functools.partial(self.member.migration.call, addr)
        reply = await trio.to_thread.run_sync(call, SimpleCall(Op.SLOT_STATES, {"slots": slots, "nslots": nslots}))
        peer = {(str(ns), str(scope), bytes(key)): (int(v), bool(t)) for ns, scope, key, v, t in reply["states"]}
        push = to_push(await states(self.store, frozenset(slots), nslots), peer)
        items = [(ik, item) for ik in push if (item := copy_item(self.store, ik)) is not None]
        if not items:
            return
        await trio.to_thread.run_sync(send_states, call, migration_job.group(items))
        dead = sum(1 for _ik, item in items if item.value is None)
        self.tombstones_pushed += dead
        self.values_pushed += len(items) - dead

    def stats(self) -> dict[str, Any]:
        return {"interval_s": self.interval, "walks": self.walks, "slots_compared": self.slots_compared,
                "slots_divergent": self.slots_divergent, "values_pushed": self.values_pushed,
                "tombstones_pushed": self.tombstones_pushed, "errors": self.errors,
                "last_walk_s": round(self.last_walk_s, 4)}

    def metrics(self) -> dict[str, float]:
        return {f"anti_entropy_{k}": float(v) for k, v in self.stats().items()}
