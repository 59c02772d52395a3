"""memkv.client.router: vLLM's block hashes, the index, the feed rules, the policy.

Hashes are checked against vLLM's own functions; the feeds follow vLLM's own
``ZmqEventPublisher`` (an engine's stream) and memkv's ``KVEventPublisher``
(a node's), over real ZMQ sockets on loopback.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

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
from memkv.events.wire import MEDIUM_STORAGE, AllBlocksCleared, BlockRemoved, BlockStored, store_topic
from tests.vllm_required import require

BS = 4


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def gpu_stored(hashes: list[int], parent: int | None = None, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=[0] * (BS * len(hashes)),
                       block_size=BS, lora_id=None, medium=medium, lora_name=None)


# -- block hashes -------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_block_hashes_equal_vllms(algo: str) -> None:
    utils = require("vllm.v1.core.kv_cache_utils")
    hashing = require("vllm.utils.hashing")
    fn = hashing.get_hash_fn_by_name(algo)
    utils.init_none_hash(fn)
    rng = random.Random(7)
    tokens = [rng.randrange(128_000) for _ in range(16 * 9 + 5)]  # a partial last block is not hashed
    for salt, lora in ((None, None), ("tenant-a", None), ("tenant-a", ("ad1", "/loras/ad1"))):
        parent, want = None, []
        for i in range(len(tokens) // 16):
            keys = ([("lora", *lora)] if lora else []) + ([("cache_salt", salt)] if salt and i == 0 else [])
            parent = utils.hash_block_tokens(fn, parent, tokens[i * 16:(i + 1) * 16], tuple(keys) or None)
            want.append(utils.maybe_convert_block_hash(parent))
        assert BlockHasher(algo).chain(tokens, 16, cache_salt=salt, lora=lora) == want
    assert BlockHasher(algo).chain(tokens, 16) != BlockHasher(algo).chain(tokens, 16, cache_salt="x")


@pytest.mark.vllm
def test_block_hashes_equal_vllms_request_hasher() -> None:
    """The hasher vLLM's scheduler runs on a real Request (salt included)."""
    utils = require("vllm.v1.core.kv_cache_utils")
    fn = require("vllm.utils.hashing").get_hash_fn_by_name("sha256")
    request_mod = require("vllm.v1.request")
    sampling = require("vllm").SamplingParams(max_tokens=1)
    utils.init_none_hash(fn)
    tokens = list(range(1000, 1000 + 16 * 5))
    req = request_mod.Request(request_id="r", prompt_token_ids=tokens, sampling_params=sampling,
                              pooling_params=None, cache_salt="s1",
                              block_hasher=utils.get_request_block_hasher(16, fn))
    want = [utils.maybe_convert_block_hash(h) for h in req.block_hashes]
    assert len(want) == 5 and BlockHasher().chain(tokens, 16, cache_salt="s1") == want


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
    assert lost.clear_first and lost.apply == (0, 1) and f.resyncs == 1
    f.applied(14)
    assert f.on_live(15) is Action.APPLY
    f.applied(15)
    assert f.on_live(20) is Action.REPLAY and f.after_replay([], upto=20).clear_first  # no replay answer
    f.applied(20)
    assert f.on_live(3) is Action.RESTART and f.last is None and f.replay_from == 0
    late = FeedState()
    late.on_live(50)
    assert not late.after_replay([40, 41], upto=50).clear_first  # subscribing late only under-claims


# -- the index -------------------------------------------------------------------------------------
def test_index_answers_gpu_and_store_prefixes_per_scope() -> None:
    hasher = BlockHasher()
    tokens = list(range(100, 100 + BS * 6))
    chain = hasher.chain(tokens, BS)
    index = PrefixIndex([Replica("r1", model="m", host="h1"), Replica("r2", model="m", host="h2"),
                         Replica("r3", model="other", host="h1"), Replica("r4", model="m", namespace="session")],
                        default_block_size=BS)
    index.add_store_node(StoreNode("n1", host="h1"))
    index.add_store_node(StoreNode("n2", host="h9"))
    index.apply_replica_events("r1", [gpu_stored(chain[:2])])
    index.apply_replica_events("r2", [gpu_stored(chain[:1]), gpu_stored(chain[2:4], medium="CPU")])
    store = [BlockStored(block_hashes=[h], parent_block_hash=None, token_ids=[], block_size=BS, lora_id=None,
                         medium=MEDIUM_STORAGE, lora_name=None) for h in chain[:4]]
    index.apply_store_events("n1", "m", "shared", [store[0], store[2]])
    index.apply_store_events("n2", "m", "shared", [store[1], store[2], store[3]])
    a = index.query(tokens).by_name()
    assert (a["r1"].gpu_tokens, a["r2"].gpu_tokens) == (2 * BS, BS)  # CPU-medium events are not GPU
    assert a["r1"].store_tokens == a["r2"].store_tokens == 4 * BS
    assert a["r1"].store_nodes == ("n1", "n2")
    assert not a["r1"].store_same_host  # block 1 and 3 live only on n2 (host h9)
    assert a["r3"].store_tokens == 0 and a["r4"].store_tokens == 0  # other model / other namespace
    assert index.query(tokens, cache_salt="t2").by_name()["r1"].gpu_tokens == 0  # salted chain differs
    assert index.query(block_hashes=chain[:3], block_size=BS).by_name()["r1"].gpu_tokens == 2 * BS
    index.apply_store_events("n2", "m", "shared", [BlockRemoved(block_hashes=[chain[1]], medium=MEDIUM_STORAGE)])
    assert index.query(tokens).by_name()["r1"].store_tokens == BS
    index.apply_store_events("n2", "m", "shared", [store[1]])
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
@pytest.mark.vllm
def test_feed_follows_vllms_own_publisher_through_subscriber_and_publisher_restarts() -> None:
    kv_events = require("vllm.distributed.kv_events")
    from tests.conftest import free_port

    port, rport = free_port(), free_port()
    endpoint, replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}"

    def vllm_publisher() -> object:
        return kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=f"tcp://*:{port}",
                                           replay_endpoint=f"tcp://*:{rport}", topic="kv@r1@m")

    def batch(*events: object) -> object:
        return kv_events.KVEventBatch(ts=time.time(), events=list(events))

    def v_stored(hashes: list[int]) -> object:
        return kv_events.BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[0] * BS * len(hashes),
                                     block_size=BS, lora_id=None, medium="GPU", lora_name=None)

    tokens = list(range(7, 7 + BS * 5))
    chain = BlockHasher().chain(tokens, BS)
    index = PrefixIndex([Replica("r1", model="m")])
    spec = FeedSpec("r1", "replica", endpoint, replay_endpoint=replay, topic="kv@r1@m")
    gpu = lambda: index.query(tokens).by_name()["r1"].gpu_tokens  # noqa: E731

    pub = vllm_publisher()
    try:
        pub.publish(batch(v_stored(chain[:2])))  # before any router subscribed
        time.sleep(0.2)
        with EventFeeds(index) as feeds:
            feeds.add(spec)
            wait_until(lambda: gpu() == 2 * BS, "replayed history on subscribe")
            pub.publish(batch(v_stored(chain[2:3])))
            wait_until(lambda: gpu() == 3 * BS, "a live batch")
        # the router restarts; meanwhile the engine evicts and stores
        pub.publish(batch(kv_events.BlockRemoved(block_hashes=[chain[1]], medium="GPU")))
        pub.publish(batch(v_stored(chain[1:2]), v_stored(chain[3:5])))
        index2 = PrefixIndex([Replica("r1", model="m")])
        with EventFeeds(index2) as feeds:
            feeds.add(spec)
            wait_until(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == 5 * BS, "replay after restart")
            st = feeds.stats()["r1"]
            assert st.decode_errors == 0
            pub.shutdown()  # the engine dies: its claims become void
            wait_until(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == 0, "claims cleared on disconnect")
            pub = vllm_publisher()  # restarted engine, empty cache, new sequence
            pub.publish(batch(v_stored(chain[:1])))
            wait_until(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == BS, "the new engine's claims")
            assert feeds.stats()["r1"].disconnects >= 1
    finally:
        pub.shutdown()


def test_feed_follows_a_store_nodes_scoped_streams() -> None:
    tokens = list(range(50, 50 + BS * 4))
    chain = BlockHasher().chain(tokens, BS)
    topic = store_topic("kv", "n1", "m", "shared")

    def stored(hs: list[int]) -> BlockStored:
        return BlockStored(block_hashes=hs, parent_block_hash=None, token_ids=[], block_size=BS, lora_id=None,
                           medium=MEDIUM_STORAGE, lora_name=None, locality="REMOTE", ownership="memkv")

    index = PrefixIndex([Replica("r1", model="m", host="h1"), Replica("r2", model="m2")], default_block_size=BS)
    index.add_store_node(StoreNode("n1", host="h1"))
    store = lambda name="r1": index.query(tokens).by_name()[name]  # noqa: E731
    pub = KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic=topic)
    try:
        pub.publish([stored(chain[:2])], topic=topic)
        pub.publish([stored(chain[:1])], topic=store_topic("kv", "n1", "m2", "shared"))
        with EventFeeds(index) as feeds:
            feeds.add(FeedSpec("n1", "store", pub.endpoint, pub.replay_endpoint, topic="kv@n1@"))
            pub.publish([stored(chain[2:3])], topic=topic)  # first live batch: history comes by replay
            wait_until(lambda: store().store_tokens == 3 * BS, "store claims")
            assert store().store_same_host and store().store_nodes == ("n1",)
            pub.publish([stored(chain[:3])], topic=store_topic("kv", "n1", "m2", "shared"))
            wait_until(lambda: store("r2").store_tokens == 3 * BS, "the other model's scope")
            assert store().store_tokens == 3 * BS
            endpoint, replay = pub.endpoint, pub.replay_endpoint
            pub.close()  # the node crashes...
            wait_until(lambda: store().store_tokens == 0, "claims void on disconnect")
            pub = KVEventPublisher(endpoint, replay_endpoint=replay, topic=topic)  # ...and restarts
            pub.publish([stored(chain[:1])], topic=topic)
            wait_until(lambda: store().store_tokens == BS, "claims of the restarted node")
            time.sleep(0.3)
            assert store().store_tokens == BS  # nothing stale came back
    finally:
        pub.close()
