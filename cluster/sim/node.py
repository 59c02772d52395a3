"""An in-memory storage node: what the control plane sees of a memkv node, and nothing more.

It registers under ``nodes/<id>`` with a lease it renews every third of the TTL (and is fenced
-- refuses writes -- once it could not renew for 90 % of it), keeps a view of the cluster, runs
a rebalancer candidate (the real ``Rebalancer``) unless the world has standalone candidates, and
serves:

- client writes (``PUT``, and ``DELETE``: a tombstone), as the real client sends them
  (``memkv.client.core.calls``): fenced? then the ownership rule of ``memkv.cluster.ownership``
  against its own map, then the value is committed a little later (``commit_delay``: a real node
  checks before it commits, and a write that passed the check just before the map changed is what
  the copy's catch-up exists for); a value is kept only if its version is newer than the one held.
  The reply says what a real node's says of the namespace: ``all`` (its ``acks``: every live owner
  must store the write) and ``ow`` (overwritable);
- ``RELAY`` (``memkv.cluster.relay``): the same checks, then every address in ``to`` must be a
  registered owner or pending destination of the keys' slots in this node's map (else ``Moved``);
  what this node holds of each key, at least as new as the client's version, is sent to each of
  them as a copy, with the relay's own short timeout; a key held only older, or a copy that
  fails, is ``NotEnoughReplicas``;
- ``SLOT_SIZES``, ``MIGRATE_PUSH`` and ``DROP_SLOTS``: the real migration programs
  (``memkv.cluster.migration_job``) against this node's data;
- copies (``PUT_MANY`` with versions) from a migration source or a relay, refused while a copy
  fault holds and, as every write, while the node is fenced.

Values are (version, generation, size, slot) per key -- no bytes; a versioned delete is a value
marked as a tombstone (the store keeps it as the key's state: the newer version wins, copies and
hand-offs carry it). A crash loses the process
state (view, lease, push jobs, calls in flight) and, for a volatile node, the data; a durable
node keeps its data across a restart, as flash does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memkv.client.cluster_map import NodeInfo, key_slot, node_key
from memkv.client.etcd import EtcdUnavailable
from memkv.cluster import migration_job
from memkv.cluster.effects import ETCD, NodeCall, Program, Sleep
from memkv.cluster.migration_job import CopyItem, FreeSlots, IKey, ScanSlots, SendCopies, may_free
from memkv.cluster.ownership import route_check
from memkv.cluster.rebalancer import Rebalancer
from memkv.cluster.sim.loop import Process
from memkv.cluster.sim.net import NetActor
from memkv.cluster.sim.view import SimView
from memkv.errors import ConnectionLost, DiskFull, Fenced, InvalidArgument, MemKVError, Moved, NotEnoughReplicas
from memkv.protocol.opcodes import Op

if TYPE_CHECKING:
    from memkv.cluster.sim.world import World

NS = "blocks"
OP_COPY = -1  # PUT_MANY with ``vers`` from a migration source (the simulator's own tag for it)
RELAY_TIMEOUT_S = 2.0  # ``[cluster] relay_timeout``'s default (memkv/cluster/relay.py)


@dataclass(slots=True)
class Value:
    version: int
    gen: int
    size: int
    slot: int
    tomb: bool = False  # a tombstone: the key was deleted as of ``version``


@dataclass(frozen=True, eq=False)
class RelayCopies:
    """A relay's copies to one owner, sent with the relays' timeout (not the slot copies')."""

    dest: str
    copies: list[tuple[bytes, int, int, int, bool]]


class SimNode(NetActor):
    def __init__(self, world: World, node_id: str, zone: str, host: str, *, durable: bool,
                 candidate: bool) -> None:
        super().__init__(world.loop, node_id, world.net)
        self.world = world
        self.id = node_id
        self.on_failure = world.process_failed
        self.zone = zone
        self.host = host
        self.addr = f"{node_id}.{host}:7700"
        self.durable = durable
        self.candidate = candidate
        self.incarnation = 0
        self.data: dict[bytes, Value] = {}
        self.gen = 0
        self.jobs: dict[str, migration_job.PushJob] = {}
        self.lease_id: int | None = None
        self.valid_until = 0.0
        self.rebalancer: Rebalancer | None = None
        self.refuse_copies_until = 0.0
        self._inflight: dict[int, Callable[[Any, BaseException | None], None]] = {}
        self._call_seq = 0
        self.etcd_timeout = max(1.0, min(3.0, world.scenario.lease_ttl / 2))
        self.call_timeout = 30.0

    # -- life
    def start(self) -> None:
        w = self.world
        self.alive = True
        self.incarnation += 1
        self.net.nodes[self.addr] = self
        self.view = SimView(self.loop, w.etcd, w.cluster, w.decoded, w.watch_delay)
        self.spawn(f"{self.id}/lease", self._lease_loop())
        if self.candidate:
            self.rebalancer = w.make_rebalancer(self.view, self.id, lease=lambda: self.lease_id,
                                                alive=lambda: not self.fenced())
            self.spawn(f"{self.id}/rebalancer", self.rebalancer.campaign())
        w.trace(self.id, f"starts (incarnation {self.incarnation}, {len(self.data)} values)")

    def crash(self) -> None:
        """kill -9: the process and everything volatile go; the lease expires on its own."""
        if not self.halt():
            return
        self.lease_id, self.valid_until = None, 0.0
        self.jobs.clear()
        self.rebalancer = None
        inflight, self._inflight = self._inflight, {}
        for _, reply in sorted(inflight.items()):
            reply(None, ConnectionLost(f"{self.addr} closed the connection"))
        lost: dict[bytes, Any] = {}
        if not self.durable:
            lost, self.data = self.data, {}
        self.world.checker.node_down(self, lost)

    def stop(self) -> None:
        """A clean shutdown: revoke the lease (the node key and any leadership go at once), exit."""
        if not self.alive:
            return
        if self.lease_id is not None and self.world.etcd.up:
            self.world.etcd.revoke(self.lease_id)
        self.crash()

    def fenced(self) -> bool:
        return self.loop.now >= self.valid_until

    def _lease_loop(self) -> Program[None]:
        """node_member's registration and lease loop: register, renew every ttl/3, register again
        when the lease is gone."""
        ttl = self.world.scenario.lease_ttl
        period = ttl / 3
        info = NodeInfo(self.id, self.addr, self.zone, 1 << 30, "sim", host=self.host)
        while True:
            try:
                if self.lease_id is None:
                    t0 = self.loop.now
                    lease = yield ETCD.grant(ttl)
                    yield ETCD.put(node_key(self.world.cluster, self.id), info.encode(), lease=lease)
                    self.lease_id, self.valid_until = lease, t0 + ttl * 0.9
                    self.world.trace(self.id, f"registered (lease {lease:x})")
                yield Sleep(period)
                t0 = self.loop.now
                left = yield ETCD.keepalive(self.lease_id)
                if left <= 0:
                    self.world.trace(self.id, "lease expired; registering again")
                    self.lease_id, self.valid_until = None, 0.0
                    continue
                self.valid_until = t0 + min(left, ttl) * 0.9
            except EtcdUnavailable:
                yield Sleep(min(0.5, period))

    # -- serving
    def serve(self, op: int, meta: dict[str, Any], reply: Callable[[Any, BaseException | None], None]) -> None:
        self._call_seq += 1
        seq = self._call_seq
        self._inflight[seq] = reply

        def done(value: Any, error: BaseException | None) -> None:
            if self._inflight.pop(seq, None) is not None:
                reply(value, error)

        if op in (Op.PUT, Op.DELETE):  # the hot path of the simulation: no process of its own
            self._put(meta, op == Op.DELETE, done)
        else:
            self.spawn(f"{self.id}/op{op}", self._handle(op, meta), done)

    def _handle(self, op: int, meta: dict[str, Any]) -> Program[Any]:
        if op == OP_COPY:
            return self._store_copies(meta)
        if op == Op.RELAY:
            return (yield from self._relay(meta))
        if op == Op.MIGRATE_PUSH:
            req = migration_job.PushRequest.from_meta(meta)
            return (yield from migration_job.push(self.jobs, req, view=self.view, me=self.id, version=self._version,
                                                  read=self._copy_item, clock=self.loop.clock))
        if op == Op.DROP_SLOTS:
            slots, nslots = migration_job.slots_of(meta)
            return (yield from migration_job.drop(self.view, self.id, slots, nslots, int(meta.get("epoch", 0)),
                                                  bool(meta.get("pending")), version=self._version,
                                                  read=self._copy_item))
        if op == Op.SLOT_VERSIONS:
            return {"vers": [self._version(tuple(k)) for k in meta["keys"]]}
        if op == Op.SLOT_SIZES:
            return self._slot_sizes(int(meta["nslots"]))
        raise InvalidArgument(f"simulated node: no op {op}")

    def _put(self, meta: dict[str, Any], tomb: bool, done: Callable[[Any, BaseException | None], None]) -> None:
        """A client write (a put, or a delete's tombstone): fenced? owner at the client's epoch? then
        commit a moment later."""
        key: bytes = meta["k"]
        try:
            if self.fenced():
                raise Fenced(f"node {self.id} lost its etcd lease")
            route_check(self.view.state.slotmap, self.id, meta.get("ep"), [key], True)
        except MemKVError as exc:
            self.loop.call_later(0.0, done, None, exc)
            return
        incarnation = self.incarnation
        sc = self.world.scenario
        version = int(meta["ver"])

        def commit() -> None:
            if self.alive and self.incarnation == incarnation:
                stored = self._commit(key, version, 0 if tomb else sc.value_size, key_slot(key, sc.slots), tomb)
                # what a real node's reply says of the namespace: its acks, whether it is overwritable
                reply: dict[str, Any] = {"d": stored} if tomb else {"gen": self.gen}
                reply.update(all=sc.acks_all, ow=not sc.write_once)
                done(reply, None)

        self.loop.call_later(self.world.commit_delay(), commit)

    def _commit(self, key: bytes, version: int, size: int, slot: int, tomb: bool = False) -> bool:
        old = self.data.get(key)
        if old is not None and old.version >= version:
            return False
        self.gen += 1
        self.data[key] = Value(version, self.gen, size, slot, tomb)
        return True

    def repair(self, key: bytes, version: int, size: int, slot: int, tomb: bool) -> None:
        """A read's repair (a value, or a delete's tombstone, with its version): the newer state wins,
        as for any write; a node that is down or fenced does not take it."""
        if self.alive and not self.fenced():
            self._commit(key, version, size, slot, tomb)

    def _relay(self, meta: dict[str, Any]) -> Program[dict[str, Any]]:
        """``RELAY`` (memkv/cluster/relay.py): hand a write this node stored on to the owners in ``to``."""
        if self.fenced():
            raise Fenced(f"node {self.id} lost its etcd lease")
        keys, vers = list(meta["ks"]), [int(v) for v in meta["vers"]]
        st = self.view.state
        sm = st.slotmap
        route_check(sm, self.id, meta.get("ep"), keys, True)
        assert sm is not None
        ids = {info.addr: nid for nid, info in st.nodes.items()}
        for addr in meta["to"]:
            nid = ids.get(addr)
            for key in keys:
                s = key_slot(key, sm.slots)
                if nid is None or (nid not in sm.table[s] and nid not in sm.pending.get(s, ())):
                    raise Moved(f"{addr} is not a registered owner of slot {s} at epoch {sm.epoch}", sm.epoch)
        copies = []
        for key, ver in zip(keys, vers, strict=True):
            v = self.data.get(key)
            if v is None or v.version < ver:
                raise NotEnoughReplicas(f"node {self.id} no longer holds {key!r} at version {ver}; not relayed")
            copies.append((key, v.version, v.size, v.slot, v.tomb))
        for addr in meta["to"]:
            try:
                yield RelayCopies(addr, copies)
            except MemKVError as exc:
                raise NotEnoughReplicas(f"relay from node {self.id} to {addr} failed: {type(exc).__name__}") from None
        return {"n": len(copies)}

    def _store_copies(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self.fenced():  # copies are writes: a node without its lease refuses them (memkv/server/stages.py)
            raise Fenced(f"node {self.id} lost its etcd lease")
        if self.loop.now < self.refuse_copies_until:
            raise DiskFull(f"node {self.id}: copies refused (injected copy failure)")
        n = 0
        for key, version, size, slot, tomb in meta["copies"]:
            n += self._commit(key, version, size, slot, tomb)
        return {"stored": n}

    def _slot_sizes(self, nslots: int) -> dict[str, Any]:
        sizes: dict[int, list[int]] = {}
        for v in self.data.values():  # (the world has one slot count: ``nslots``)
            row = sizes.setdefault(v.slot, [0, 0])
            row[0] += v.size
            row[1] += 1
        ordered = sorted(sizes)
        return {"slots": ordered, "bytes": [sizes[s][0] for s in ordered], "values": [sizes[s][1] for s in ordered]}

    def _version(self, ikey: Any) -> int:
        v = self.data.get(ikey[2])
        return v.version if v is not None else 0

    def _copy_item(self, ikey: IKey) -> CopyItem | None:
        v = self.data.get(ikey[2])
        if v is None:
            return None
        return CopyItem(ikey[2], None if v.tomb else v, v.size, v.version, ikey[1], None)

    # -- effects of the migration programs
    def perform_io(self, proc: Process, tok: int, eff: Any) -> None:
        if isinstance(eff, ScanSlots):
            keys = [(NS, "", k) for k, v in sorted(self.data.items(), key=lambda kv: kv[1].gen)
                    if v.gen > eff.after_gen and v.slot in eff.slots]
            self.loop.call_later(0.0, proc.wake, tok, (keys, self.gen), None)
        elif isinstance(eff, SendCopies):
            nslots = self.world.scenario.slots
            copies = [(k, ver, 0, key_slot(k, nslots), True) if v is None else (k, ver, v.size, v.slot, False)
                      for ks, vs, vers in eff.groups.values() for k, v, ver in zip(ks, vs, vers, strict=True)]
            super().perform_io(proc, tok, NodeCall(eff.dest, OP_COPY, {"copies": copies}))
        elif isinstance(eff, RelayCopies):  # the relays' own pool: a short timeout
            self.net.node_call(eff.dest, OP_COPY, {"copies": eff.copies}, RELAY_TIMEOUT_S,
                               lambda v, e: proc.wake(tok, v, e))
        elif isinstance(eff, FreeSlots):
            self.loop.call_later(0.0, proc.wake, tok, self._free(eff), None)
        else:
            super().perform_io(proc, tok, eff)

    def _free(self, eff: FreeSlots) -> tuple[int, int]:
        cur = self.view.state.slotmap
        freed: list[tuple[bytes, Value]] = []
        for key, v in list(self.data.items()):
            if v.slot in eff.slots and may_free(cur, self.id, v.slot, eff.pending_only):
                del self.data[key]
                freed.append((key, v))
        if freed:
            self.world.checker.freed(self, freed, "purge" if eff.pending_only else "drop")
        return len(freed), sum(v.size for _, v in freed)
