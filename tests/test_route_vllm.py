"""``memkv route`` in front of two real ``vllm serve`` CPU processes and a memkv cluster.

Both replicas run memkv's vLLM connector (they save every full block to memkv
and load what memkv has) and publish vLLM's own KV events; the memkv node
publishes its KV events too, and the router finds it through etcd
(``--store etcd://...``). What the test shows, in order:

1. a repeated prompt prefix goes to the replica whose GPU cache holds it (vLLM
   reports those prompt tokens as cached); the router's index knows, from vLLM's
   own events, which replica holds which blocks (so its block hashes are
   vLLM's); a prompt nobody holds is not pinned to one replica; streaming
   passes through; /metrics, /health, /v1/models answer;
2. the blocks turn 1 saved are announced by the node, discovered through etcd:
   the router's index says the *other* replica can load the prefix from memkv;
3. no stickiness: turn 2 of the conversation goes to the replica that did not
   serve turn 1 (the first one is gone), which serves it with the prefix
   loaded from memkv (vLLM's usage shows the cached tokens, on a replica whose
   GPU cache never held them) and produces the same greedy tokens as a full recompute.

vLLM runs from ``.venv-vllm`` (tests/vllm_serve.py); this test itself needs no vLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, poll, wait_for_port
from conftest_etcd import LocalCluster
from test_router_node_events import replayed
from vllm_serve import VllmServer, engine_python, heavy_lock, tiny_llama

from memkv.events.wire import BlockStored, decode_batch, hash_key
from memkv.vllm_engine import kv_transfer_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]  # incl. waiting for the machine-wide lock

MODEL = "tiny"


def post(url: str, body: dict, timeout: float = 180) -> tuple[dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), dict(r.headers)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def stored_hashes(replay_endpoint: str, topic: bytes | None) -> set[int]:
    """Every block hash a publisher's replay buffer says it stored."""
    return {hash_key(h) for _, _, payload in replayed(replay_endpoint, 0, topic)
            for ev in decode_batch(payload).events if isinstance(ev, BlockStored) for h in ev.block_hashes}


def tokens_of(out: dict[str, Any]) -> list[int]:
    ids = out["choices"][0].get("token_ids")
    assert isinstance(ids, list) and ids, out
    return ids


def test_route_in_front_of_two_vllm_replicas_and_memkv(tmp_path: Path, etcd_server: Any, start_node: Any) -> None:
    engine_python()
    cluster = LocalCluster(etcd_server, f"r{uuid.uuid4().hex[:8]}", start_node,
                           '[cluster]\nreplicas = 1\nlease_ttl = 2\n'
                           '[events]\nendpoint = "tcp://127.0.0.1:0"\nreplay_endpoint = "tcp://127.0.0.1:0"\n')
    cluster.add_node("n1")
    cluster.wait_members({"n1"})
    model = tiny_llama(tmp_path / "tiny-llama")
    connector = kv_transfer_config(cluster.url, model_id=MODEL)
    with heavy_lock():
        servers = [VllmServer(model, free_port(), free_port(), free_port(), f"kv@r{i}@{MODEL}",
                              tmp_path / f"vllm{i}.log", kv_transfer=connector) for i in (1, 2)]
        router = None
        try:
            for s in servers:
                s.wait_ready()
            port = free_port()
            cmd = [sys.executable, "-m", "memkv.cli", "route", "--listen", f"127.0.0.1:{port}",
                   "--store", cluster.url]
            for i, s in enumerate(servers, 1):
                cmd += ["--backend", f"{s.url}?events={s.events}&replay={s.replay}&topic={s.topic}&name=r{i}"
                                     f"&model={MODEL}"]
            router = subprocess.Popen(cmd, stdout=open(tmp_path / "route.log", "wb"), stderr=subprocess.STDOUT)
            wait_for_port("127.0.0.1", port, 60, alive=lambda: router.poll() is None)
            base = f"http://127.0.0.1:{port}"
            by_name = {f"r{i}": s for i, s in enumerate(servers, 1)}
            assert json.loads(get(f"{base}/v1/models"))["data"][0]["id"] == MODEL

            def explain(prompt: list[int]) -> dict[str, dict]:
                return {r["replica"]: r for r in post(f"{base}/memkv/prefix", {"prompt": prompt})[0]["replicas"]}

            # -- 1. GPU-prefix routing on vLLM's own events ----------------------------------------
            prefix = [(i * 37 + 11) % 2000 + 3 for i in range(600)]
            body = {"model": MODEL, "prompt": prefix, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
            turn1, headers = post(f"{base}/v1/completions", body)
            holder = headers["x-memkv-backend"]
            other = next(n for n in by_name if n != holder)
            reply1 = tokens_of(turn1)

            def holder_knows() -> dict | None:
                ans = explain(prefix)
                return ans if ans[holder]["gpu_tokens"] >= 512 else None
            ans = poll(holder_knows, 60, "the router's index learns the holder's GPU blocks from vLLM's events")
            assert ans[other]["gpu_tokens"] == 0, ans
            for k in range(2):  # the same prefix, other suffixes: the holder, with cached tokens
                out, h = post(f"{base}/v1/completions", dict(body, prompt=prefix + [100 + k, 7], max_tokens=2))
                assert h["x-memkv-backend"] == holder
                assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512, out["usage"]
            seen = set()  # prompts nobody holds are not pinned to one replica
            for k in range(4):
                fresh = [(i * 13 + 101 * k) % 2000 + 3 for i in range(40)]
                seen.add(post(f"{base}/v1/completions", dict(body, prompt=fresh, max_tokens=1))[1]["x-memkv-backend"])
            assert seen == {"r1", "r2"}
            req = urllib.request.Request(f"{base}/v1/completions",
                                         json.dumps(dict(body, stream=True, max_tokens=6)).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:  # streaming passes through chunk by chunk
                assert r.headers["x-memkv-backend"] == holder
                lines = [ln for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) >= 3
            assert f'memkv_route_requests_total{{backend="{holder}",path="/v1/completions"}}' in \
                get(f"{base}/metrics").decode()
            assert json.loads(get(f"{base}/health"))["backends"] == {"r1": True, "r2": True}

            # -- 2. the node announces what turn 1 saved; the router found the node through etcd --------
            turn2 = prefix + reply1 + [(i * 7 + 5) % 2000 + 3 for i in range(30)]
            ans = poll(lambda: (a := explain(turn2))[other]["store_tokens"] >= 512 and a, 60,
                       "the node's events reach the router: the other replica can load the prefix from memkv")
            assert ans[other]["store_nodes"] == ["n1"] and ans[other]["gpu_tokens"] == 0, ans
            print(f"[route] index for turn 2 before it is sent: {ans}")
            # what the node announces for the prompts the connector saved is a subset of what vLLM announced
            services = cluster.state().nodes["n1"].services
            node_hashes = stored_hashes(services["kv_events_replay"], b"kv@n1@*")
            vllm_hashes = set().union(*(stored_hashes(srv.replay, None) for srv in servers))
            print(f"[route] node announced {len(node_hashes)} blocks, the vLLM replicas {len(vllm_hashes)}")
            assert node_hashes and node_hashes <= vllm_hashes

            # reference: turn 2 computed from scratch on the holder (another cache_salt: no GPU or memkv hit)
            ref, _ = post(f"{by_name[holder].url}/v1/completions",
                          dict(body, prompt=turn2, cache_salt="reference-recompute"))
            assert ref["usage"]["prompt_tokens_details"]["cached_tokens"] in (0, None), ref["usage"]

            # -- 3. turn 2 to the other replica, served from memkv ----------------------------------
            by_name[holder].stop()  # the replica that served turn 1 is gone (scaled in, crashed, drained)
            poll(lambda: not json.loads(get(f"{base}/health"))["backends"][holder]
                 and explain(turn2)[holder]["gpu_tokens"] == 0, 30,
                 "the router sees the holder gone and voids its GPU claims")
            out2, h2 = post(f"{base}/v1/completions", dict(body, prompt=turn2))
            assert h2["x-memkv-backend"] == other
            cached = out2["usage"]["prompt_tokens_details"]["cached_tokens"]
            print(f"[route] turn 2 on {other}: usage {out2['usage']}, tokens {tokens_of(out2)}, ref {tokens_of(ref)}")
            assert cached >= 512, out2["usage"]  # the other replica never saw this prompt: loaded from memkv
            assert tokens_of(out2) == tokens_of(ref)
        finally:
            if router is not None:
                router.terminate()
                try:
                    router.wait(10)
                except subprocess.TimeoutExpired:
                    router.kill()
            for s in servers:
                s.stop()
