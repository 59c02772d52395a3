"""The node side of slot migration (DESIGN.md §7): the ops the rebalancer drives.

Three node-to-node / rebalancer-to-node operations, served by every cluster
node (``install`` is called by ``attach_cluster``):

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
  rebalancer leader simply starts a job again.
- ``DROP_SLOTS {slots, nslots, epoch}``: after the flip, free the old copy:
  waits for the node's map to reach ``epoch``, then deletes the values of the
  listed slots that the node does not own (pending included) in its map.
  With ``pending``: (sent by a source before it copies) delete the values of the listed slots
  where this node is only a pending destination -- old values from an earlier ownership.

Once the node has tenants, all three need the cluster identity (``__cluster__``, token derived from the
cluster secret: memkv/cluster/identity.py); the push logs in to ``dest`` as it too and stores every value
for its own tenant (``PUT_MANY`` ``owner``), so tenant-scoped values keep their scope.

Also: Prometheus gauges/counters on the node's /metrics (slots moving and
under-replicated slots as this node's map says, bytes and values it pushed).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from memkv.client.cluster_map import key_slot
from memkv.errors import ConnectionLost, CorruptValue, InvalidArgument, KeyExists, MemKVError, NodeUnavailable
from memkv.protocol.opcodes import Op
from memkv.server.handlers import Reply

log = logging.getLogger("memkv.cluster")

# Opcodes (control plane range, 40+; Op.ADMIN is 40).
OP_SLOT_SIZES = int(Op.SLOT_SIZES)
OP_MIGRATE_PUSH = int(Op.MIGRATE_PUSH)
OP_DROP_SLOTS = int(Op.DROP_SLOTS)

CATCHUP_DELAY_S = 0.5
EPOCH_WAIT_S = 5.0
JOB_IDLE_S = 300.0


@dataclass
class _Job:
    slots: frozenset[int]
    nslots: int
    dest: str
    keys: deque[tuple[str, str, bytes]]
    gen0: int
    ready_at: float
    caught_up: bool = False
    last_used: float = field(default_factory=time.monotonic)


class MigrationService:
    def __init__(self, node: Any, member: Any) -> None:
        self.node = node
        self.member = member
        self.store = node.store
        self.jobs: dict[str, _Job] = {}
        self.bytes_pushed = 0
        self.values_pushed = 0
        self.values_dropped = 0
        self._pool: Any = None

    # -- helpers
    def _pool_(self) -> Any:
        if self._pool is None:
            from memkv.client.pool import BlockingPool

            # as the cluster identity (memkv/cluster/identity.py), over TLS when the nodes serve TLS
            self._pool = BlockingPool(timeout=30.0, connect_timeout=3.0, **self.member.credentials.pool_kwargs())
        return self._pool

    async def _wait_epoch(self, epoch: int) -> Any:
        deadline = trio.current_time() + EPOCH_WAIT_S
        while True:
            view = self.member.view
            st = view.state if view is not None else None
            if st is not None and st.slotmap is not None and st.epoch >= epoch:
                return st.slotmap
            if trio.current_time() > deadline:
                raise NodeUnavailable(f"node {self.member.node_id} has not seen slot map epoch {epoch} yet")
            await trio.sleep(0.02)

    async def _scan(self, slots: frozenset[int], nslots: int, after_gen: int = 0
                    ) -> tuple[list[tuple[str, str, bytes]], int]:
        """Index keys of ``slots`` written after ``after_gen``, and the highest generation seen."""
        out: list[tuple[str, str, bytes]] = []
        top = after_gen
        entries = list(self.store._index.values())
        for i, e in enumerate(entries):
            if e.generation > top:
                top = e.generation
            if e.generation > after_gen and key_slot(e.key, nslots) in slots:
                out.append(e.ikey)
            if i % 20000 == 19999:
                await trio.sleep(0)
        return out, top

    def _require_internal(self, session: Any, what: str) -> None:
        """Only the cluster identity once the node has tenants (a tenant, even an admin, gets PermissionDenied)."""
        sec = getattr(self.node, "security", None)
        session.require_internal(what, auth_enabled=bool(sec is not None and sec.tenants))

    @staticmethod
    def _slots(meta: dict[str, Any]) -> tuple[frozenset[int], int]:
        slots, nslots = meta.get("slots"), meta.get("nslots")
        if not isinstance(slots, list) or not isinstance(nslots, int) or nslots <= 0:
            raise InvalidArgument("slots (list) and nslots (int) are required")
        return frozenset(int(s) for s in slots), nslots

    # -- ops
    async def slot_sizes(self, session: Any, meta: dict[str, Any]) -> Reply:
        self._require_internal(session, "SLOT_SIZES")
        nslots = meta.get("nslots")
        if not isinstance(nslots, int) or nslots <= 0:
            raise InvalidArgument("nslots (int) is required")
        sizes: dict[int, list[int]] = {}
        for i, e in enumerate(list(self.store._index.values())):
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

    async def push(self, session: Any, meta: dict[str, Any]) -> Reply:
        self._require_internal(session, "MIGRATE_PUSH")
        slots, nslots = self._slots(meta)
        job_id = str(meta.get("job", ""))
        dest = str(meta.get("dest", ""))
        epoch = int(meta.get("epoch", 0))
        max_bytes = max(1, int(meta.get("max_bytes", 1 << 20)))
        if not job_id or ":" not in dest:
            raise InvalidArgument("job and dest HOST:PORT are required")
        now = time.monotonic()
        for jid in [j for j, job in self.jobs.items() if now - job.last_used > JOB_IDLE_S]:
            del self.jobs[jid]
        job = self.jobs.get(job_id)
        if job is None or job.slots != slots or job.dest != dest:
            await self._wait_epoch(epoch)
            ready = time.monotonic()
            # The destination may hold old values of these slots (it owned them before a restart or
            # an outage and missed overwrites since): store-if-absent would keep them. Free them
            # first (only where it is still just a pending destination); what it gets from now on
            # is the copy below and the clients' double writes.
            await trio.to_thread.run_sync(self._purge, dest, sorted(slots), nslots, epoch)
            keys, top = await self._scan(slots, nslots)
            job = self.jobs[job_id] = _Job(slots, nslots, dest, deque(keys), top, ready)
        job.last_used = now
        # values of this chunk, grouped by (namespace, tenant, ttl)
        groups: dict[tuple[str, str, float | None], tuple[list[bytes], list[bytes], list[int]]] = {}
        nbytes = 0
        clock = self.store.clock()
        taken: list[tuple[str, str, bytes]] = []  # this chunk's keys, put back if sending fails
        while job.keys and nbytes < max_bytes:
            ikey = job.keys.popleft()
            taken.append(ikey)
            e = self.store._index.get(ikey)
            if e is None or (e.expires is not None and e.expires <= clock):
                continue
            try:
                value = bytes(self.store.view(e))
            except CorruptValue:
                continue  # damaged on flash: reported by the tier and served as a miss; nothing to copy
            except MemKVError:
                # A durable value only on flash that cannot be read in now (the pool is full and nothing
                # is evictable, or its record is not durable yet) is never skipped: skipping it, the
                # round flipped and the old owner dropped the slot, losing an acknowledged write (found
                # by the chaos soak: python -m chaos run rereplicate_flash_only). The chunk goes back
                # and the push fails; the rebalancer calls again, and a round that cannot copy leaves
                # the slots with their old owners.
                job.keys.extendleft(reversed(taken))
                raise
            ttl = None if e.expires is None else max(1.0, round(e.expires - clock))
            ks, vs, vers = groups.setdefault((ikey[0], e.tenant, ttl), ([], [], []))
            ks.append(e.key)
            vs.append(value)
            vers.append(e.version)
            nbytes += len(value)
        done = False
        if not job.keys:
            if not job.caught_up:
                wait = job.ready_at + CATCHUP_DELAY_S - time.monotonic()
                if wait > 0:
                    await trio.sleep(wait)
                more, job.gen0 = await self._scan(slots, nslots, job.gen0)
                job.keys.extend(more)
                job.caught_up = True
                done = not more and not groups
            else:
                done = not groups
        values = sum(len(ks) for ks, _, _ in groups.values())
        if groups:
            try:
                await trio.to_thread.run_sync(self._send, dest, groups)
            except BaseException:
                # Not (entirely) delivered -- e.g. the pooled connection was to the destination's
                # previous process (it restarted on the same address). The rebalancer calls again
                # with the same job: resend this chunk (the copy is idempotent), never skip it.
                job.keys.extendleft(reversed(taken))
                raise
        self.bytes_pushed += nbytes
        self.values_pushed += values
        if done:
            self.jobs.pop(job_id, None)
        return Reply({"bytes": nbytes, "values": values, "done": done, "left": len(job.keys)})

    def _send(self, dest: str,
              groups: dict[tuple[str, str, float | None], tuple[list[bytes], list[bytes], list[int]]]) -> None:
        from memkv.client.calls import PutManyCall
        from memkv.client.url import NodeAddress

        host, _, port = dest.rpartition(":")
        addr = NodeAddress(host.strip("[]"), int(port))
        for (ns, tenant, ttl), (ks, vs, vers) in groups.items():
            # "owner": each value is stored for its own tenant (and in its tenant-scoped namespace's scope);
            # only the cluster identity may set it (Handlers.owner). "vers": the values keep their versions.
            for i in range(0, len(ks), 512):
                extra = {"owner": tenant, "vers": vers[i:i + 512]}
                call = PutManyCall(ks[i:i + 512], vs[i:i + 512], namespace=ns, ttl=ttl, pin=False, extra=extra)
                res = self._call(addr, call)
                # Any value the destination did not store fails the chunk (push puts it back, the
                # rebalancer calls again): a copy that drops some values silently -- it raised only
                # when every value failed -- flipped the slot without them, and the old owner then
                # dropped the last copies (acknowledged writes lost; found by the chaos soak, e.g. a
                # destination whose pool is full: OutOfMemory per value). KeyExists is no failure:
                # the destination holds other bytes of a write-once key, which a copy never replaces.
                bad = [r for r in res if isinstance(r, MemKVError) and not isinstance(r, KeyExists)]
                if bad:
                    raise bad[0]

    def _purge(self, dest: str, slots: list[int], nslots: int, epoch: int) -> None:
        from memkv.client.calls import SimpleCall
        from memkv.client.url import NodeAddress

        host, _, port = dest.rpartition(":")
        self._call(NodeAddress(host.strip("[]"), int(port)),
                   SimpleCall(Op.DROP_SLOTS, {"slots": slots, "nslots": nslots, "epoch": epoch, "pending": True}))

    def _call(self, addr: Any, call: Any) -> Any:
        """One call to the destination; once more on a fresh connection if the pooled one was dead.

        A destination that restarted on the same address leaves this node's pool holding
        connections to its previous process: the first call on each fails with ConnectionLost.
        Both calls made here are idempotent (versioned copies, DROP_SLOTS ``pending``), so
        dropping the stale connections and calling again is safe, and it spares the rebalancer
        a failed push and a retry round-trip every time a node comes back.
        """
        pool = self._pool_()
        try:
            return pool.call(addr, call)
        except ConnectionLost:
            pool.drop(addr)
            return pool.call(addr, call)

    async def drop(self, session: Any, meta: dict[str, Any]) -> Reply:
        """Free slots this node no longer owns; with ``pending``, the values it holds of slots
        where it is only a pending migration destination (before the copy starts)."""
        self._require_internal(session, "DROP_SLOTS")
        slots, nslots = self._slots(meta)
        sm = await self._wait_epoch(int(meta.get("epoch", 0)))
        me = self.member.node_id
        pending_only = bool(meta.get("pending"))
        if pending_only:
            mine = {s for s in slots if me not in sm.pending.get(s, ())}
        else:
            mine = {s for s in slots if s < len(sm.table) and me in sm.table[s]}
        gone = slots - mine
        n = nbytes = 0
        entries = list(self.store._index.values())
        for i, e in enumerate(entries):
            if key_slot(e.key, nslots) in gone:
                cur = self.member.view.state.slotmap
                if cur is not None:
                    cs = key_slot(e.key, cur.slots)
                    if pending_only and me not in cur.pending.get(cs, ()):
                        continue  # no longer a pending destination (flipped or abandoned)
                    if not pending_only and me in cur.table[cs]:
                        continue  # the map changed meanwhile and gave us the slot again
                if self.store._index.get(e.ikey) is not e:
                    continue  # written again since the listing (a double write): keep it
                if self.store.delete(e.key, namespace=e.ikey[0], tenant=e.ikey[1]):
                    n += 1
                    nbytes += e.length
            if i % 5000 == 4999:
                await trio.sleep(0)
        self.values_dropped += n
        return Reply({"values": n, "bytes": nbytes, "kept": sorted(mine)})

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


def install(node: Any, member: Any) -> MigrationService:
    svc = MigrationService(node, member)
    node.migration = svc
    node.extra_handlers[OP_SLOT_SIZES] = svc.slot_sizes
    node.extra_handlers[OP_MIGRATE_PUSH] = svc.push
    node.extra_handlers[OP_DROP_SLOTS] = svc.drop
    # /metrics: chain onto the node's extra-metrics hook (MetricsCollector ``extra``).
    previous = node._flash_metrics

    def extra_metrics() -> dict[str, float]:
        out = dict(previous())
        try:
            out.update(svc.metrics())
        except Exception:  # noqa: BLE001 - metrics must never break a scrape
            log.exception("migration metrics failed")
        return out

    node._flash_metrics = extra_metrics
    return svc
