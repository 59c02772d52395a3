"""Relay: a write reaches an owner the client cannot reach, through an owner it can.

A write in a namespace whose replies say ``all`` (``acks = "all"``, the default of a durable
namespace: memkv/config.py) is acknowledged only once every owner of its slot that holds a
live etcd lease stores it (client/core/dispatch.py). When the client could not reach one of
them (refused, timed out, cut off) the node-to-node path is often still intact -- a client
partition, a client-side network fault --, so the client asks an owner that did store the
write to hand it on: ``RELAY {ns, ks, vers, to, ep}``, no payload.

The relaying node sends what it holds of each key -- the value or tombstone, at least as new as
the client's write (``vers``) -- to each owner in ``to`` over the slot copies' own path
(``migration.copy_item`` / ``migration.send_states``: ``PUT_MANY`` / ``DELETE_MANY`` with the
versions, as the cluster identity, each value for its own tenant). The receiving owner keeps
the newer of what it has and what it gets, as for any copy, so a relay is idempotent and never
undoes a newer write. A key held here only in an older version (it was evicted or expired since,
or a concurrent write-once value won) is not relayed and fails the request.

Checks, in the pipeline's order (the operation is a routed write: memkv/server/stages.py): the
session's ``rw`` grant on the namespace, this node not fenced and owning every key at the
client's epoch; then here: every address in ``to`` is a registered owner (or pending
destination) of every key's slot in this node's map -- a node pushes only to its peers, never
to an address a client names -- else ``Moved`` with this node's epoch (the client refreshes).

Node-to-node calls of relays use a pool of their own with a short timeout (``[cluster]
relay_timeout``, default 2 s) and at most ``RELAY_THREADS`` at once: a paused owner makes each
relay to it wait that long, and those waits must not hold the slot copies' threads.
"""

from __future__ import annotations

import functools
from typing import Any

import trio

from memkv.client.cluster_map import key_slot
from memkv.cluster import migration_job
from memkv.cluster.migration import call_at, copy_item, send_states
from memkv.engine.store import Store
from memkv.errors import InvalidArgument, MemKVError, Moved, NotEnoughReplicas
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.server.binary import Reply
from memkv.server.extension import Operation
from memkv.server.requests import WRITE, Call, Request

DEFAULT_TIMEOUT_S = 2.0
RELAY_THREADS = 16


def decode_relay(meta: dict[str, Any], limits: c.Limits, payload_len: int) -> Request:
    """A relay is a routed write of its keys: the pipeline's stages check them like a put's."""
    keys = c.get_keys(meta, "ks", limits)
    ns = meta.get("ns", "shared")
    if not isinstance(ns, str):
        raise InvalidArgument("field 'ns' must be a string")
    return Call("RELAY", WRITE, meta, ns=ns, keys=keys, epoch=meta.get("ep"))


class Relay:
    """The ``RELAY`` operation of a cluster node."""

    def __init__(self, store: Store, member: Any, opts: dict[str, Any]) -> None:
        self.store = store
        self.member = member
        self.timeout = float(opts.get("relay_timeout", DEFAULT_TIMEOUT_S))
        if self.timeout <= 0:
            raise InvalidArgument("[cluster] relay_timeout must be > 0")
        self.limiter = trio.CapacityLimiter(RELAY_THREADS)
        self._pool: Any = None
        self.relays = 0
        self.values_relayed = 0
        self.failures = 0

    def operations(self) -> tuple[Operation, ...]:
        return (Operation("RELAY", WRITE, self.relay, opcode=int(Op.RELAY), decode=decode_relay),)

    def _pool_(self) -> Any:
        if self._pool is None:
            from memkv.client.executors.blocking_connection import BlockingPool

            # as the cluster identity (memkv/cluster/identity.py), like the slot copies
            self._pool = BlockingPool(timeout=self.timeout, connect_timeout=min(self.timeout, 2.0),
                                      **self.member.credentials.pool_kwargs())
        return self._pool

    def _call(self, dest: str, call: Any) -> Any:
        return call_at(self._pool_(), dest, call)

    def _targets(self, req: Call) -> list[str]:
        """The addresses in ``to``, each a registered owner or pending destination of every key's slot."""
        to = req.meta.get("to")
        if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
            raise InvalidArgument("field 'to' must be a non-empty list of HOST:PORT")
        view = self.member.view
        st = view.state if view is not None else None
        sm = st.slotmap if st is not None else None
        if st is None or sm is None:
            raise Moved(f"node {self.member.node_id} has no slot map yet (epoch 0)", 0)
        ids = {info.host_port: nid for nid, info in st.nodes.items()}
        for addr in to:
            host, _, port = addr.rpartition(":")
            nid = ids.get((host.strip("[]"), int(port))) if port.isdigit() else None
            for key in req.keys:
                s = key_slot(key, sm.slots)
                if nid is None or (nid not in sm.table[s] and nid not in sm.pending.get(s, ())):
                    raise Moved(f"{addr} is not a registered owner of slot {s} at epoch {sm.epoch}", sm.epoch)
        return list(to)

    async def relay(self, session: Any, req: Call) -> Reply:
        to = self._targets(req)
        vers = c.get_ints(req.meta, "vers", len(req.keys))
        pol = self.store.namespaces.get(req.ns)
        if pol is None:
            raise InvalidArgument(f"unknown namespace {req.ns!r}")
        scope = session.tenant if pol.tenant_scoped else ""
        items = []
        for key, ver in zip(req.keys, vers, strict=True):
            ikey = (req.ns, scope, key)
            item = copy_item(self.store, ikey)
            if item is None or item.version < ver:
                self.failures += 1
                raise NotEnoughReplicas(f"node {self.member.node_id} no longer holds {key!r} at version {ver}; "
                                        f"not relayed")
            items.append((ikey, item))
        groups = migration_job.group(items)
        for dest in to:
            try:
                await trio.to_thread.run_sync(send_states, functools.partial(self._call, dest), groups,
                                              limiter=self.limiter)
            except MemKVError as exc:
                self.failures += 1
                raise NotEnoughReplicas(f"relay from node {self.member.node_id} to {dest} failed: "
                                        f"{type(exc).__name__}: {exc.message}") from None
        self.relays += 1
        self.values_relayed += len(items) * len(to)
        return Reply({"n": len(items)})

    def stats(self) -> dict[str, Any]:
        return {"relays": self.relays, "values_relayed": self.values_relayed, "failures": self.failures,
                "timeout_s": self.timeout}

    def metrics(self) -> dict[str, float]:
        return {"relay_requests": float(self.relays), "relay_values": float(self.values_relayed),
                "relay_failures": float(self.failures)}
