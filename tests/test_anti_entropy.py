"""Anti-entropy (cluster/anti_entropy.py): a replica that missed writes and deletes converges
without any reads.

Real etcd, real node processes. Writes, overwrites and deletes go to one replica of each key
only (a client talking to that node directly, as if the other replica had been unreachable);
no cluster read follows. The other replica must reach the same state -- new values, the newer
version of each overwritten value, the deletes -- by the nodes' background walk alone.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot
from memkv.client.core.calls import SimpleCall
from memkv.protocol.opcodes import Op

pytestmark = pytest.mark.timeout(240)

N = 120  # keys of each kind: new, overwritten, deleted


def states(node: Any, keys: list[bytes]) -> list[tuple[int, int]]:
    """(value version, tombstone version) per key on one node, without reading (or repairing) values."""
    with SyncClient.connect(node.url, transport="tcp", timeout=10.0) as d:
        r = d.pool.call(d.router.node, SimpleCall(Op.EXISTS_MANY, {"ks": keys, "ns": "session", "v": True}))
    return list(zip(r["vers"], r.get("dvs") or [0] * len(keys), strict=True))


def test_a_replica_that_missed_writes_and_deletes_converges_without_reads(start_cluster: Any) -> None:
    cl = start_cluster(3, replicas=2, cluster_opts="anti_entropy_interval = 0.5\n")
    sm = cl.state().slotmap
    old = [f"old-{i}".encode() for i in range(2 * N)]
    new = [f"new-{i}".encode() for i in range(N)]
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        c.put_many({k: b"first " + k for k in old}, namespace="session")  # on both replicas
    first = {k: tuple(sm.table[key_slot(k, sm.slots)]) for k in old + new}
    overwritten, deleted = old[:N], old[N:]
    by_node: dict[str, list[bytes]] = {}
    for k, row in first.items():
        by_node.setdefault(row[0], []).append(k)
    t0 = time.monotonic()
    for node_id, keys in by_node.items():  # to the first replica only
        with SyncClient.connect(cl.nodes[node_id].url, transport="tcp", timeout=5.0) as d:
            for k in keys:
                if k in new or k in overwritten:
                    d.put(k, b"second " + k, namespace="session")
                else:
                    assert d.delete(k, namespace="session")
    want = {node_id: states(cl.nodes[node_id], keys) for node_id, keys in by_node.items()}
    behind = {}
    for node_id, keys in by_node.items():
        for k, st in zip(keys, want[node_id], strict=True):
            behind.setdefault(first[k][1], {})[k] = st
    # the second replicas do not have them yet (unless a walk already ran: it is fast)
    deadline = time.monotonic() + 120.0
    while True:
        wrong = 0
        for node_id, expect in behind.items():
            keys = list(expect)
            for k, (v, dv) in zip(keys, states(cl.nodes[node_id], keys), strict=True):
                ev, edv = expect[k]
                if v != ev or (edv and (v or dv != edv)):
                    wrong += 1
        if not wrong:
            break
        assert time.monotonic() < deadline, f"{wrong} keys still differ after 120 s"
        time.sleep(0.2)
    took = time.monotonic() - t0
    pushed = {"values": 0, "tombstones": 0}
    for proc in cl.nodes.values():
        with SyncClient.connect(proc.url, transport="tcp", timeout=5.0) as d:
            ae = d.stats()["cluster"]["anti_entropy"]
        pushed["values"] += ae["values_pushed"]
        pushed["tombstones"] += ae["tombstones_pushed"]
    assert pushed["values"] >= 2 * N and pushed["tombstones"] >= N, pushed
    print(f"converged in {took:.2f} s: {pushed}")
    assert all(v == 0 for k in deleted for v, _ in states(cl.nodes[first[k][1]], [k]))


def test_what_a_walk_pushes() -> None:
    """A newer value goes over an older value or tombstone; a tombstone only over an older value
    (where the peer holds nothing, or an older tombstone, there is nothing to undo)."""
    from memkv.cluster.anti_entropy import to_push

    def ik(k: str) -> tuple[str, str, bytes]:
        return ("session", "", k.encode())

    mine = {ik("newer-value"): (5, False), ik("over-tomb"): (9, False), ik("tomb-over-value"): (7, True),
            ik("tomb-over-nothing"): (7, True), ik("tomb-over-tomb"): (8, True), ik("older"): (3, False)}
    theirs = {ik("newer-value"): (4, False), ik("over-tomb"): (6, True), ik("tomb-over-value"): (6, False),
              ik("tomb-over-tomb"): (2, True), ik("older"): (5, False)}
    assert sorted(to_push(mine, theirs)) == sorted([ik("newer-value"), ik("over-tomb"), ik("tomb-over-value")])
