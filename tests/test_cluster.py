"""Cluster tests with a real etcd and real node processes (tests/conftest_etcd.py).

No wall-clock speed asserts: every wait is a generous poll with a deadline.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import poll

from memkv.client import Client, SyncClient
from memkv.client.cluster_map import key_slot, node_key
from memkv.client.etcd import Etcd
from memkv.errors import Fenced, Moved

pytestmark = pytest.mark.timeout(240)


def direct(node: Any) -> SyncClient:
    """A client talking to one node without routing (no epoch in requests)."""
    return SyncClient.connect(node.url, transport="tcp", timeout=5.0)


def test_registration_map_and_revoke(start_cluster: Any) -> None:
    cl = start_cluster(1, replicas=1, lease_ttl=30)
    st = cl.state()
    assert set(st.nodes) == {"n1"}
    assert st.nodes["n1"].addr == cl.nodes["n1"].address
    sm = st.slotmap
    assert sm is not None and sm.epoch >= 1 and sm.slots == 4096 and sm.replicas == 1
    assert all(row == ("n1",) for row in sm.table)
    assert st.leader == "n1"
    etcd = Etcd(cl.etcd.endpoint)
    try:
        kv, _ = etcd.get(node_key(cl.name, "n1"))
        assert kv is not None
        # a clean shutdown revokes the lease: the key goes long before its 30 s TTL
        cl.nodes["n1"].stop()
        poll(lambda: etcd.get(node_key(cl.name, "n1"))[0] is None, 15, "node key removed on shutdown")
    finally:
        etcd.close()


def test_lease_expiry_after_kill_and_map_recomputed(start_cluster: Any) -> None:
    cl = start_cluster(3, replicas=2, lease_ttl=2)
    epoch = cl.state().slotmap.epoch
    cl.nodes["n3"].kill()
    st = cl.wait_members({"n1", "n2"})
    assert st.slotmap.epoch > epoch
    assert all(len(row) == 2 and "n3" not in row for row in st.slotmap.table)


def test_routing_every_key_on_its_replicas(start_cluster: Any) -> None:
    cl = start_cluster(3, replicas=2)
    keys = [f"route-{i}".encode() for i in range(300)]
    with SyncClient.connect(cl.url, transport="tcp") as c:
        c.put_many({k: k * 3 for k in keys[:150]})
        for k in keys[150:]:
            c.put(k, k * 3)
        assert c.get_many(keys) == [k * 3 for k in keys]
    sm = cl.state().slotmap
    for node_id, proc in cl.nodes.items():
        with direct(proc) as d:
            present = d.exists_many(keys)
        for k, there in zip(keys, present, strict=True):
            assert there == (node_id in sm.table[key_slot(k, sm.slots)]), (node_id, k)


def test_kill_one_node_loses_no_acknowledged_key(start_cluster: Any) -> None:
    cl = start_cluster(3, replicas=2, lease_ttl=2)
    keys = [f"durable-{i}".encode() for i in range(200)]
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        c.put_many({k: b"v" + k for k in keys})
        cl.nodes["n2"].kill()  # kill -9
        # at once (map still names n2): reads fail over to the other replica
        assert c.get_many(keys) == [b"v" + k for k in keys]
        assert all(c.get(k) == b"v" + k for k in keys[:50])
        # writes keep succeeding on the live replicas
        c.put(b"after-kill", b"x")
        # after the lease expired and the map was recomputed: still everything
        cl.wait_members({"n1", "n3"})
        poll(lambda: c.router.state.slotmap is not None and "n2" not in c.router.state.slotmap.members, 30,
             "client sees the new map")
        assert c.get_many(keys) == [b"v" + k for k in keys]
        assert c.get(b"after-kill") == b"x"


def test_moved_after_map_change(start_cluster: Any) -> None:
    cl = start_cluster(2, replicas=1)
    with SyncClient.connect(cl.url, transport="tcp") as c:
        c.put(b"before", b"1")
        old_epoch = c.router.epoch
        c.router.view.stop()  # freeze the client's map: it learns the change only from MOVED
        cl.add_node("n3")
        st = cl.wait_members({"n1", "n2", "n3"})
        assert st.slotmap.epoch > old_epoch
        for i in range(100):  # writes carry the old epoch -> MOVED -> refresh -> retry
            c.put(f"after-{i}", b"2")
        assert c.router.epoch == st.slotmap.epoch
        for i in range(100):
            assert c.get(f"after-{i}") == b"2"


def test_node_refuses_slots_it_does_not_own(start_cluster: Any) -> None:
    cl = start_cluster(2, replicas=1)
    sm = cl.state().slotmap
    key = next(f"k{i}".encode() for i in range(10_000) if sm.owners(f"k{i}".encode()) == ("n2",))

    n1 = cl.nodes["n1"]
    with direct(n1) as d:
        d.router.epoch = sm.epoch  # requests claim the current map, as a cluster client's would
        with pytest.raises(Moved) as err:
            d.get(key)
        assert err.value.epoch == sm.epoch
        with pytest.raises(Moved):
            d.put(key, b"nope")


def test_fenced_when_etcd_is_gone(start_cluster: Any) -> None:
    cl = start_cluster(1, replicas=1, lease_ttl=2)
    node = cl.nodes["n1"]
    with direct(node) as d:
        d.put(b"k", b"v")
        cl.etcd.stop()

        def fenced() -> bool:
            try:
                d.put(b"k2", b"v")
            except Fenced:
                return True
            return False

        poll(fenced, 30, "node refuses writes once its lease could not be renewed")
        assert d.get(b"k") == b"v"  # reads go on
        assert d.stats()["cluster"]["fenced"] is True
        cl.etcd.start()

        def accepts() -> bool:
            try:
                d.put(b"k3", b"v")
                return True
            except Fenced:
                return False

        poll(accepts, 60, "node accepts writes again after etcd came back")


def test_etcd_restart_clients_keep_serving_and_resync(start_cluster: Any) -> None:
    cl = start_cluster(2, replicas=2, lease_ttl=10)
    with SyncClient.connect(cl.url, transport="tcp") as c:
        c.put(b"a", b"1")
        cl.etcd.stop()
        # cached map: reads and writes go on while etcd is down (leases outlive the outage)
        assert c.get(b"a") == b"1"
        c.put(b"b", b"2")
        cl.etcd.start()
        cl.add_node("n3")
        st = cl.wait_members({"n1", "n2", "n3"})
        # the client's watch came back by itself: it sees the new map without any MOVED
        poll(lambda: c.router.epoch == st.slotmap.epoch and "n3" in c.router.state.nodes, 60,
             "client watch resynced after the etcd restart")
        assert c.get(b"a") == b"1" and c.get(b"b") == b"2"


async def test_async_client_routes_and_fails_over(start_cluster: Any) -> None:
    cl = await trio.to_thread.run_sync(lambda: start_cluster(3, replicas=2, lease_ttl=2))
    keys = [f"async-{i}".encode() for i in range(120)]
    async with Client.connect(cl.url, transport="tcp", timeout=5.0) as c:
        await c.put_many({k: k for k in keys})
        for k in keys[:20]:
            await c.put(k + b"-single", k)
        assert await c.get_many(keys) == keys
        st = await c.stats()
        assert len(st["nodes"]) == 3
        await trio.to_thread.run_sync(cl.nodes["n1"].kill)
        assert await c.get_many(keys) == keys
        assert [await c.get(k + b"-single") for k in keys[:20]] == keys[:20]
        assert await c.exists_many(keys[:10]) == [True] * 10


def test_status_and_up_parsers(start_cluster: Any, capsys: Any) -> None:
    from memkv.cli import main

    cl = start_cluster(2, replicas=2)
    assert main(["status", cl.url, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["epoch"] >= 1 and {n["node_id"] for n in data["nodes"]} == {"n1", "n2"}
    assert all(n["health"] == "up" for n in data["nodes"])
    assert sum(n["slots_primary"] for n in data["nodes"]) == 4096
    assert main(["status", cl.url]) == 0


def test_default_transport_in_cluster_mode(start_cluster: Any) -> None:
    cl = start_cluster(2, replicas=2)
    with SyncClient.connect(cl.url) as c:  # transport="auto"
        c.put_many({f"auto-{i}": b"z" * 100 for i in range(50)})
        assert c.get_many([f"auto-{i}" for i in range(50)]) == [b"z" * 100] * 50
        assert c.get("auto-1") == b"z" * 100
        assert c.lookup_prefix([f"auto-{i}" for i in range(10)]) == 10


def test_read_fallback_and_repair_of_a_write_that_skipped_a_replica(start_cluster: Any) -> None:
    """Chaos client_partition / etcd_outage: a write acknowledged while one replica was skipped
    is not on that replica; if it is (again) the slot's first replica it used to answer a
    miss forever. Reads now ask the other replicas before answering a miss and store what
    they find back on the replica that missed (store-if-absent)."""
    cl = start_cluster(3, replicas=2)
    sm = cl.state().slotmap
    keys = [f"skipped-{i}".encode() for i in range(40)]
    by_primary: dict[str, list[bytes]] = {}
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        # what a write that skipped the primary leaves behind: the value on the other replica only
        for k in keys:
            row = sm.table[key_slot(k, sm.slots)]
            by_primary.setdefault(row[0], []).append(k)
            with direct(cl.nodes[row[1]]) as d:
                d.put(k, b"v" + k)
        assert c.get(keys[0]) == b"v" + keys[0]                       # single get
        assert c.get_many(keys) == [b"v" + k for k in keys]          # batched
        bufs = [bytearray(64) for _ in keys]
        assert c.get_many_into(keys, bufs) == [len(k) + 1 for k in keys]
        assert [bytes(b[:len(k) + 1]) for b, k in zip(bufs, keys, strict=True)] == [b"v" + k for k in keys]
        assert c.get(b"never-written") is None and c.get_many([b"never-written"]) == [None]
    # repaired: every primary has its keys now
    for node_id, ks in by_primary.items():
        with direct(cl.nodes[node_id]) as d:
            assert d.get_many(ks) == [b"v" + k for k in ks], node_id


def test_reads_of_an_overwritable_namespace_return_the_newest_replica(start_cluster: Any) -> None:
    """Chaos kill9 / etcd_outage / rolling_restart (compose): an overwrite acknowledged while one
    replica was down or fenced is not on that replica, which still holds the previous value and
    may be the slot's first replica; it used to answer that older value forever. Reads of an
    overwritable namespace now compare the replicas' versions, return the newest and repair it
    onto the replica that is behind; an older write arriving late never replaces it."""
    cl = start_cluster(3, replicas=2)
    sm = cl.state().slotmap
    keys = [f"ow-{i}".encode() for i in range(40)]
    by_primary: dict[str, list[bytes]] = {}
    with SyncClient.connect(cl.url, transport="tcp", timeout=5.0) as c:
        c.put_many({k: b"old " + k for k in keys}, namespace="session")  # both replicas
        # what an overwrite that skipped the primary leaves behind: the new value on the other replica only
        for k in keys:
            row = sm.table[key_slot(k, sm.slots)]
            by_primary.setdefault(row[0], []).append(k)
            with direct(cl.nodes[row[1]]) as d:
                d.put(k, b"new " + k, namespace="session")
        with direct(cl.nodes[sm.table[key_slot(keys[0], sm.slots)][0]]) as d:
            assert d.get(keys[0], namespace="session") == b"old " + keys[0]  # the primary is behind
        assert c.get(keys[0], namespace="session") == b"new " + keys[0]            # single get
        assert c.get_many(keys, namespace="session") == [b"new " + k for k in keys]  # batched
        bufs = [bytearray(64) for _ in keys]
        assert c.get_many_into(keys, bufs, namespace="session") == [len(k) + 4 for k in keys]
        assert [bytes(b[:len(k) + 4]) for b, k in zip(bufs, keys, strict=True)] == [b"new " + k for k in keys]
    # repaired: every primary holds the newest value now
    for node_id, ks in by_primary.items():
        with direct(cl.nodes[node_id]) as d:
            assert d.get_many(ks, namespace="session") == [b"new " + k for k in ks], node_id
    # one-sided reads (transport auto) of an overwritable namespace take the same path
    with SyncClient.connect(cl.url, timeout=5.0) as c:
        k = keys[1]
        row = sm.table[key_slot(k, sm.slots)]
        with direct(cl.nodes[row[1]]) as d:
            d.put(k, b"newer " + k, namespace="session")
        assert c.get(k, namespace="session") == b"newer " + k
        assert c.get_many([k], namespace="session") == [b"newer " + k]
        # ... and a one-sided miss on a replica that missed a write falls back to the other replica
        only = [f"os-{i}".encode() for i in range(10)]
        for k in only:
            with direct(cl.nodes[sm.table[key_slot(k, sm.slots)][1]]) as d:
                d.put(k, b"v" + k)
        assert c.get(only[0]) == b"v" + only[0]
        assert c.get_many(only) == [b"v" + k for k in only]
