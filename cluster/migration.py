"""The node side of slot migration (docs/cluster.md): the ops the rebalancer drives.

Four node-to-node / rebalancer-to-node operations, served by every cluster node (declared
with the node's cluster membership: ``ClusterMember.extend``). Their decisions are the sans-IO programs of
``memkv.cluster.migration_job`` (also run by the control-plane simulator); this module performs
their effects on the node: the store, node-to-node calls, waits on the node's slot map.

- ``SLOT_SIZES``: bytes and values held per slot (one pass over the index,
  key -> slot with the clients' mmh3), so the rebalancer can size its rounds.
- ``MIGRATE_PUSH {job, slots, nslots, dest, epoch, max_bytes}``: the *source*
  pushes the next ``max_bytes`` of the slots' values to ``dest`` with
  ``PUT_MANY`` + ``vers`` (each value keeps its write version, and the destination
  keeps the newer of what it has and the copy: a copy never overwrites a newer
  client write, and replaces an older value the destination kept from before,
  see ``Store.commit``). The first call of a job waits
  until this node's own slot map has reached ``epoch`` (the map that lists
  ``dest`` as a pending replica, so from then on every write this node accepts
  is also sent to ``dest`` by the client) and lists the slots' keys; the last
  call re-lists the values written since the listing (writes that passed the
  ownership check just before the map changed) at least ``CATCHUP_DELAY_S``
  after the map changed. Calling it again is harmless (versions), so a new
  rebalancer leader simply starts a job again. With ``missing_only`` (a hand-over
  from an owner that leaves the slots) it sends only what ``dest`` lacks.
- ``DROP_SLOTS {slots, nslots, epoch}``: after the flip, free the old copy:
  waits for the node's map to reach ``epoch``, hands the slots' owners the values
  they lack (``SLOT_VERSIONS`` on each, then ``PUT_MANY`` + ``vers``), then deletes the
  values of the listed slots that the node does not own (pending included) in its map.
  With ``pending``: delete the values of the listed slots where this node is only a pending
  destination (no hand-off). Sources no longer send it before a copy: the double writes it
  would free may be acknowledged writes no other node has; old values are replaced by the
  copy's newer versions anyway.

- ``SLOT_VERSIONS {keys}``: the versions held of [namespace, tenant, key] triples (0: none).

Once the node has tenants, all four need the cluster identity (``__cluster__``, token derived from the
cluster secret: memkv/cluster/identity.py; the node's grants stage checks it); the push logs in to ``dest``
as it too and stores every value for its own tenant (``PUT_MANY`` ``owner``), so tenant-scoped values keep
their scope.

Also: Prometheus gauges/counters on the node's /metrics (slots moving and
under-replicated slots as this node's map says, bytes and values it pushed).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from memkv.client.cluster_map import key_slot
from memkv.cluster import migration_job
from memkv.cluster.effects import NodeCall, Sleep, WaitView, run_async
from memkv.cluster.migration_job import CopyItem, FreeSlots, IKey, ScanSlots, SendCopies, may_free
from memkv.engine.store import Store
from memkv.errors import ConnectionLost, CorruptValue, InvalidArgument, KeyExists, MemKVError
from memkv.protocol.opcodes import Op
from memkv.server.binary import Reply
from memkv.server.extension import Operation
from memkv.server.requests import Access, Call

log = logging.getLogger("memkv.cluster")

# Opcodes (control plane range, 40+; Op.ADMIN is 40).
OP_SLOT_SIZES = int(Op.SLOT_SIZES)
OP_MIGRATE_PUSH = int(Op.MIGRATE_PUSH)
OP_DROP_SLOTS = int(Op.DROP_SLOTS)
OP_SLOT_VERSIONS = int(Op.SLOT_VERSIONS)


INTERNAL = Access(internal=True)


def copy_item(store: Store, ikey: IKey) -> CopyItem | None:
    """What a copy sends of ``ikey``: its live value, or its tombstone (value None), or None."""
    e = store.lookup(ikey)
    clock = store.now()
    if e is None or (e.expires is not None and e.expires <= clock):
        version = store.tombstone_of(ikey)
        return CopyItem(ikey[2], None, 0, version, ikey[1], None) if version else None
    try:
        value = bytes(store.view(e))
    except CorruptValue:
        return None  # damaged on flash: reported by the tier and served as a miss; nothing to copy
    # Any other error propagates: a durable value only on flash that cannot be read in now (the pool is
    # full and nothing is evictable, or its record is not durable yet) is never skipped -- skipped, the
    # round would flip and the old owner drop the last copies. The push fails and the rebalancer calls
    # again; a round that cannot copy leaves the slots with their old owners.
    ttl = None if e.expires is None else max(1.0, round(e.expires - clock))
    return CopyItem(e.key, value, len(value), e.version, e.tenant, ttl)


def send_states(call: Callable[[Any], Any], groups: migration_job.Groups) -> None:
    """Store ``groups`` on a node (``call`` sends one request there, as the cluster identity): values
    with ``PUT_MANY``, tombstones with ``DELETE_MANY``, each keeping its version and tenant. Raises
    when every value of a batch failed."""
    from memkv.client.core.calls import PutManyCall, SimpleCall

    for (ns, tenant, ttl), (ks, vs, vers) in groups.items():
        # "owner": each value is stored for its own tenant (and in its tenant-scoped namespace's scope);
        # only the cluster identity may set it (the node's grants stage). "vers": the values keep their versions.
        live = [i for i, v in enumerate(vs) if v is not None]
        dead = [i for i, v in enumerate(vs) if v is None]
        for i in range(0, len(live), 512):
            part = live[i:i + 512]
            extra = {"owner": tenant, "vers": [vers[j] for j in part]}
            res = call(PutManyCall([ks[j] for j in part], [vs[j] for j in part], namespace=ns, ttl=ttl, pin=False,
                                   extra=extra))
            # Any value the destination did not store fails the batch (a copy that dropped values silently
            # would flip the slot without them). KeyExists is no failure: the destination holds other bytes
            # of a write-once key, which a copy never replaces.
            bad = [r for r in res if isinstance(r, MemKVError) and not isinstance(r, KeyExists)]
            if bad:
                raise bad[0]
        for i in range(0, len(dead), 4096):
            part = dead[i:i + 4096]
            meta: dict[str, Any] = {"ks": [ks[j] for j in part], "vers": [vers[j] for j in part], "owner": tenant}
            if ns != "shared":
                meta["ns"] = ns
            call(SimpleCall(Op.DELETE_MANY, meta, "ds"))


def call_at(pool: Any, dest: str, call: Any) -> Any:
    """One call to the node at ``dest`` (HOST:PORT) through ``pool``; once more on a fresh connection
    if the pooled one was dead.

    A node that restarted on the same address leaves the pool holding connections to its previous
    process: the first call on each fails with ConnectionLost. The node-to-node calls made this way
    are idempotent (versioned copies, DROP_SLOTS ``pending``, relays), so dropping the stale
    connections and calling again is safe, and it spares the rebalancer a failed push and a retry
    round-trip every time a node comes back.
    """
    from memkv.client.url import NodeAddress

    host, _, port = dest.rpartition(":")
    addr = NodeAddress(host.strip("[]"), int(port))
    try:
        return pool.call(addr, call)
    except ConnectionLost:
        pool.drop(addr)
        return pool.call(addr, call)


class MigrationService:
    def __init__(self, store: Store, member: Any) -> None:
        self.member = member
        self.store = store
        self.jobs: dict[str, migration_job.PushJob] = {}
        self.bytes_pushed = 0
        self.values_pushed = 0
        self.values_dropped = 0
        self._pool: Any = None

    def operations(self) -> tuple[Operation, ...]:
        """The node's migration operations (cluster identity only, once the node has tenants)."""
        return (Operation("SLOT_SIZES", INTERNAL, self.slot_sizes, opcode=OP_SLOT_SIZES),
                Operation("MIGRATE_PUSH", INTERNAL, self.push, opcode=OP_MIGRATE_PUSH),
                Operation("DROP_SLOTS", INTERNAL, self.drop, opcode=OP_DROP_SLOTS),
                Operation("SLOT_VERSIONS", INTERNAL, self.slot_versions, opcode=OP_SLOT_VERSIONS))

    # -- helpers
    def _pool_(self) -> Any:
        if self._pool is None:
            from memkv.client.executors.blocking_connection import BlockingPool

            # as the cluster identity (memkv/cluster/identity.py), over TLS when the nodes serve TLS
            self._pool = BlockingPool(timeout=30.0, connect_timeout=3.0, **self.member.credentials.pool_kwargs())
        return self._pool

    async def _effect(self, eff: Any) -> Any:
        """Perform one effect of a migration program (memkv/cluster/migration_job.py) on this node."""
        if isinstance(eff, WaitView):
            deadline = trio.current_time() + eff.timeout
            while True:
                view = self.member.view
                if view is not None and eff.predicate(view.state):
                    return True
                if trio.current_time() > deadline:
                    return False
                await trio.sleep(0.02)
        if isinstance(eff, ScanSlots):
            return await self._scan(eff.slots, eff.nslots, eff.after_gen)
        if isinstance(eff, SendCopies):
            return await trio.to_thread.run_sync(self._send, eff.dest, eff.groups)
        if isinstance(eff, NodeCall):
            from memkv.client.core.calls import SimpleCall

            return await trio.to_thread.run_sync(self.call, eff.addr, SimpleCall(eff.op, eff.meta))
        if isinstance(eff, FreeSlots):
            return await self._free(eff.slots, eff.nslots, eff.pending_only)
        if isinstance(eff, Sleep):
            return await trio.sleep(eff.seconds)
        raise TypeError(f"not a migration effect: {eff!r}")

    async def _scan(self, slots: frozenset[int], nslots: int, after_gen: int = 0) -> tuple[list[IKey], int]:
        """Index keys of ``slots`` written or deleted after ``after_gen`` (values, then tombstones), and
        the store's generation when the listing began (every value written since has a higher one)."""
        top = self.store.generation
        out: list[IKey] = []
        slot_of = functools.partial(key_slot, slots=nslots)
        for batch in self.store.entries_in_slots(slots, slot_of, after=after_gen, batch=20000):
            out.extend(e.ikey for e in batch)
            await trio.sleep(0)
        out.extend(ik for ik, _v in self.store.tombstones_in_slots(slots, slot_of, after=after_gen))
        return out, max(top, after_gen)

    def _copy_item(self, ikey: IKey) -> CopyItem | None:
        return copy_item(self.store, ikey)

    def _version(self, ikey: IKey) -> int:
        """The version of what this node holds of ``ikey``: value or tombstone (0: neither)."""
        return self.store.state_version(ikey)

    # -- ops
    async def slot_sizes(self, session: Any, req: Call) -> Reply:
        meta = req.meta
        nslots = meta.get("nslots")
        if not isinstance(nslots, int) or nslots <= 0:
            raise InvalidArgument("nslots (int) is required")
        sizes: dict[int, list[int]] = {}
        for i, e in enumerate(self.store.entries()):
            s = key_slot(e.key, nslots)
            row = sizes.get(s)
            if row is None:
                sizes[s] = [e.length, 1]
            else:
                row[0] += e.length
                row[1] += 1
            if i % 20000 == 19999:
                await trio.sleep(0)
        ordered = sorted(sizes)
        return Reply({"slots": ordered, "bytes": [sizes[s][0] for s in ordered],
                      "values": [sizes[s][1] for s in ordered]})

    async def push(self, session: Any, call: Call) -> Reply:
        req = migration_job.PushRequest.from_meta(call.meta)
        r = await run_async(migration_job.push(self.jobs, req, view=self.member.view, me=self.member.node_id,
                                               version=self._version, read=self._copy_item, clock=time.monotonic),
                            self._effect)
        self.bytes_pushed += r["bytes"]
        self.values_pushed += r["values"]
        return Reply(r)

    def _send(self, dest: str, groups: migration_job.Groups) -> None:
        send_states(functools.partial(self.call, dest), groups)

    def call(self, dest: str, call: Any) -> Any:
        """One call to the destination ``dest`` (HOST:PORT): :func:`call_at`."""
        return call_at(self._pool_(), dest, call)

    async def drop(self, session: Any, req: Call) -> Reply:
        """Free slots this node no longer owns; with ``pending``, the values it holds of slots
        where it is only a pending migration destination (before the copy starts)."""
        meta = req.meta
        slots, nslots = migration_job.slots_of(meta)
        r = await run_async(migration_job.drop(self.member.view, self.member.node_id, slots, nslots,
                                               int(meta.get("epoch", 0)), bool(meta.get("pending")),
                                               version=self._version, read=self._copy_item), self._effect)
        self.values_dropped += r["values"]
        return Reply(r)

    async def slot_versions(self, session: Any, req: Call) -> Reply:
        """The versions this node holds of ``keys`` ([namespace, tenant, key] each; a value's or a
        tombstone's, 0: neither): what a node freeing slots asks the owners before it hands them the
        values (and tombstones) they lack."""
        keys = req.meta.get("keys")
        if not isinstance(keys, list) or not all(
                isinstance(k, list | tuple) and len(k) == 3 and isinstance(k[2], bytes) for k in keys):
            raise InvalidArgument("keys: a list of [namespace, tenant, key] is required")
        return Reply({"vers": [self._version((str(ns), str(t), bytes(k))) for ns, t, k in keys]})

    async def _free(self, gone: frozenset[int], nslots: int, pending_only: bool) -> tuple[int, int]:
        """Free (no tombstone: the slot's owners keep the key's state) the values and tombstones of
        ``gone`` that :func:`may_free` still allows."""
        me = self.member.node_id
        store = self.store
        n = nbytes = 0
        slot_of = functools.partial(key_slot, slots=nslots)

        def allowed(key: bytes) -> bool:
            cur = self.member.view.state.slotmap
            return cur is None or may_free(cur, me, key_slot(key, cur.slots), pending_only)

        for batch in store.entries_in_slots(gone, slot_of):
            for e in batch:
                if not allowed(e.key) or not store.current(e):
                    continue  # (not current: written again since the listing, a double write: keep it)
                if store.drop(e, "free"):
                    n += 1
                    nbytes += e.length
            await trio.sleep(0)
        for ikey, _v in store.tombstones_in_slots(gone, slot_of):
            if allowed(ikey[2]):
                store.forget_tombstone(ikey)
        return n, nbytes

    # -- metrics
    def metrics(self) -> dict[str, float]:
        view = self.member.view
        sm = view.state.slotmap if view is not None else None
        live = set(view.state.nodes) if view is not None else set()
        moving = len(sm.pending) if sm is not None else 0
        under = 0
        if sm is not None:
            want = min(sm.replicas, max(1, len(live)))
            for s, row in enumerate(sm.table):
                pend = sm.pending.get(s, ())
                if sum(1 for n in row if n in live and n not in pend) < want:
                    under += 1
        return {"cluster_slots_moving": moving, "cluster_slots_under_replicated": under,
                "migration_bytes_pushed": self.bytes_pushed, "migration_values_pushed": self.values_pushed,
                "migration_values_dropped": self.values_dropped, "migration_jobs": len(self.jobs)}
