"""A standalone node's KV events as the router library sees them: TTL expiry and eviction.

One real node (``memkv serve --kv-events``), found with ``--store memkv://``
(the node's STATS say where it publishes); blocks written with the connector's
header. A block whose TTL passes, or that the store evicts to make room, is
announced removed: the index stops counting it, and never counts more blocks
than the node holds.
"""

from __future__ import annotations

from typing import Any

import zmq
from conftest import poll
from test_router_discovery import BS, MODEL, block_value

from memkv.client import SyncClient
from memkv.client.router import BlockHasher, EventFeeds, PrefixIndex, Replica
from memkv.client.router.discovery import StoreFollower, parse_store
from memkv.events.wire import AllBlocksCleared, decode_batch, parse_replay_reply, replay_request


def replayed(endpoint: str, start: int, topic: bytes | None = None) -> list[tuple[bytes, int, bytes]]:
    """A publisher's buffered batches from ``start`` (vLLM's replay protocol; ``topic``: memkv's form)."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart(replay_request(start, topic))
        out = []
        while True:
            assert dealer.poll(10_000), "replay did not end"
            topic, seq, payload = parse_replay_reply(dealer.recv_multipart())
            if seq < 0:
                return out
            out.append((topic, seq, payload))
    finally:
        dealer.close(linger=0)


def chain_items(prefix: str, start: int, n: int) -> tuple[list[int], list[tuple[bytes, bytes]]]:
    tokens = list(range(start, start + BS * n))
    chain = BlockHasher().chain(tokens, BS)
    return tokens, [(f"{prefix}-{i}".encode(), block_value(h, chain[i - 1] if i else None, i,
                                                         tokens[i * BS:(i + 1) * BS]))
                    for i, h in enumerate(chain)]


def test_ttl_expiry_and_eviction_are_announced(start_node: Any) -> None:
    node = start_node("--kv-events", "tcp://127.0.0.1:0", "--memory", "8MiB")
    index = PrefixIndex([Replica("r1", model=MODEL)])
    loadable = lambda tokens: index.query(tokens).by_name()["r1"].store_tokens  # noqa: E731
    with EventFeeds(index) as feeds, SyncClient.connect(node.url, timeout=10) as client:
        follower = StoreFollower(index, feeds, [parse_store(node.url)])
        try:
            kept, kept_items = chain_items("kept", 10, 4)
            brief, brief_items = chain_items("brief", 20_000, 4)
            client.put_many(kept_items)
            # (written at once: what the feed's subscription missed, it gets by replay on the next port)
            poll(lambda: loadable(kept) == 4 * BS, 20, "the prompt announced")
            client.put_many(brief_items, ttl=3.0)
            poll(lambda: loadable(brief) == 4 * BS, 20, "the brief prompt announced")
            poll(lambda: loadable(brief) == 0, 20, "the expired blocks removed")
            assert loadable(kept) == 4 * BS

            # fill the region several times over: the oldest blocks are evicted, and announced removed
            for k in range(12):
                client.put_many(chain_items(f"fill{k}", 40_000 + k * 10_000, 8)[1] +
                                [(f"pad{k}-{j}".encode(), b"\x00" * 65536) for j in range(16)])
            poll(lambda: loadable(kept) == 0, 20, "the evicted prompt removed")
            events = client.stats()["events"]
            claimed = sum(1 for k in range(12)
                          for h in BlockHasher().chain(list(range(40_000 + k * 10_000, 40_000 + k * 10_000 + BS * 8)),
                                                       BS)
                          if index.query(block_hashes=[h], block_size=BS).by_name()["r1"].store_tokens)
            assert 0 < events["blocks"] < 12 * 8 + 8  # some were evicted...
            assert claimed <= events["blocks"]  # ...and the index never claims more than the node holds
            assert feeds.stats()[events["node"]].decode_errors == 0

            # the node stream (the default one, vLLM's two-frame replay request) begins with AllBlocksCleared:
            # whatever a router believed of an earlier run of this node is void before any new claim
            first = replayed(events["replay_endpoint"], 0)[0]
            assert first[:2] == (events["node_topic"].encode(), 0)
            assert [type(e) for e in decode_batch(first[2]).events] == [AllBlocksCleared]
        finally:
            follower.close()
