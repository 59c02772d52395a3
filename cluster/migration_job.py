"""The node side of a slot copy as sans-IO programs: the source's push job and the freeing of slots.

``memkv.cluster.migration`` serves ``MIGRATE_PUSH`` and ``DROP_SLOTS`` by driving these programs
on the node's trio loop (real store, real node-to-node calls); the simulator
(``memkv.cluster.sim``) drives the very same programs against in-memory nodes. What a program
needs from outside is an effect (``memkv.cluster.effects``): wait for the node's own slot map,
call the destination, list the keys of some slots in the store, send values, free values.

**Push** (``MIGRATE_PUSH {job, slots, nslots, dest, epoch, max_bytes[, missing_only]}``, one call
= one chunk): the first call of a job waits until the node's map has reached ``epoch`` (the map
that lists ``dest`` as a pending replica: from then on every write this node accepts is also
sent to ``dest`` by the clients) and lists the slots' keys -- with ``missing_only`` (a hand-over
from an owner that leaves the slots) only those ``dest`` lacks or holds older
(``SLOT_VERSIONS``). Each call sends the next ``max_bytes`` of values (with their write
versions: the destination keeps the newer of what it has and the copy).
When the list is exhausted the job re-lists the keys written since the listing -- writes that
passed the ownership check just before the map changed -- at least ``CATCHUP_DELAY_S`` after the
map changed, and is done when that finds nothing more. A chunk whose sending fails goes back to
the front of the list (the next call sends it again). Calling again is harmless (versions), so a
new rebalancer leader simply starts a job again. Tombstones travel with the values (a key's state
is its value or its tombstone, each with a version; the newer wins on the destination), so that a
delete one replica missed is not undone by a copy or a hand-off from it.

**Drop** (``DROP_SLOTS {slots, nslots, epoch[, pending]}``): once the node's map has reached
``epoch``, free the values of the listed slots the node no longer owns (with ``pending``: of the
slots where it is only a pending destination). Each value is checked once more against the map
of the moment (:func:`may_free`): the map may have given the slot back meanwhile.

Before it frees slots it no longer owns, a node **hands off**: it asks every owner of those slots
which versions it holds of the node's keys (``SLOT_VERSIONS``, keys only) and sends each owner the
values it lacks or holds older. Replicas of a slot can differ -- a client acknowledges a write
that reached one owner while another was dead, fenced or too slow to answer -- and the copy of a
move comes from one of them only; without the hand-off, the flip would free the only copy of such
a write. If an owner cannot be asked or given its values, nothing is freed (the call fails).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memkv.client.cluster_map import SlotMap, key_slot
from memkv.cluster.effects import NodeCall, Program, Sleep, WaitView
from memkv.errors import InvalidArgument, NodeUnavailable
from memkv.protocol.opcodes import Op

CATCHUP_DELAY_S = 0.5
EPOCH_WAIT_S = 5.0
JOB_IDLE_S = 300.0
HANDOFF_BATCH = 4096  # keys per SLOT_VERSIONS call

IKey = tuple[str, str, bytes]  # (namespace, tenant, key): a value's identity in a node's store
GroupKey = tuple[str, str, float | None]  # (namespace, tenant, ttl): one PUT_MANY per group
Groups = dict[GroupKey, tuple[list[bytes], list[Any], list[int]]]  # keys, values (None: tombstone), versions


@dataclass(frozen=True)
class ScanSlots:
    """Effect: the keys (``IKey``) of ``slots`` written or deleted after generation ``after_gen``
    (values and tombstones), and the highest generation in the store."""

    slots: frozenset[int]
    nslots: int
    after_gen: int


@dataclass(frozen=True, eq=False)
class SendCopies:
    """Effect: store ``groups`` on ``dest`` (``PUT_MANY`` + ``vers`` for values, ``DELETE_MANY`` +
    ``vers`` for tombstones, as the cluster identity)."""

    dest: str
    groups: Groups


@dataclass(frozen=True)
class FreeSlots:
    """Effect: free this node's values and tombstones of ``slots`` for which :func:`may_free` still
    holds against the node's map of the moment (and that were not written again meanwhile) -- a
    free, not a delete: no tombstone is left; returns (values freed, bytes freed)."""

    slots: frozenset[int]
    nslots: int
    pending_only: bool


@dataclass(frozen=True)
class CopyItem:
    """A live value as the copy sends it (``ttl``: seconds left, None = none), or a tombstone
    (``value`` None: the key was deleted as of ``version``; copies carry tombstones so that a
    replica that missed the delete does not keep, or hand back, the older value)."""

    key: bytes
    value: Any  # bytes in production (the simulator's value record stands in for them); None: a tombstone
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
    missing_only: bool = False  # a hand-over: send only what ``dest`` lacks (and keep what it has)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PushRequest:
        slots, nslots = slots_of(meta)
        job, dest = str(meta.get("job", "")), str(meta.get("dest", ""))
        if not job or ":" not in dest:
            raise InvalidArgument("job and dest HOST:PORT are required")
        return cls(job, slots, nslots, dest, int(meta.get("epoch", 0)), max(1, int(meta.get("max_bytes", 1 << 20))),
                   bool(meta.get("missing_only")))


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
        items: list[tuple[IKey, CopyItem]] = []
        taken: list[IKey] = []
        nbytes = 0
        while self.keys and nbytes < max_bytes:
            ikey = self.keys.popleft()
            taken.append(ikey)
            try:
                item = read(ikey)
            except BaseException:  # cannot be read now (e.g. no room to read it in from flash): never
                self.keys.extendleft(reversed(taken))  # skipped -- back on the list, the push fails
                raise
            if item is None:  # freed or expired since the listing (or damaged)
                continue
            items.append((ikey, item))
            nbytes += item.size
        return group(items), taken, nbytes


def group(items: list[tuple[IKey, CopyItem]]) -> Groups:
    """Values grouped as they are sent: one ``PUT_MANY`` per (namespace, tenant, ttl), and the
    tombstones of each (namespace, tenant) (value None) one ``DELETE_MANY``."""
    groups: Groups = {}
    for ikey, item in items:
        ks, vs, vers = groups.setdefault((ikey[0], item.tenant, item.ttl), ([], [], []))
        ks.append(item.key)
        vs.append(item.value)
        vers.append(item.version)
    return groups


def wait_epoch(view: Any, me: str, epoch: int) -> Program[SlotMap]:
    """Until the node's own map has reached ``epoch``; NodeUnavailable after EPOCH_WAIT_S."""
    if not (yield WaitView(lambda st: st.slotmap is not None and st.epoch >= epoch, EPOCH_WAIT_S)):
        raise NodeUnavailable(f"node {me} has not seen slot map epoch {epoch} yet")
    return view.state.slotmap  # type: ignore[no-any-return]


def push(jobs: dict[str, PushJob], req: PushRequest, *, view: Any, me: str, version: Callable[[IKey], int],
         read: Callable[[IKey], CopyItem | None], clock: Callable[[], float]) -> Program[dict[str, Any]]:
    """One ``MIGRATE_PUSH`` call: the next chunk of job ``req.job`` (created on its first call)."""
    now = clock()
    for jid in [j for j, job in jobs.items() if now - job.last_used > JOB_IDLE_S]:
        del jobs[jid]
    job = jobs.get(req.job)
    if job is None or job.slots != req.slots or job.dest != req.dest:
        yield from wait_epoch(view, me, req.epoch)
        ready = clock()
        # No purge of what the destination already holds of these slots: values it kept from an
        # earlier ownership are older than the copy's and get replaced (versions), and what it got
        # from the clients' double writes since the move began may be an acknowledged write that
        # no other live node has (the simulator found a purge freeing the last copy).
        keys, top = yield ScanSlots(req.slots, req.nslots, 0)
        if req.missing_only:
            keys = yield from lacking(req.dest, keys, version)
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
            if req.missing_only:
                more = yield from lacking(req.dest, more, version)
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


def lacking(dest: str, keys: list[IKey], version: Callable[[IKey], int]) -> Program[list[IKey]]:
    """Those of ``keys`` that the node at ``dest`` lacks or holds older than we do (``SLOT_VERSIONS``:
    keys travel, values do not)."""
    out: list[IKey] = []
    mine = [(ik, v) for ik in keys if (v := version(ik))]
    for i in range(0, len(mine), HANDOFF_BATCH):
        part = mine[i:i + HANDOFF_BATCH]
        r = yield NodeCall(dest, int(Op.SLOT_VERSIONS), {"keys": [list(ik) for ik, _ in part]})
        theirs = r.get("vers") if isinstance(r, dict) else None
        if not isinstance(theirs, list) or len(theirs) != len(part):
            raise NodeUnavailable(f"{dest} answered SLOT_VERSIONS with {len(theirs or [])} versions for {len(part)}")
        out.extend(ik for (ik, v), t in zip(part, theirs, strict=True) if int(t) < v)
    return out


def drop(view: Any, me: str, slots: frozenset[int], nslots: int, epoch: int, pending_only: bool, *,
         version: Callable[[IKey], int], read: Callable[[IKey], CopyItem | None]) -> Program[dict[str, Any]]:
    """One ``DROP_SLOTS`` call: free the listed slots this node does not own at ``epoch`` (after
    handing off what their owners lack, unless these are slots it was only a pending destination of)."""
    sm = yield from wait_epoch(view, me, epoch)
    if pending_only:
        mine = {s for s in slots if me not in sm.pending.get(s, ())}
    else:
        mine = {s for s in slots if s < len(sm.table) and me in sm.table[s]}
    gone = frozenset(slots - mine)
    handed = 0
    if gone and not pending_only:
        handed = yield from handoff(view, me, sm, gone, nslots, version=version, read=read)
    n, nbytes = yield FreeSlots(gone, nslots, pending_only)
    return {"values": n, "bytes": nbytes, "kept": sorted(mine), "handed_off": handed}


def handoff(view: Any, me: str, sm: SlotMap, slots: frozenset[int], nslots: int, *,
            version: Callable[[IKey], int], read: Callable[[IKey], CopyItem | None]) -> Program[int]:
    """Give every registered owner of ``slots`` (in ``sm``, pending destinations aside) the values of
    ours it lacks or holds older; how many were sent. Raises if a slot has no registered owner, or
    an owner cannot be asked or given them."""
    keys, _ = yield ScanSlots(slots, nslots, 0)
    per_owner: dict[str, list[IKey]] = {}
    for ikey in keys:
        s = key_slot(ikey[2], nslots)
        for owner in sm.table[s] if s < len(sm.table) else ():
            if owner != me and owner not in sm.pending.get(s, ()):
                per_owner.setdefault(owner, []).append(ikey)
    nodes = view.state.nodes
    for s in sorted({key_slot(ik[2], nslots) for ik in keys}):
        if not any(o in nodes for o in sm.table[s] if o != me and o not in sm.pending.get(s, ())):
            raise NodeUnavailable(f"node {me} cannot hand slot {s} over: none of its owners is registered")
    sent = 0
    for owner in sorted(per_owner):
        info = nodes.get(owner)
        if info is None:
            continue  # gone: the slot's registered owners get it
        missing = yield from lacking(info.addr, per_owner[owner], version)
        items = [(ik, item) for ik in missing if (item := read(ik)) is not None]
        if items:
            yield SendCopies(info.addr, group(items))
            sent += len(items)
    return sent


def may_free(current: SlotMap | None, me: str, slot: int, pending_only: bool) -> bool:
    """Whether a value of ``slot`` (in ``current``'s slot count) may still be freed: the map may
    have changed since the drop was decided (flipped or abandoned the pending copy; given the
    slot back)."""
    if current is None:
        return True
    if pending_only:
        return me in current.pending.get(slot, ())
    return me not in current.table[slot]

