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


def no_replica_holds(cl: Any, keys: list[bytes], namespace: str) -> None:
    """Once the paused node is back in the map with nothing pending: no replica holds any of ``keys``."""
    st = cl.wait(lambda s: not s.slotmap.pending and set(s.slotmap.members) == {"n1", "n2", "n3"}, 90.0,
                 "the paused node back in the map")
    for node_id, proc in cl.nodes.items():
        mine = [k for k in keys if node_id in st.slotmap.table[key_slot(k, st.slotmap.slots)]]
        with direct(proc) as d:
            left = [k for k, v in zip(mine, d.get_many(mine, namespace=namespace), strict=True) if v is not None]
        assert not left, f"{node_id} still holds {len(left)} deleted keys"


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
    no_replica_holds(cl, keys, "session")


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


def _resp_cluster(etcd_server: Any, start_node: Any, config: str) -> tuple[Any, dict[str, int]]:
    """Three nodes, each with a RESP port; R = 2."""
    import uuid

    from conftest import free_port
    from conftest_etcd import LocalCluster

    ports: dict[str, int] = {}

    def start_with_resp(*args: str, config: str | None = None) -> Any:
        port = free_port()
        ports[args[args.index("--node-id") + 1]] = port
        return start_node(*args, "--resp-port", str(port), config=config)

    cl = LocalCluster(etcd_server, f"rd{uuid.uuid4().hex[:8]}", start_with_resp, config)
    for i in (1, 2, 3):
        cl.add_node(f"n{i}")
    cl.wait_members({"n1", "n2", "n3"})
    return cl, ports


def test_resp_deletes_acknowledged_while_a_replica_was_paused_stay_deleted(etcd_server: Any,
                                                                            start_node: Any) -> None:
    """A RESP DEL is the same versioned delete as the native client's: the node forwards it (R = 2)
    through its cluster client, which stamps each key's delete with a version. One replica is
    paused while a DEL of every key is acknowledged (its keys concurrently, so the hung replica
    costs one client timeout, past the 2-s lease: at SIGCONT the fenced node refuses the deletes
    queued in its sockets and keeps its stale copies); after it resumes neither the native client
    nor RESP on any node returns a deleted value, and once the cluster has settled no replica
    holds one."""
    import redis

    cl, ports = _resp_cluster(etcd_server, start_node, "[cluster]\nreplicas = 2\nlease_ttl = 2\n")
    sm = cl.state().slotmap
    victim = "n2"
    keys = [f"rsess-{i}".encode() for i in range(120)]
    held = [k for k in keys if victim in sm.table[key_slot(k, sm.slots)]]
    assert len(held) >= 10, "the paused node must hold some of the keys"
    conns = {n: redis.Redis(host="127.0.0.1", port=p, db=1, socket_timeout=30) for n, p in ports.items()}
    entry = conns["n1"]
    assert entry.mset({k: b"v" + k for k in keys}) is True
    with direct(cl.nodes[victim]) as d:
        assert all(v is not None for v in d.get_many(held, namespace="session"))
    cl.nodes[victim].pause()
    try:
        t0 = time.monotonic()
        deleted = entry.delete(*keys)  # every delete acknowledged (the paused replica is skipped)
        took = time.monotonic() - t0
    finally:
        cl.nodes[victim].resume()
    assert deleted == len(keys)
    with direct(cl.nodes[victim]) as d:  # what the resumed replica still holds of the deleted keys
        stale = sum(v is not None for v in d.get_many(held, namespace="session"))
    back: dict[str, set[bytes]] = {}
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for k, v in zip(keys, c.get_many(keys, namespace="session"), strict=True):
                if v is not None:
                    back.setdefault("client", set()).add(k)
            for n, r in conns.items():
                for k, v in zip(keys, r.mget(keys), strict=True):
                    if v is not None:
                        back.setdefault(f"RESP {n}", set()).add(k)
    assert not back, (f"deleted keys came back: {({who: len(ks) for who, ks in back.items()})} (the DEL took "
                      f"{took:.1f} s; the paused replica held {stale} of its {len(held)} keys at SIGCONT)")
    no_replica_holds(cl, keys, "session")
    for r in conns.values():
        r.close()


def test_write_once_key_deleted_and_written_again_converges_on_the_replica_that_missed_it(
        start_cluster: Any) -> None:
    """A write-once namespace (``shared``): a replica that missed a key's delete and the new,
    different bytes written after it (here: both sent to the first replica only, as if the
    second had been unreachable) still holds the old bytes. Anti-entropy sends it the newer
    version; the store takes it (a replica's state carries ``copies``: the newer version wins
    even in a write-once namespace), where it used to answer ``KeyExists`` on every walk, so the
    replicas never converged. A client's own write of other bytes is still refused."""
    from memkv.errors import KeyExists

    cl = start_cluster(3, replicas=2, cluster_opts="anti_entropy_interval = 0.5\n")
    sm = cl.state().slotmap
    keys = [f"blk-{i}".encode() for i in range(80)]
    rewritten = keys[:40]  # the others are only deleted
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        c.put_many({k: b"first " + k for k in keys}, namespace="shared")  # on both replicas
    rows = {k: tuple(sm.table[key_slot(k, sm.slots)]) for k in keys}
    for k in keys:  # to the first replica only
        with direct(cl.nodes[rows[k][0]]) as d:
            assert d.delete(k, namespace="shared")
            if k in rewritten:
                d.put(k, b"second " + k, namespace="shared")
    want = {k: (b"second " + k if k in rewritten else None) for k in keys}
    deadline = time.monotonic() + 60.0
    while True:
        wrong = []
        for k in keys:
            with direct(cl.nodes[rows[k][1]]) as d:
                if d.get(k, namespace="shared") != want[k]:
                    wrong.append(k)
        if not wrong:
            break
        assert time.monotonic() < deadline, (
            f"{len(wrong)} keys still differ on their second replica after 60 s "
            f"({sum(k in rewritten for k in wrong)} of them deleted and written again)")
        time.sleep(0.5)
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        assert c.get_many(keys, namespace="shared") == [want[k] for k in keys]
        with pytest.raises(KeyExists):
            c.put(rewritten[0], b"third", namespace="shared")  # write-once for clients, as before


def test_store_copies_of_a_newer_version_replace_a_write_once_value(tmp_path: Any) -> None:
    """``Store`` level: in a write-once namespace a copy (``copy=True``: slot copy, read repair,
    anti-entropy) newer than the value held replaces it; an older copy is dropped; a client
    write of other bytes is ``KeyExists`` whatever its version."""
    from memkv.engine.checksum import checksum
    from memkv.engine.store import Store
    from memkv.errors import KeyExists

    st = Store(memory=1 << 20, shm_dir=str(tmp_path), name="wo")
    try:
        def write(value: bytes, version: int, copy: bool) -> Any:
            res = st.reserve(b"k", len(value), namespace="shared", checksum=checksum(value), version=version,
                             copy=copy)
            res.view[:] = value
            return st.commit(res)

        write(b"old", 10, False)
        with pytest.raises(KeyExists):
            write(b"new", 20, False)
        assert write(b"older copy", 5, True).version == 10  # superseded: the value held stays
        assert bytes(st.view(st.peek(b"k", namespace="shared"))) == b"old"
        assert write(b"new", 20, True).version == 20
        assert bytes(st.view(st.peek(b"k", namespace="shared"))) == b"new"
    finally:
        st.close()


def test_a_write_once_delete_is_acknowledged_only_by_every_owner(start_cluster: Any) -> None:
    """Reads of a write-once namespace trust the one replica that answers (no version probes), so
    a delete there that skipped an owner (it timed out, was fenced) could later be served back by
    it -- the chaos suite's ``etcd_outage`` and ``slow_fsync`` did, with deletes in the load. Such a
    delete is not acknowledged: the client raises the owner's error. In an overwritable namespace
    (reads compare the replicas' versions and tombstones) the owner is skipped as for a write."""
    from memkv.client.core.dispatch import FAILOVER_ERRORS

    cl = start_cluster(3, replicas=2, lease_ttl=20)
    sm = cl.state().slotmap
    victim = "n2"
    keys = [k for k in (f"wo-{i}".encode() for i in range(200)) if victim in sm.table[key_slot(k, sm.slots)]][:4]
    with SyncClient.connect(cl.url, transport="tcp", timeout=1.0) as c:
        c.put_many({k: b"v" for k in keys}, namespace="shared")
        c.put_many({k: b"v" for k in keys}, namespace="session")
        cl.nodes[victim].pause()
        try:
            for k in keys[:2]:
                with pytest.raises(FAILOVER_ERRORS):  # (a timeout, however the socket reports it)
                    c.delete(k, namespace="shared")
                assert c.delete(k, namespace="session") is True
        finally:
            cl.nodes[victim].resume()
        for k in keys[2:]:  # every owner answers again: acknowledged
            assert c.delete(k, namespace="shared") is True
