"""What a simulation runs: the cluster's topology and settings, and a schedule of faults.

A :class:`Scenario` is plain data (so a failing one can be printed and replayed);
:meth:`Scenario.random` draws one from a seed. Topology is an input of its own: every node has a
zone and a host (several nodes can share a host, as ``memkv serve --workers N`` does), so
placement rules can be checked against it.

Faults (``Fault.kind``), at ``at`` seconds after the cluster first converged:

- ``join``: a new node starts (the next spare);
- ``leave``: a node stops cleanly (its lease is revoked);
- ``drain``: ``memkv drain`` of a node, which is stopped once it holds no slot;
- ``crash``: kill -9 of a node; ``restart_after`` seconds later it starts again (None: never);
- ``leader_crash``: kill -9 of whoever leads the rebalancer, as soon as a migration is in progress
  (at most ``duration`` seconds later: then whoever leads); restarts like ``crash``;
- ``etcd_down`` / ``etcd_slow``: etcd refuses every call / answers up to ``magnitude`` seconds
  late, for ``duration`` seconds;
- ``rpc_jitter``: node calls get up to ``magnitude`` seconds of extra delay each (so they
  arrive out of order), for ``duration`` seconds;
- ``copy_fail``: a node refuses every copy sent to it, for ``duration`` seconds.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

from memkv.cluster.rebalancer import ORPHAN_GRACE_S, ROUND_S


@dataclass
class NodeSpec:
    id: str
    zone: str
    host: str


@dataclass
class Fault:
    at: float
    kind: str
    duration: float = 0.0
    magnitude: float = 0.0
    restart_after: float | None = None

    def ends(self) -> float:
        """When the fault is over (a leader crash happens at the latest ``duration`` after ``at``:
        its restart, if any, follows that)."""
        slack = 0.1 if self.kind == "leader_crash" else 0.0
        return self.at + self.duration + slack + (self.restart_after or 0.0)


@dataclass
class Scenario:
    seed: int
    slots: int = 64
    replicas: int = 2
    lease_ttl: int = 2
    nodes: list[NodeSpec] = field(default_factory=list)  # started at the beginning
    spares: list[NodeSpec] = field(default_factory=list)  # started by joins
    standalone: int = 0  # rebalancer candidates of their own (0: one in every node)
    durable: bool = True
    keys: int = 200
    write_rate: float = 10.0  # client writes per simulated second
    value_size: int = 256 << 10
    mbps: float = 4.0  # the rebalancer's copy throttle
    round_s: float = ROUND_S  # the rebalancer's round size, in seconds of copying at the throttle
    faults: list[Fault] = field(default_factory=list)
    # (scale runs) start from the converged map of ``nodes``, every owner holding ``slot_bytes`` of each
    # of its slots in ``values_per_slot`` values, instead of forming the cluster node by node
    preformed: bool = False
    slot_bytes: int = 0
    values_per_slot: int = 4
    # every ``delete_every``-th client write is a versioned delete (a tombstone: copies, hand-offs and
    # the invariants treat it as the key's newest state); 0: no deletes
    delete_every: int = 0
    # the client's namespace is write-once (KV blocks): a read trusts the first replica that answers
    # with a value, so a delete is acknowledged only when every owner stored it (nodes' replies lack
    # "ow"); else overwritable (reads compare the replicas' versions)
    write_once: bool = False
    reads: float = 0.0  # client reads per simulated second (the *resurrected* invariant); 0: none
    # the namespace's ``acks`` (memkv/config.py): "all" -- a write is acknowledged only once every
    # owner with a live lease stored it (relayed to those the client missed) -- or "one"; "" is the
    # default of the namespace's durability: "all" for durable nodes, "one" for volatile ones
    acks: str = ""

    @property
    def acks_all(self) -> bool:
        return (self.acks or ("all" if self.durable else "one")) == "all"

    def heal_at(self) -> float:
        return max((f.ends() for f in self.faults), default=0.0)

    def converge_bound(self) -> float:
        """Seconds after the faults heal within which the map must have converged: detecting a loss
        (a lease TTL) and a new leader (another TTL and its campaign), the longest back-off after
        failed rounds (30 s), the grace a slot whose owners are all gone waits for one of them
        (``ORPHAN_GRACE_S``: a crash that never restarts), and copying every value once at the
        throttle, twice over (a round can be cut short and copied again), plus 10 s of flips, waits
        and settling."""
        data = self.keys * self.value_size * self.replicas + self.slots * self.slot_bytes * self.replicas
        return 2 * self.lease_ttl + 1.0 + 30.0 + ORPHAN_GRACE_S + 2 * data / (self.mbps * 1e6) + 10.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        d = json.loads(text)
        d["nodes"] = [NodeSpec(**n) for n in d["nodes"]]
        d["spares"] = [NodeSpec(**n) for n in d["spares"]]
        d["faults"] = [Fault(**f) for f in d["faults"]]
        return cls(**d)

    @classmethod
    def random(cls, seed: int) -> Scenario:
        rng = random.Random(f"scenario-{seed}")
        zones = rng.choice([1, 2, 3])
        hosts_per_zone = rng.choice([1, 2])
        n0 = rng.randint(2, 5)
        specs = [NodeSpec(f"n{i + 1}", f"z{i % zones}", f"h{i % (zones * hosts_per_zone)}") for i in range(n0 + 4)]
        sc = cls(seed, slots=rng.choice([32, 64]), replicas=rng.choice([1, 2, 2, 3]), lease_ttl=rng.choice([2, 3]),
                 nodes=specs[:n0], spares=specs[n0:], standalone=rng.choice([0, 0, 0, 1, 2]),
                 durable=rng.random() < 0.6, keys=rng.choice([100, 200, 300]), write_rate=rng.choice([3.0, 6.0, 12.0]),
                 value_size=rng.choice([16 << 10, 64 << 10]), mbps=rng.choice([2.0, 8.0, 32.0]),
                 round_s=rng.choice([0.5, 2.0, ROUND_S]))
        # (drawn apart, so that the schedules drawn before deletes existed are unchanged)
        sc.delete_every = random.Random(f"deletes-{seed}").choice([0, 0, 3, 7])
        if sc.delete_every:
            more = random.Random(f"reads-{seed}")
            sc.write_once = more.random() < 0.5
            sc.reads = more.choice([5.0, 20.0])
        t = 0.0
        kinds = ["join", "leave", "drain", "crash", "crash", "leader_crash", "etcd_down", "etcd_slow", "rpc_jitter",
                 "copy_fail"]
        for _ in range(rng.randint(1, 5)):
            t += rng.uniform(0.0, 4.0)
            kind = rng.choice(kinds)
            f = Fault(round(t, 3), kind)
            if kind in ("crash", "leader_crash"):
                f.restart_after = rng.choice([None, round(rng.uniform(0.3, 8.0), 3)])
                f.duration = 5.0 if kind == "leader_crash" else 0.0
            elif kind in ("etcd_down", "etcd_slow", "rpc_jitter", "copy_fail"):
                f.duration = round(rng.uniform(0.5, 8.0), 3)
                f.magnitude = round(rng.uniform(0.05, 3.0), 3)
            sc.faults.append(f)
        return sc
