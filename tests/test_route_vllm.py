"""``memkv route`` in front of two real ``vllm serve`` CPU processes, routing on vLLM's own KV events.

A repeated prompt prefix goes to the replica that holds it (and vLLM reports
those prompt tokens as cached); the block hashes vLLM publishes for a prompt
are the ones the router computes from its token ids; events decode with
vLLM's classes; streaming passes through. (Store-hit routing, turn 2 served
from memkv, needs the vLLM connector and lands with it.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import zmq

from memkv.client.router import BlockHasher
from tests.conftest import free_port, wait_for_port
from tests.vllm_required import require
from tests.vllm_serve import VllmServer, heavy_lock, tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def post(url: str, body: dict, timeout: float = 120) -> tuple[dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), dict(r.headers)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_route_sends_a_repeated_prefix_to_the_replica_that_holds_it(tmp_path: Path) -> None:
    kv_events = require("vllm.distributed.kv_events")
    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    model = tiny_llama(tmp_path / "tiny-llama")
    with heavy_lock():
        servers = [VllmServer(model, free_port(), free_port(), free_port(), f"kv@r{i}@tiny", tmp_path / f"vllm{i}.log")
                   for i in (1, 2)]
        router = None
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            for s in servers:
                s.wait_ready()
                sub.connect(s.events)
            port = free_port()
            backends = [f"{s.url}?events={s.events}&replay={s.replay}&topic={s.topic}&name=r{i}&model=tiny"
                        for i, s in enumerate(servers, 1)]
            cmd = [sys.executable, "-m", "memkv.cli", "route", "--listen", f"127.0.0.1:{port}"]
            for b in backends:
                cmd += ["--backend", b]
            router = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            wait_for_port("127.0.0.1", port, 30, alive=lambda: router.poll() is None)
            base = f"http://127.0.0.1:{port}"
            assert json.loads(get(f"{base}/v1/models"))["data"][0]["id"] == "tiny"

            prefix = [(i * 37 + 11) % 1000 + 3 for i in range(600)]
            body = {"model": "tiny", "prompt": prefix + [5, 6, 7], "max_tokens": 4, "temperature": 0}
            first, headers = post(f"{base}/v1/completions", body)
            holder = headers["x-memkv-backend"]
            assert first["choices"][0]["token_ids"] or first["choices"][0]["text"] is not None

            # vLLM's own events, decoded with vLLM's classes, name the blocks the router hashes itself
            published: dict[bytes, list[int]] = {}
            block_size = 0
            deadline = time.monotonic() + 30
            want = None
            while time.monotonic() < deadline:
                if sub.poll(500):
                    topic, _, payload = sub.recv_multipart()
                    for ev in decoder.decode(payload).events:
                        if isinstance(ev, kv_events.BlockStored):
                            published.setdefault(topic, []).extend(ev.block_hashes)
                            block_size = ev.block_size
                if block_size:
                    want = BlockHasher().chain(prefix + [5, 6, 7], block_size)
                    if set(want) <= set(published.get(f"kv@{holder}@tiny".encode(), [])):
                        break
            assert want and set(want) <= set(published[f"kv@{holder}@tiny".encode()]), (published, want)

            # the router's index knows it too (same events): wait until it answers so
            deadline = time.monotonic() + 30
            while True:
                ans = {r["replica"]: r for r in post(f"{base}/memkv/prefix", {"prompt": prefix})[0]["replicas"]}
                if ans[holder]["gpu_tokens"] >= block_size * (len(prefix) // block_size):
                    break
                assert time.monotonic() < deadline, ans
                time.sleep(0.2)
            other = next(n for n in ans if n != holder)
            assert ans[other]["gpu_tokens"] == 0

            for k in range(4):  # the same prefix, other suffixes: always the holder, with cached tokens
                out, h = post(f"{base}/v1/completions", dict(body, prompt=prefix + [100 + k, 7]))
                assert h["x-memkv-backend"] == holder
                assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= block_size * 2, out["usage"]

            # a prompt nobody holds goes to the idle replica or rotates: not pinned to the holder
            seen = set()
            for k in range(4):
                fresh = [(i * 13 + 101 * k) % 1000 + 3 for i in range(200)]
                seen.add(post(f"{base}/v1/completions", dict(body, prompt=fresh))[1]["x-memkv-backend"])
            assert seen == {"r1", "r2"}

            # streaming passes through chunk by chunk
            req = urllib.request.Request(f"{base}/v1/completions",
                                         json.dumps(dict(body, stream=True, max_tokens=6)).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.headers["x-memkv-backend"] == holder
                lines = [ln for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) >= 3

            metrics = get(f"{base}/metrics").decode()
            assert f'memkv_route_requests_total{{backend="{holder}",path="/v1/completions"}}' in metrics
            assert json.loads(get(f"{base}/health"))["backends"] == {"r1": True, "r2": True}
        finally:
            sub.close(linger=0)
            if router is not None:
                router.terminate()
                try:
                    router.wait(10)
                except subprocess.TimeoutExpired:
                    router.kill()
            for s in servers:
                s.stop()
