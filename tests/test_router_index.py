"""memkv.client.router: vLLM's block hashes, the index, the feed rules, the policy.

The feed follows memkv's ``KVEventPublisher`` (a node's streams) over real ZMQ
sockets on loopback. The checks against vLLM itself (its block hashes, its own
publisher) are in tests/venv_vllm/test_router_vllm.py (they run in .venv-vllm).
"""

from __future__ import annotations

import time

from conftest import poll

from memkv.client.router import (
    BlockHasher,
    EventFeeds,
    FeedSpec,
    FeedState,
    LongestPrefixThenLoad,
    PrefixIndex,
    Replica,
    ReplicaAnswer,
    StoreNode,
)
from memkv.client.router.feed import Action
from memkv.client.router.index import PrefixAnswer
from memkv.events.publisher import KVEventPublisher
from memkv.events.wire import MEDIUM_STORAGE, AllBlocksCleared, BlockRemoved, BlockStored, node_topic, store_topic

BS = 4


def gpu_stored(hashes: list[int], parent: int | None = None, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=[0] * (BS * len(hashes)),
                       block_size=BS, lora_id=None, medium=medium, lora_name=None)


# -- feed rules (pure) -----------------------------------------------------------------------------
def test_feed_rules() -> None:
    f = FeedState()
    assert f.on_live(5) is Action.REPLAY and f.replay_from == 0
    plan = f.after_replay([0, 1, 2, 3, 4, 5, 6], upto=5)  # replies past the live seq are not applied
    assert plan.apply == (0, 1, 2, 3, 4) and not plan.clear_first
    f.applied(5)
    assert f.on_live(6) is Action.APPLY
    f.applied(6)
    assert f.on_live(9) is Action.REPLAY and f.replay_from == 7
    assert f.after_replay([7, 8, 9], upto=9) == type(plan)(clear_first=False, apply=(0, 1))
    f.applied(9)
    assert f.on_live(14) is Action.REPLAY
    lost = f.after_replay([12, 13], upto=14)  # 10 and 11 fell out of the buffer: claims void
    assert lost.clear_first and lost.apply == (0, 1) and lost.incomplete and f.resyncs == 1
    f.applied(14)
    assert f.on_live(15) is Action.APPLY
    f.applied(15)
    assert f.on_live(20) is Action.REPLAY and f.after_replay([], upto=20).clear_first  # no replay answer
    f.applied(20)
    # a batch we have already (replay and live stream overlap after subscribing): dropped, nothing cleared
    assert f.on_live(3) is Action.DUPLICATE and f.last == 20 and f.duplicates == 1
    # seq 0 again: the publisher restarted, everything it claimed is void
    assert f.on_live(0) is Action.RESTART and f.last is None and f.replay_from == 0
    late = FeedState()
    late.on_live(50)
    assert not late.after_replay([40, 41], upto=50).clear_first  # subscribing late only under-claims


# -- the index -------------------------------------------------------------------------------------
def test_index_answers_gpu_and_store_prefixes_per_scope() -> None:
    hasher = BlockHasher()
    tokens = list(range(100, 100 + BS * 6))
    chain = hasher.chain(tokens, BS)
    index = PrefixIndex([Replica("r1", model="m", host="h1"), Replica("r2", model="m", host="h2"),
                         Replica("r3", model="other", host="h1"), Replica("r4", model="m", namespace="session"),
                         Replica("r5", model="m", namespace="per-tenant", tenant="t1"),
                         Replica("r6", model="m", namespace="per-tenant", tenant="t2")],
                        default_block_size=BS)
    index.add_store_node(StoreNode("n1", host="h1"))
    index.add_store_node(StoreNode("n2", host="h9"))
    index.apply_replica_events("r1", [gpu_stored(chain[:2])])
    index.apply_replica_events("r2", [gpu_stored(chain[:1]), gpu_stored(chain[2:4], medium="CPU")])
    store = [BlockStored(block_hashes=[h], parent_block_hash=None, token_ids=[], block_size=BS, lora_id=None,
                         medium=MEDIUM_STORAGE, lora_name=None) for h in chain[:4]]
    index.apply_store_events("n1", ("m", "shared", ""), [store[0], store[2]])
    index.apply_store_events("n2", ("m", "shared", ""), [store[1], store[2], store[3]])
    a = index.query(tokens).by_name()
    assert (a["r1"].gpu_tokens, a["r2"].gpu_tokens) == (2 * BS, BS)  # CPU-medium events are not GPU
    assert a["r1"].store_tokens == a["r2"].store_tokens == 4 * BS
    assert a["r1"].store_nodes == ("n1", "n2")
    assert not a["r1"].store_same_host  # block 1 and 3 live only on n2 (host h9)
    assert a["r3"].store_tokens == 0 and a["r4"].store_tokens == 0  # other model / other namespace
    assert index.query(tokens, cache_salt="t2").by_name()["r1"].gpu_tokens == 0  # salted chain differs
    # a tenant-scoped namespace: t1's blocks count for t1's replica only, never for another tenant's
    index.apply_store_events("n1", ("m", "per-tenant", "t1"), store[:3])
    t = index.query(tokens).by_name()
    assert (t["r5"].store_tokens, t["r6"].store_tokens, t["r1"].store_tokens) == (3 * BS, 0, 4 * BS)
    # a block copied to a new owner (slot migration), then dropped by the old one, is still held
    index.apply_store_events("n2", ("m", "per-tenant", "t1"), [store[0]])
    index.apply_store_events("n1", ("m", "per-tenant", "t1"), [BlockRemoved(block_hashes=[chain[0]],
                                                                            medium=MEDIUM_STORAGE)])
    assert index.query(tokens).by_name()["r5"].store_tokens == 3 * BS
    assert index.query(tokens).by_name()["r5"].store_nodes == ("n1", "n2")
    # ... and is gone from the cluster once its last holder drops it
    index.apply_store_events("n2", ("m", "per-tenant", "t1"), [BlockRemoved(block_hashes=[chain[0]],
                                                                            medium=MEDIUM_STORAGE)])
    assert index.query(tokens).by_name()["r5"].store_tokens == 0
    assert index.query(block_hashes=chain[:3], block_size=BS).by_name()["r1"].gpu_tokens == 2 * BS
    index.apply_store_events("n2", ("m", "shared", ""), [BlockRemoved(block_hashes=[chain[1]], medium=MEDIUM_STORAGE)])
    assert index.query(tokens).by_name()["r1"].store_tokens == BS
    index.apply_store_events("n2", ("m", "shared", ""), [store[1]])
    index.remove_store_node("n2")
    b = index.query(tokens).by_name()["r1"]
    assert (b.store_tokens, b.store_nodes, b.store_same_host) == (BS, ("n1",), True)
    index.apply_replica_events("r1", [AllBlocksCleared()])
    assert index.query(tokens).by_name()["r1"].gpu_tokens == 0


def test_policy_longest_prefix_then_load() -> None:
    def answer(*rows: tuple[str, int, int, bool, int]) -> PrefixAnswer:
        return PrefixAnswer(1000, tuple(ReplicaAnswer(n, g, s, ("n1",) if s else (), same, load)
                                        for n, g, s, same, load in rows))

    p = LongestPrefixThenLoad(max_load_gap=4)
    assert p.choose(answer(("a", 0, 0, False, 0), ("b", 512, 0, False, 3)), ["a", "b"]) == "b"
    # a store hit counts for every replica, at its load cost: GPU hit of the same length wins
    assert p.choose(answer(("a", 512, 512, False, 2), ("b", 0, 512, False, 0)), ["a", "b"]) == "a"
    # both only in the store: the one sharing the node's host loads it cheaper
    assert p.choose(answer(("a", 0, 512, False, 0), ("b", 0, 512, True, 0)), ["a", "b"]) == "b"
    # too busy: more than max_load_gap above the idlest
    assert p.choose(answer(("a", 0, 0, False, 0), ("b", 900, 0, False, 5)), ["a", "b"]) == "a"
    # equal: load decides, then the tie rotates (no stickiness)
    assert p.choose(answer(("a", 0, 0, False, 1), ("b", 0, 0, False, 0)), ["a", "b"]) == "b"
    picks = {p.choose(answer(("a", 0, 0, False, 0), ("b", 0, 0, False, 0)), ["a", "b"]) for _ in range(4)}
    assert picks == {"a", "b"}


# -- feeds over real sockets -------------------------------------------------------------------------
def test_feed_follows_a_store_nodes_scoped_streams() -> None:
    tokens = list(range(50, 50 + BS * 4))
    chain = BlockHasher().chain(tokens, BS)
    node = node_topic("kv", "n1")  # the node stream: AllBlocksCleared first, at every start
    topic = store_topic("kv", "n1", ("m", "shared", ""))
    topic_m2 = store_topic("kv", "n1", ("m2", "shared", ""))

    def stored(hs: list[int]) -> BlockStored:
        return BlockStored(block_hashes=hs, parent_block_hash=None, token_ids=[], block_size=BS, lora_id=None,
                           medium=MEDIUM_STORAGE, lora_name=None, locality="REMOTE", ownership="memkv")

    index = PrefixIndex([Replica("r1", model="m", host="h1"), Replica("r2", model="m2")], default_block_size=BS)
    index.add_store_node(StoreNode("n1", host="h1"))
    store = lambda name="r1": index.query(tokens).by_name()[name]  # noqa: E731
    pub = KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic=node)
    try:
        pub.publish([AllBlocksCleared()])
        pub.publish([stored(chain[:2])], topic=topic)
        pub.publish([stored(chain[:1])], topic=topic_m2)
        with EventFeeds(index) as feeds:
            feeds.add(FeedSpec("n1", "store", pub.endpoint, pub.replay_endpoint, topic=node))
            pub.publish([stored(chain[2:3])], topic=topic)  # first live batch: history comes by replay
            poll(lambda: store().store_tokens == 3 * BS, 10.0, "store claims")
            assert store().store_same_host and store().store_nodes == ("n1",)
            pub.publish([stored(chain[:3])], topic=topic_m2)
            poll(lambda: store("r2").store_tokens == 3 * BS, 10.0, "the other model's scope")
            assert store().store_tokens == 3 * BS
            endpoint, replay = pub.endpoint, pub.replay_endpoint
            pub.close()  # the node crashes...
            poll(lambda: store().store_tokens == 0, 10.0, "claims void on disconnect")
            pub = KVEventPublisher(endpoint, replay_endpoint=replay, topic=node)  # ...and restarts
            pub.publish([AllBlocksCleared()])
            pub.publish([stored(chain[:1])], topic=topic)
            poll(lambda: store().store_tokens == BS, 10.0, "claims of the restarted node")
            time.sleep(0.3)
            assert store().store_tokens == BS  # nothing stale came back
    finally:
        pub.close()


def test_router_scale_benchmark_runs() -> None:
    """bench/router_scale.py drives the index through its public API: a small run keeps it from rotting."""
    from bench.router_scale import run

    row = run(nodes=4, blocks=640)
    assert row["block_replicas"] == 2 * 640 and row["index_bytes_per_block"] > 0
    assert row["wire_bytes_per_block"] > 0  # (the run itself checks the held 4k-token prompt is found whole)
