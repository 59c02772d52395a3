"""Versioned deletes in a cluster: an acknowledged delete is never undone.

Real etcd, real node processes, real sockets. The first test is the finding of the
guarantees issue, reproduced as it was found: R = 2, the ``session`` namespace, one node
paused (SIGSTOP) while every key is deleted, resumed, then reads for a while. Before
tombstones, read fallback found the paused replica's copy and repaired it back.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot

pytestmark = pytest.mark.timeout(300)

NKEYS = 300
READ_FOR_S = 15.0


def direct(node: Any) -> SyncClient:
    """A client talking to one node without routing (no epoch in requests)."""
    return SyncClient.connect(node.url, transport="tcp", timeout=5.0)


def test_deletes_acknowledged_while_a_replica_was_paused_stay_deleted(start_cluster: Any) -> None:
    cl = start_cluster(3, replicas=2)
    sm = cl.state().slotmap
    keys = [f"sess-{i}".encode() for i in range(NKEYS)]
    with SyncClient.connect(cl.url, transport="tcp", timeout=1.0) as c:
        c.put_many({k: b"v" + k for k in keys}, namespace="session")
        victim = "n2"
        held = [k for k in keys if victim in sm.table[key_slot(k, sm.slots)]]
        assert held, "the paused node must hold some of the keys"
        cl.nodes[victim].pause()
        try:
            for k in keys:  # every delete acknowledged (the paused replica is skipped)
                c.delete(k, namespace="session")
        finally:
            cl.nodes[victim].resume()
        # the paused node still holds its (deleted) copies: nothing reached it
        with direct(cl.nodes[victim]) as d:
            stale = sum(v is not None for v in d.get_many(held, namespace="session"))
        back: set[bytes] = set()
        deadline = time.monotonic() + READ_FOR_S
        while time.monotonic() < deadline:
            for k, v in zip(keys, c.get_many(keys, namespace="session"), strict=True):
                if v is not None:
                    back.add(k)
            for k in keys[::10]:
                if c.get(k, namespace="session") is not None:
                    back.add(k)
        assert not back, f"{len(back)} of {NKEYS} deleted keys came back (the paused replica held {stale})"
    # and no replica holds them any more once the cluster has settled (reads repaired them, or copies did)
    st = cl.wait(lambda s: not s.slotmap.pending and set(s.slotmap.members) == {"n1", "n2", "n3"}, 90.0,
                 "the paused node back in the map")
    for node_id, proc in cl.nodes.items():
        mine = [k for k in keys if node_id in st.slotmap.table[key_slot(k, st.slotmap.slots)]]
        with direct(proc) as d:
            left = [k for k, v in zip(mine, d.get_many(mine, namespace="session"), strict=True) if v is not None]
        assert not left, f"{node_id} still holds {len(left)} deleted keys"


def test_slot_copies_carry_tombstones(start_node: Any, tmp_path: Any) -> None:
    """A slot copy sends what the source holds of each key -- its value, or its tombstone -- and the
    destination keeps the newer: a destination that held the value from before the delete loses it
    and then refuses that value again (a late copy from a replica that missed the delete)."""
    import types

    from memkv.cluster.migration import MigrationService, copy_item
    from memkv.cluster.migration_job import group
    from memkv.engine.store import Store
    from memkv.protocol.versions import CLOCK

    src = Store(memory=1 << 20, shm_dir=str(tmp_path), name="src")
    dest = start_node()
    member = types.SimpleNamespace(node_id="src", credentials=types.SimpleNamespace(pool_kwargs=dict))
    svc = MigrationService(src, member)
    pool = svc._pool_()
    try:
        with direct(dest) as d:
            d.put(b"gone", b"before the delete", namespace="session")
            d.put(b"kept", b"kept", namespace="session")
            old = d.get_many([b"gone"], namespace="session")[0]
            assert old is not None
        src.put(b"gone", b"before the delete", namespace="session", version=10)
        assert src.delete(b"gone", namespace="session", version=CLOCK.next())  # newer than the node's write
        src.put(b"kept", b"kept, newer", namespace="session", version=CLOCK.next())
        items = [(ik, item) for ik in (("session", "", b"gone"), ("session", "", b"kept"))
                 if (item := copy_item(src, ik)) is not None]
        assert [item.value for _, item in items] == [None, b"kept, newer"]  # a tombstone, and a value
        svc._send(dest.address, group(items))
        with direct(dest) as d:
            assert d.get_many([b"gone", b"kept"], namespace="session") == [None, b"kept, newer"]
        # the value from before the delete, copied again (from a replica that missed it): refused
        svc._send(dest.address, {("session", "", None): ([b"gone"], [b"before the delete"], [10])})
        with direct(dest) as d:
            assert d.get(b"gone", namespace="session") is None
    finally:
        pool.close()
        src.close()
