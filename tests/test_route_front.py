"""``memkv route`` as a process, without engines: store nodes found through etcd, typed errors.

The router follows a real cluster (``--store etcd://``); its ``POST
/memkv/prefix`` answers from the node's KV events that a prompt's blocks are
loadable from memkv for the backend's model, and not for another model's
backend. Its one backend is down: ``/health`` says so, and a completion gets
a clear 502 instead of a hang; bad requests get 4xx.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from conftest import free_port, poll, wait_for_port
from conftest_etcd import LocalCluster
from test_router_discovery import BS, EVENTS, MODEL, block_value

from memkv.client import SyncClient
from memkv.client.router import BlockHasher


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_route_process_follows_the_cluster_and_fails_fast(tmp_path: Path, etcd_server: Any, start_node: Any) -> None:
    cluster = LocalCluster(etcd_server, f"f{uuid.uuid4().hex[:8]}", start_node,
                           "[cluster]\nreplicas = 1\nlease_ttl = 2\n" + EVENTS)
    cluster.add_node("n1")
    cluster.wait_members({"n1"})
    tokens = list(range(300, 300 + BS * 5))
    chain = BlockHasher().chain(tokens, BS)
    with SyncClient.connect(cluster.url, timeout=10) as client:
        client.put_many([(f"b{i}".encode(), block_value(h, chain[i - 1] if i else None, i, tokens[i * BS:(i + 1) * BS]))
                         for i, h in enumerate(chain)])
    port, dead = free_port(), free_port()
    cmd = [sys.executable, "-m", "memkv.cli", "route", "--listen", f"127.0.0.1:{port}", "--store", cluster.url,
           "--backend", f"http://127.0.0.1:{dead}?name=a&model={MODEL}&events=tcp://127.0.0.1:{free_port()}",
           "--backend", f"http://127.0.0.1:{free_port()}?name=b&model=other&events=tcp://127.0.0.1:{free_port()}"]
    log = open(tmp_path / "route.log", "wb")
    router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 60, alive=lambda: router.poll() is None)
        base = f"http://127.0.0.1:{port}"

        def answer() -> dict[str, dict]:
            return {r["replica"]: r for r in call(f"{base}/memkv/prefix", {"prompt": tokens})[1]["replicas"]}
        poll(lambda: answer()["a"]["store_tokens"] == len(chain) * BS, 30, "the node's blocks in the router's index")
        ans = answer()
        assert ans["a"]["store_nodes"] == ["n1"] and ans["a"]["gpu_tokens"] == 0
        assert ans["b"]["store_tokens"] == 0  # another model's backend cannot load them

        poll(lambda: call(f"{base}/health")[0] == 503, 30, "both backends seen down")
        assert call(f"{base}/health")[1]["backends"] == {"a": False, "b": False}
        status, body = call(f"{base}/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 1})
        assert status == 502 and "unreachable" in body["error"]["message"]
        assert call(f"{base}/memkv/prefix", {"prompt": "not token ids"})[0] == 400
        assert call(f"{base}/v1/nothing", {})[0] == 404
    finally:
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
        log.close()
