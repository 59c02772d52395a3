"""The node side of a slot copy as sans-IO programs: the source's push job and the freeing of slots.

``memkv.cluster.migration`` serves ``MIGRATE_PUSH`` and ``DROP_SLOTS`` by driving these programs
on the node's trio loop (real store, real node-to-node calls); the simulator
(``memkv.cluster.sim``) drives the very same programs against in-memory nodes. What a program
needs from outside is an effect (``memkv.cluster.effects``): wait for the node's own slot map,
call the destination, list the keys of some slots in the store, send values, free values.

**Push** (``MIGRATE_PUSH {job, slots, nslots, dest, epoch, max_bytes}``, one call = one chunk):
the first call of a job waits until the node's map has reached ``epoch`` (the map that lists
``dest`` as a pending replica: from then on every write this node accepts is also sent to
``dest`` by the clients), frees what ``dest`` holds of those slots from an earlier ownership
(``DROP_SLOTS pending``), and lists the slots' keys. Each call sends the next ``max_bytes`` of
values (with their write versions: the destination keeps the newer of what it has and the copy).
When the list is exhausted the job re-lists the keys written since the listing -- writes that
passed the ownership check just before the map changed -- at least ``CATCHUP_DELAY_S`` after the
map changed, and is done when that finds nothing more. A chunk whose sending fails goes back to
the front of the list (the next call sends it again). Calling again is harmless (versions), so a
new rebalancer leader simply starts a job again.

**Drop** (``DROP_SLOTS {slots, nslots, epoch[, pending]}``): once the node's map has reached
``epoch``, free the values of the listed slots the node no longer owns (with ``pending``: of the
slots where it is only a pending destination). Each value is checked once more against the map
of the moment (:func:`may_free`): the map may have given the slot back meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memkv.client.cluster_map import SlotMap
from memkv.cluster.effects import NodeCall, Program, Sleep, WaitView
from memkv.errors import InvalidArgument, NodeUnavailable
from memkv.protocol.opcodes import Op

CATCHUP_DELAY_S = 0.5
EPOCH_WAIT_S = 5.0
JOB_IDLE_S = 300.0

IKey = tuple[str, str, bytes]  # (namespace, tenant, key): a value's identity in a node's store
GroupKey = tuple[str, str, float | None]  # (namespace, tenant, ttl): one PUT_MANY per group
Groups = dict[GroupKey, tuple[list[bytes], list[Any], list[int]]]  # keys, values, versions


@dataclass(frozen=True)
class ScanSlots:
    """Effect: the keys (``IKey``) of ``slots`` written after generation ``after_gen``, in write
    order, and the highest generation in the store."""

    slots: frozenset[int]
    nslots: int
    after_gen: int


@dataclass(frozen=True, eq=False)
class SendCopies:
    """Effect: store ``groups`` on ``dest`` (``PUT_MANY`` + ``vers``, as the cluster identity)."""

    dest: str
    groups: Groups


@dataclass(frozen=True)
class FreeSlots:
    """Effect: delete this node's values of ``slots`` for which :func:`may_free` still holds
    against the node's map of the moment (and that were not written again meanwhile); returns
    (values freed, bytes freed)."""

    slots: frozenset[int]
    nslots: int
    pending_only: bool


@dataclass(frozen=True)
class CopyItem:
    """A live value as the copy sends it (``ttl``: seconds left, None = none)."""

    key: bytes
    value: Any  # bytes in production (a size stands in for them in the simulator)
    size: int
    version: int
    tenant: str
    ttl: float | None


@dataclass
class PushRequest:
    job: str
    slots: frozenset[int]
    nslots: int
    dest: str
    epoch: int
    max_bytes: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PushRequest:
        slots, nslots = slots_of(meta)
        job, dest = str(meta.get("job", "")), str(meta.get("dest", ""))
        if not job or ":" not in dest:
            raise InvalidArgument("job and dest HOST:PORT are required")
        return cls(job, slots, nslots, dest, int(meta.get("epoch", 0)), max(1, int(meta.get("max_bytes", 1 << 20))))


def slots_of(meta: dict[str, Any]) -> tuple[frozenset[int], int]:
    slots, nslots = meta.get("slots"), meta.get("nslots")
    if not isinstance(slots, list) or not isinstance(nslots, int) or nslots <= 0:
        raise InvalidArgument("slots (list) and nslots (int) are required")
    return frozenset(int(s) for s in slots), nslots


@dataclass
class PushJob:
    """The source's cursor over one copy (volatile: a restarted node starts the job again)."""

    slots: frozenset[int]
    nslots: int
    dest: str
    keys: deque[IKey]
    gen0: int  # highest generation at the last listing: the catch-up lists what came after
    ready_at: float  # when the node's map reached the job's epoch
    last_used: float
    caught_up: bool = False

    def take(self, read: Callable[[IKey], CopyItem | None], max_bytes: int) -> tuple[Groups, list[IKey], int]:
        """The next chunk: values grouped by (namespace, tenant, ttl), the keys taken off the list
        (put back if sending fails) and the chunk's bytes."""
        groups: Groups = {}
        taken: list[IKey] = []
        nbytes = 0
        while self.keys and nbytes < max_bytes:
            ikey = self.keys.popleft()
            taken.append(ikey)
            item = read(ikey)
            if item is None:  # deleted or expired since the listing
                continue
            ks, vs, vers = groups.setdefault((ikey[0], item.tenant, item.ttl), ([], [], []))
            ks.append(item.key)
            vs.append(item.value)
            vers.append(item.version)
            nbytes += item.size
        return groups, taken, nbytes


def wait_epoch(view: Any, me: str, epoch: int) -> Program[SlotMap]:
    """Until the node's own map has reached ``epoch``; NodeUnavailable after EPOCH_WAIT_S."""
    if not (yield WaitView(lambda st: st.slotmap is not None and st.epoch >= epoch, EPOCH_WAIT_S)):
        raise NodeUnavailable(f"node {me} has not seen slot map epoch {epoch} yet")
    return view.state.slotmap  # type: ignore[no-any-return]


def push(jobs: dict[str, PushJob], req: PushRequest, *, view: Any, me: str,
         read: Callable[[IKey], CopyItem | None], clock: Callable[[], float]) -> Program[dict[str, Any]]:
    """One ``MIGRATE_PUSH`` call: the next chunk of job ``req.job`` (created on its first call)."""
    now = clock()
    for jid in [j for j, job in jobs.items() if now - job.last_used > JOB_IDLE_S]:
        del jobs[jid]
    job = jobs.get(req.job)
    if job is None or job.slots != req.slots or job.dest != req.dest:
        yield from wait_epoch(view, me, req.epoch)
        ready = clock()
        # The destination may hold old values of these slots (it owned them before a restart or
        # an outage and missed overwrites since): free them first (only where it is still just a
        # pending destination); what it gets from now on is this copy and the clients' double writes.
        yield NodeCall(req.dest, int(Op.DROP_SLOTS), {"slots": sorted(req.slots), "nslots": req.nslots,
                                                      "epoch": req.epoch, "pending": True})
        keys, top = yield ScanSlots(req.slots, req.nslots, 0)
        job = jobs[req.job] = PushJob(req.slots, req.nslots, req.dest, deque(keys), top, ready, now)
    job.last_used = now
    groups, taken, nbytes = job.take(read, req.max_bytes)
    done = False
    if not job.keys:
        if not job.caught_up:
            wait = job.ready_at + CATCHUP_DELAY_S - clock()
            if wait > 0:
                yield Sleep(wait)
            more, job.gen0 = yield ScanSlots(req.slots, req.nslots, job.gen0)
            job.keys.extend(more)
            job.caught_up = True
            done = not more and not groups
        else:
            done = not groups
    values = sum(len(ks) for ks, _, _ in groups.values())
    if groups:
        try:
            yield SendCopies(req.dest, groups)
        except BaseException:
            # Not (entirely) delivered -- e.g. the pooled connection was to the destination's
            # previous process. The rebalancer calls again with the same job: send this chunk
            # again (the copy is idempotent), never skip it.
            job.keys.extendleft(reversed(taken))
            raise
    if done:
        jobs.pop(req.job, None)
    return {"bytes": nbytes, "values": values, "done": done, "left": len(job.keys)}


def drop(view: Any, me: str, slots: frozenset[int], nslots: int, epoch: int,
         pending_only: bool) -> Program[dict[str, Any]]:
    """One ``DROP_SLOTS`` call: free the listed slots this node does not own at ``epoch``."""
    sm = yield from wait_epoch(view, me, epoch)
    if pending_only:
        mine = {s for s in slots if me not in sm.pending.get(s, ())}
    else:
        mine = {s for s in slots if s < len(sm.table) and me in sm.table[s]}
    n, nbytes = yield FreeSlots(frozenset(slots - mine), nslots, pending_only)
    return {"values": n, "bytes": nbytes, "kept": sorted(mine)}


def may_free(current: SlotMap | None, me: str, slot: int, pending_only: bool) -> bool:
    """Whether a value of ``slot`` (in ``current``'s slot count) may still be freed: the map may
    have changed since the drop was decided (flipped or abandoned the pending copy; given the
    slot back)."""
    if current is None:
        return True
    if pending_only:
        return me in current.pending.get(slot, ())
    return me not in current.table[slot]

