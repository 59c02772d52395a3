"""``acks = "all"`` (memkv/config.py, client/core/dispatch.py, memkv/cluster/relay.py): a write is
acknowledged only once every owner of its slot that holds a live etcd lease stores it; an owner the
client could not reach gets it relayed by one that did; otherwise ``NotEnoughReplicas``.

Real etcd, real node processes. (The relay through the client's own write path, with the clients
cut from one owner and the node-to-node links intact, is the chaos scenario ``lost_single_copy``.)
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from memkv.client import SyncClient
from memkv.client.cluster_map import slotmap_key
from memkv.client.core.calls import RelayCall, SimpleCall
from memkv.client.core.dispatch import replicated_outcome
from memkv.client.etcd import Etcd
from memkv.cluster.slotmap import compute_slot_map
from memkv.config import NamespacePolicy
from memkv.errors import InvalidArgument, KeyExists, Moved, NodeUnavailable, NotEnoughReplicas, TimeoutError
from memkv.protocol.opcodes import Op

pytestmark = pytest.mark.timeout(180)

NAMESPACES = """
[namespaces.blocks]
durability = "durable"
replicas = 2

[namespaces.cache]
replicas = 2
"""


def states(node: Any, keys: list[bytes], ns: str = "blocks") -> list[tuple[int, int]]:
    """(value version, tombstone version) of each key on one node (0: none), without reading or
    repairing values."""
    with SyncClient.connect(node.url, transport="tcp", timeout=10.0) as d:
        r = d.pool.call(d.router.node, SimpleCall(Op.EXISTS_MANY, {"ks": keys, "ns": ns, "v": True}))
    return list(zip(r["vers"], r.get("dvs") or [0] * len(keys), strict=True))


def versions(node: Any, keys: list[bytes]) -> list[int]:
    """The version of what one node holds of each key: its value's or its tombstone's (0: neither)."""
    return [v or dv for v, dv in states(node, keys)]


def relay(node: Any, keys: list[bytes], vers: list[int], to: list[str]) -> Any:
    with SyncClient.connect(node.url, transport="tcp", timeout=10.0) as d:
        return d.pool.call(d.router.node, RelayCall("blocks", keys, vers, to))


def test_acks_default_by_durability() -> None:
    assert NamespacePolicy("a", durability="durable").acks == "all"
    assert NamespacePolicy("b").acks == "one"
    assert NamespacePolicy("c", durability="durable", acks="one").acks == "one"
    with pytest.raises(InvalidArgument):
        NamespacePolicy("d", acks="quorum")


def test_outcome_needs_every_owner() -> None:
    gone = NotEnoughReplicas("relay failed")
    assert replicated_outcome([1, TimeoutError("t")]) == 1  # acks "one": the missed owner is skipped
    with pytest.raises(NotEnoughReplicas):  # a registered owner that not even a relay reached
        replicated_outcome([1, gone])
    with pytest.raises(KeyExists):  # the caller's error wins over a missed owner
        replicated_outcome([KeyExists("k"), gone])
    with pytest.raises(Moved):
        replicated_outcome([Moved("m", 3), gone])
    # an owner that is not registered (its lease lapsed; the map still names it) is skipped by an acks
    # "one" write, and fails an acks "all" write (the replies said "all": ``every_owner``)
    absent = NodeUnavailable("an owner of this key's slot is not registered")
    assert replicated_outcome([1, absent]) == 1
    with pytest.raises(NotEnoughReplicas, match="not registered"):
        replicated_outcome([1, absent], every_owner=True)
    assert replicated_outcome([1, 1], pending=1, every_owner=True) == 1


def test_relay_hands_writes_to_an_owner_that_missed_them(start_cluster: Any) -> None:
    cl = start_cluster(2, replicas=2, cluster_opts="anti_entropy_interval = 0\n" + NAMESPACES)
    n1, n2 = cl.nodes["n1"], cl.nodes["n2"]
    keys = [f"relay-{i}".encode() for i in range(20)]
    with SyncClient.connect(n1.url, transport="tcp", timeout=10.0) as d:  # n1 only, as if n2 was unreachable
        for k in keys:
            d.put(k, b"value of " + k, namespace="blocks")
        d.delete(keys[0], namespace="blocks")
    held = versions(n1, keys)
    assert states(n1, keys[:1])[0][1] > 0 and versions(n2, keys) == [0] * len(keys)
    with pytest.raises(NotEnoughReplicas):  # n1 holds no value that new: nothing is relayed
        relay(n1, keys[1:2], [held[1] + 1], [n2.address])
    with pytest.raises(Moved):  # only to a registered owner of the keys' slots, never to any address
        relay(n1, keys[1:2], [held[1]], ["127.0.0.1:1"])
    assert relay(n1, keys, held, [n2.address]) == len(keys)  # 19 values and keys[0]'s tombstone
    assert states(n2, keys) == states(n1, keys)
    with SyncClient.connect(n2.url, transport="tcp", timeout=10.0) as d:
        assert d.get(keys[5], namespace="blocks") == b"value of " + keys[5]
    with SyncClient.connect(n1.url, transport="tcp", timeout=10.0) as d:
        stats = d.stats()["cluster"]["relay"]
    assert stats["relays"] == 1 and stats["values_relayed"] == len(keys) and stats["failures"] == 1, stats


def test_a_write_is_not_acknowledged_without_a_live_owner(start_cluster: Any) -> None:
    # a long lease: the paused owner stays registered for the whole test
    cl = start_cluster(2, replicas=2, lease_ttl=30, cluster_opts=NAMESPACES)
    with SyncClient.connect(cl.url, transport="tcp", timeout=1.0) as c:
        c.put(b"both", b"1", namespace="blocks")
        cl.nodes["n2"].pause()  # unreachable from the client and from n1 alike; it keeps its lease
        try:
            with pytest.raises(NotEnoughReplicas) as exc:
                c.put(b"one", b"2", namespace="blocks")
            assert isinstance(exc.value, NodeUnavailable)
            c.put(b"cached", b"3", namespace="cache")  # acks "one": the paused owner is skipped
        finally:
            cl.nodes["n2"].resume()
        c.put(b"one", b"2", namespace="blocks")  # a retry once it answers again
    assert versions(cl.nodes["n2"], [b"both", b"one"]) != [0, 0]
    assert 0 not in versions(cl.nodes["n2"], [b"both", b"one"])


def test_a_write_waits_for_an_owner_whose_lease_lapsed_while_the_map_still_names_it(
        etcd_server: Any, start_node: Any) -> None:
    """An owner whose etcd lease lapsed (paused here) but that the slot map still names -- the
    rebalancer has not replaced it yet -- comes back as an owner when it registers again, without
    the writes of that window. Acknowledged on the other owner alone, such a write had one copy
    while the cluster looked whole again: losing that one node lost it (found by the control-plane
    simulator, docs/control-plane.md). So an acks "all" write fails (``NotEnoughReplicas``) until
    the owner registers again or leaves the map; an acks "one" write skips it.

    No rebalancer runs (``[cluster] rebalancer = false``; the map is published here), so the map
    keeps naming the lapsed owner for as long as the test needs."""
    from conftest_etcd import LocalCluster

    name = f"lapse{uuid.uuid4().hex[:8]}"
    config = f"[cluster]\nreplicas = 2\nlease_ttl = 2\nrebalancer = false\nanti_entropy_interval = 0\n{NAMESPACES}"
    cl = LocalCluster(etcd_server, name, start_node, config)
    n1, n2 = cl.add_node("n1"), cl.add_node("n2")
    st = cl.wait(lambda st: set(st.nodes) == {"n1", "n2"}, 60, "n1 and n2 registered")
    etcd = Etcd(etcd_server.endpoint, timeout=5.0)
    try:
        etcd.put(slotmap_key(name), compute_slot_map({n: i.zone for n, i in st.nodes.items()}, slots=64,
                                                     replicas=2).encode())
    finally:
        etcd.close()
    cl.wait_members({"n1", "n2"})
    with SyncClient.connect(cl.url, transport="tcp", timeout=1.0) as c:
        c.put(b"before", b"1", namespace="blocks")
        n2.pause()  # its lease lapses; the map still names it
        try:
            cl.wait(lambda st: "n2" not in st.nodes and "n2" in st.slotmap.members, 30, "n2's lease expired")
            deadline = time.monotonic() + 10  # the client's view sees it too (its watch)
            while "n2" in c.router.state.nodes and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(NotEnoughReplicas, match="not registered"):
                c.put(b"lapsed", b"2", namespace="blocks")
            c.put(b"cached", b"3", namespace="cache")  # acks "one": the lapsed owner is skipped
        finally:
            n2.resume()
        cl.wait(lambda st: "n2" in st.nodes, 30, "n2 registered again")
        deadline = time.monotonic() + 10
        while True:  # once the client's view has it registered again, the write goes to both
            try:
                c.put(b"lapsed", b"2", namespace="blocks")
                break
            except NotEnoughReplicas:
                assert time.monotonic() < deadline, "the write still fails after the owner came back"
                time.sleep(0.1)
        assert 0 not in versions(n2, [b"before", b"lapsed"])
        n1.kill()  # one node lost with its disk: every acknowledged durable write is still there
        assert c.get(b"before", namespace="blocks") == b"1"
        assert c.get(b"lapsed", namespace="blocks") == b"2"
