"""What a cluster looks like in etcd: key layout, node records, the slot map (docs/cluster.md).

Pure data and codecs, shared by clients (routing), nodes (ownership checks)
and the control plane (which computes maps in ``memkv.cluster.slotmap``).

etcd layout under ``/memkv/<cluster>/``:
- ``nodes/<node_id>``: JSON :class:`NodeInfo`, attached to the node's lease;
- ``slotmap``: JSON :class:`SlotMap` (epoch, slot -> replica node ids);
- ``rebalancer/leader``: the node id of the elected leader (leased).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import mmh3

DEFAULT_SLOTS = 4096


def prefix(cluster: str) -> str:
    return f"/memkv/{cluster}/"


def nodes_prefix(cluster: str) -> str:
    return f"/memkv/{cluster}/nodes/"


def node_key(cluster: str, node_id: str) -> str:
    return f"/memkv/{cluster}/nodes/{node_id}"


def slotmap_key(cluster: str) -> str:
    return f"/memkv/{cluster}/slotmap"


def leader_key(cluster: str) -> str:
    return f"/memkv/{cluster}/rebalancer/leader"


def key_slot(key: bytes, slots: int) -> int:
    """key -> slot: mmh3 (x86, 32 bit, seed 0, unsigned) modulo the slot count."""
    return mmh3.hash(key, 0, signed=False) % slots


@dataclass(frozen=True)
class NodeInfo:
    """A live node, as registered under ``nodes/<id>``."""

    node_id: str
    addr: str  # HOST:PORT of the TCP transport
    zone: str = "z0"
    capacity: int = 0
    version: str = ""
    transports: dict[str, str] = field(default_factory=dict)
    # what the node's subsystems advertise (memkv/server/extension.py), e.g. its KV events endpoints
    services: dict[str, str] = field(default_factory=dict)
    # the machine it runs on (``--host-id``, default the hostname): the workers of one ``memkv serve
    # --workers N`` share it, and placement keeps a slot's replicas on distinct hosts; "" = unknown
    # (a node registered before hosts were): placement counts it as a host of its own
    host: str = ""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.addr.rpartition(":")
        return host.strip("[]"), int(port)

    def encode(self) -> bytes:
        d = {"id": self.node_id, "addr": self.addr, "zone": self.zone, "capacity": self.capacity,
             "version": self.version, "transports": self.transports or {"tcp": self.addr}, "host": self.host}
        if self.services:
            d["services"] = self.services
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> NodeInfo:
        d = json.loads(raw)
        return cls(str(d["id"]), str(d["addr"]), str(d.get("zone", "z0")), int(d.get("capacity", 0)),
                   str(d.get("version", "")), dict(d.get("transports", {})),
                   {str(k): str(v) for k, v in dict(d.get("services", {})).items()}, str(d.get("host", "")))


@dataclass(frozen=True)
class SlotMap:
    """Epoch + slot -> replica node ids (primary first). The epoch only grows."""

    epoch: int
    slots: int
    replicas: int  # the target replication factor R
    table: tuple[tuple[str, ...], ...]  # len == slots
    members: dict[str, str] = field(default_factory=dict)  # node id -> zone it was computed for
    # Rebalancer (memkv.cluster.rebalancer): slot -> nodes being filled by a migration. They are
    # also at the end of the slot's table row, so clients write to them (and read them last).
    pending: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def owners(self, key: bytes) -> tuple[str, ...]:
        return self.table[key_slot(key, self.slots)]

    def slots_of(self, node_id: str) -> tuple[int, int]:
        """(slots where ``node_id`` is primary, slots where it is another replica)."""
        primary = sum(1 for r in self.table if r and r[0] == node_id)
        other = sum(1 for r in self.table if node_id in r[1:])
        return primary, other

    def owned_slots(self, node_id: str) -> frozenset[int]:
        return frozenset(s for s, r in enumerate(self.table) if node_id in r)

    def encode(self) -> bytes:
        ids = sorted({n for r in self.table for n in r} | set(self.members))
        index = {n: i for i, n in enumerate(ids)}
        d: dict[str, Any] = {"epoch": self.epoch, "slots": self.slots, "replicas": self.replicas, "nodes": ids,
                             "members": self.members, "table": [[index[n] for n in r] for r in self.table]}
        if self.pending:
            d["pending"] = {str(s): [index[n] for n in ns] for s, ns in self.pending.items()}
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SlotMap:
        d: dict[str, Any] = json.loads(raw)
        ids = [str(n) for n in d["nodes"]]
        table = tuple(tuple(ids[i] for i in r) for r in d["table"])
        if len(table) != int(d["slots"]):
            raise ValueError("slot map table length does not match its slot count")
        pending = {int(s): tuple(ids[i] for i in ns) for s, ns in d.get("pending", {}).items()}
        return cls(int(d["epoch"]), int(d["slots"]), int(d["replicas"]), table,
                   {str(k): str(v) for k, v in d.get("members", {}).items()}, pending)
