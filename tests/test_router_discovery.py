"""The router library follows a real memkv cluster: nodes found through etcd, their KV events in the index.

Real etcd, real node processes started with ``[events]``; blocks written with
the header the vLLM connector writes (memkv/protocol/block_header.py), keyed
as any client likes. The index answers "loadable from memkv" for a prompt's
leading blocks while some node holds them; a delete, a node crash, its
restart (empty, on new ports: no stale claim survives it) and a node joining
each show up in it; while slots migrate to the new node, a moved block never
goes missing from the index, and afterwards its old owner's claim is gone.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
from conftest import poll
from conftest_etcd import LocalCluster

from memkv.client import SyncClient
from memkv.client.router import BlockHasher, EventFeeds, PrefixIndex, Replica
from memkv.client.router.discovery import StoreFollower, parse_store
from memkv.protocol.block_header import header_length, pack

BS = 16
MODEL = "m"
EVENTS = '[events]\nendpoint = "tcp://127.0.0.1:0"\nreplay_endpoint = "tcp://127.0.0.1:0"\n'


def block_value(h: int, parent: int | None, index: int, tokens: list[int]) -> bytes:
    """A block as the connector stores it; the router keys blocks by the low 64 bits of vLLM's hash."""
    meta = {"block_hash": h.to_bytes(32, "big"), "parent_hash": None if parent is None else parent.to_bytes(32, "big"),
            "hash_algo": "sha256", "index": index, "tokens": BS, "token_ids": tokens, "model": MODEL, "lora": None}
    return pack(meta, header_length(len(msgpack.packb(meta, use_bin_type=True)))) + b"\x07" * 512


def test_index_follows_a_clusters_nodes_through_etcd(etcd_server: Any, start_node: Any) -> None:
    cluster = LocalCluster(etcd_server, f"d{uuid.uuid4().hex[:8]}", start_node,
                           "[cluster]\nreplicas = 1\nlease_ttl = 2\n" + EVENTS)
    for n in ("n1", "n2"):
        cluster.add_node(n)
    cluster.wait_members({"n1", "n2"})
    tokens = list(range(1000, 1000 + BS * 6))
    chain = BlockHasher().chain(tokens, BS)
    keys = [f"blk-{i}".encode() for i in range(len(chain))]
    index = PrefixIndex([Replica("r1", model=MODEL), Replica("r2", model="other-model")])
    store = lambda: index.query(tokens).by_name()["r1"]  # noqa: E731

    with EventFeeds(index) as feeds, SyncClient.connect(cluster.url, timeout=10) as client:
        follower = StoreFollower(index, feeds, [parse_store(cluster.url)])
        try:
            assert set(follower.followed) == {"n1", "n2"}  # both advertise their endpoints in etcd
            client.put_many([(k, block_value(h, chain[i - 1] if i else None, i, tokens[i * BS:(i + 1) * BS]))
                             for i, (k, h) in enumerate(zip(keys, chain, strict=True))])
            poll(lambda: store().store_tokens == len(chain) * BS, 30.0, "every block announced")
            owners = set(store().store_nodes)
            assert owners == {"n1", "n2"}, owners  # 6 keys over 2 nodes: both hold some
            assert index.query(tokens).by_name()["r2"].store_tokens == 0  # another model's scope

            client.delete(keys[3])  # a delete is a BlockRemoved: the prefix ends before block 3
            poll(lambda: store().store_tokens == 3 * BS, 30.0, "the deleted block removed")

            (victim,) = index.query(tokens[:BS]).by_name()["r1"].store_nodes  # the holder of block 0
            node = cluster.nodes[victim]
            node.kill()  # its claims are void at once (the feed's connection broke), not at lease expiry
            poll(lambda: store().store_tokens == 0, 10, "the crashed node's claims voided")
            old = follower.followed[victim].feed.endpoint
            node.start()  # memory-only node: it comes back empty, on new event ports
            poll(lambda: follower.refresh() or (victim in follower.followed
                                                and follower.followed[victim].feed.endpoint != old),
                 30.0, "the restarted node's new endpoints, from etcd")
            # its lease may have expired before it came back: the leader then took its slots off the map
            # (replicas = 1: no owner left) until it repairs the map, and a write meanwhile has no node to go to
            cluster.wait(lambda st: victim in st.nodes and st.slotmap is not None
                         and all(any(n in st.nodes for n in owners) for owners in st.slotmap.table),
                         30.0, "every slot has a registered owner again")
            with SyncClient.connect(cluster.url, timeout=10) as fresh:  # (the old client's connection broke)
                assert store().store_tokens == 0  # what the crashed node held is gone, and never claimed again
                fresh.put_many([(keys[i], block_value(chain[i], chain[i - 1] if i else None, i,
                                                      tokens[i * BS:(i + 1) * BS])) for i in range(3)])
            poll(lambda: follower.refresh() or store().store_tokens == 3 * BS, 30.0, "the rewritten blocks")
            time.sleep(0.5)
            assert store().store_tokens == 3 * BS

            # a node joins: it is followed as soon as etcd lists it, and the slots moved to it carry
            # their blocks; a moved block is stored on its new owner before the old one drops it, so
            # the prompt stays loadable from memkv all along
            long_tokens = list(range(5000, 5000 + BS * 40))
            long_chain = BlockHasher().chain(long_tokens, BS)
            with SyncClient.connect(cluster.url, timeout=10) as fresh:
                fresh.put_many([(f"long-{i}".encode(), block_value(h, long_chain[i - 1] if i else None, i,
                                                                   long_tokens[i * BS:(i + 1) * BS]))
                                for i, h in enumerate(long_chain)])
            longest = lambda: index.query(long_tokens).by_name()["r1"]  # noqa: E731
            poll(lambda: longest().store_tokens == len(long_chain) * BS, 30.0, "the long prompt announced")
            cluster.add_node("n3")
            deadline = time.monotonic() + 90
            settled = None
            while settled is None or time.monotonic() < settled + 5:  # then 5 s more: the old copies dropped
                follower.refresh()
                assert longest().store_tokens == len(long_chain) * BS, "a migrating block went missing"
                assert time.monotonic() < deadline, f"n3 never announced moved blocks: {longest()}"
                if settled is None and "n3" in longest().store_nodes:
                    settled = time.monotonic()
                time.sleep(0.05)
            assert "n3" in follower.followed
            # ...and once moved, the old owner announced it removed: every block has one holder again
            # (replicas = 1), so the cluster's claims are neither lost nor doubled by a migration
            holders = lambda: [index.query(block_hashes=[h], block_size=BS).by_name()["r1"].store_nodes  # noqa: E731
                               for h in long_chain]
            poll(lambda: all(len(n) == 1 for n in holders()), 30.0, "the old owners' removals announced")
            assert "n3" in {n for ns in holders() for n in ns}
            assert all(st.decode_errors == 0 for st in feeds.stats().values())
        finally:
            follower.close()
