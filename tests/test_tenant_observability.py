"""What a tenant may observe (issue 19, item 4): a non-admin tenant sees only its own data on every
surface that reports on the node -- STATS (binary), INFO / DBSIZE / SCAN / KEYS / CLIENT LIST
(RESP), audit queries, error messages -- and admins see everything; /metrics can require a token.

Real node processes, real sockets, real Redis clients. Alice writes; Carol (a tenant with its
own session keys) and the admin look; each surface is checked for Alice's figures and name.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import free_port, wait_for_port

from memkv.client import SyncClient
from memkv.client.core.calls import SimpleCall
from memkv.client.executors.blocking_connection import BlockingConnection
from memkv.errors import PermissionDenied
from memkv.protocol.opcodes import Op
from memkv.tools.admin import admin_call

redis = pytest.importorskip("redis")

TENANTS = """
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.alice]
token = "alice-secret"
grants = { shared = "rw", session = "rw" }
[tenants.carol]
token = "carol-secret"
grants = { session = "rw" }
"""
ALICE_KEYS = 7


def _node(start_node: Any, extra: str = "", *args: str) -> Any:
    port = free_port()
    node = start_node("--resp-port", str(port), *args, config=extra + TENANTS)
    wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
    node.resp_port = port
    return node


def _resp(node: Any, user: str, db: int = 1) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node.resp_port, username=user, password=f"{user}-secret", db=db,
                       socket_timeout=30)


def _alice_writes(node: Any) -> None:
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a:
        for i in range(ALICE_KEYS):
            a.put(f"alice-{i}".encode(), b"x" * 1000, namespace="session")
        a.get(b"alice-0", namespace="session")
        a.get(b"absent", namespace="session")


def test_stats_show_a_tenant_only_its_own_figures(start_node: Any) -> None:
    node = _node(start_node)
    _alice_writes(node)
    with SyncClient.connect(node.url, tenant="carol", token="carol-secret") as c:
        c.put(b"mine", b"y" * 10, namespace="session")
        assert c.get(b"alice-0", namespace="session") is None  # scoped: Alice's key is not Carol's
        st = c.stats()
    text = json.dumps(st)
    assert "alice" not in text and "root" not in text, text
    assert st["scope"] == "tenant" and set(st["tenants"]) == {"carol"}
    assert st["entries"] == 1 and st["bytes"] == 10
    assert st["tenants"]["carol"]["misses"] == 1
    assert "namespaces" not in st and "server" not in st and "flash" not in st
    assert all(set(p["tenants"]) == {"carol"} for p in st["pools"].values())
    with SyncClient.connect(node.url, tenant="root", token="root-secret") as r:
        full = r.stats()
    assert full["tenants"]["alice"]["entries"] == ALICE_KEYS and full["entries"] == ALICE_KEYS + 1
    assert full["pools"]["session"]["tenants"]["alice"] > 0


def test_resp_info_dbsize_scan_keys_client_list_show_only_own_data(start_node: Any) -> None:
    node = _node(start_node)
    _alice_writes(node)
    alice = _resp(node, "alice")
    carol = _resp(node, "carol")
    carol.set("c1", b"v")
    carol.get("c-absent")
    info = carol.info("all")
    text = json.dumps(info, default=str)
    assert "alice" not in text
    assert info["db1"]["keys"] == 1 and "db0" not in info  # no grant on shared: no line
    assert info["keyspace_hits"] == 0 and info["keyspace_misses"] == 1  # Carol's own, not Alice's
    assert info["used_memory"] == 1  # her value's bytes, not the node's
    assert "connected_clients" not in info and "evicted_keys" not in info
    assert carol.dbsize() == 1 and alice.dbsize() == ALICE_KEYS
    assert sorted(carol.keys("*")) == [b"c1"]
    assert sorted(carol.scan_iter("*")) == [b"c1"]
    assert len(alice.keys("alice-*")) == ALICE_KEYS
    lines = carol.client_list()
    assert len(lines) == 1 and lines[0]["user"] == "carol", lines
    # the admin sees the node's figures
    root = _resp(node, "root", db=1)
    full = root.info("all")
    assert full["keyspace_hits"] >= 1 and full["connected_clients"] >= 3


def test_audit_queries_and_error_messages_never_name_another_tenant(start_node: Any) -> None:
    node = _node(start_node)
    _alice_writes(node)
    # audit queries are an admin's: a tenant is refused outright, over binary
    with pytest.raises(PermissionDenied) as denied:
        admin_call(node, {"cmd": "audit", "tenant": "alice"}, admin="carol", token="carol-secret")
    assert "alice" not in str(denied.value)
    recs = admin_call(node, {"cmd": "audit", "tenant": "alice"}, admin="root", token="root-secret")["records"]
    assert len([r for r in recs if r.get("op") == "put"]) >= ALICE_KEYS
    # errors: a refused write names only the session's own tenant; Alice's key reads as absent
    conn = BlockingConnection.open(node.host, node.port, tenant="carol", token="carol-secret")
    try:
        with pytest.raises(PermissionDenied) as e1:
            conn.call(SimpleCall(Op.PUT, {"k": b"alice-0", "cs": 0, "ns": "shared"}))
        assert "alice" not in str(e1.value) and "carol" in str(e1.value)
        theirs = conn.call(SimpleCall(Op.GET, {"k": b"alice-0", "ns": "session"}))
        nobody = conn.call(SimpleCall(Op.GET, {"k": b"nobody-0", "ns": "session"}))
        assert theirs == nobody == {"f": False}
    finally:
        conn.close()
    carol = _resp(node, "carol", db=0)
    with pytest.raises(redis.ResponseError) as e2:
        carol.set("alice-0", b"v")
    assert "alice" not in str(e2.value) and "carol" in str(e2.value)
    carol1 = _resp(node, "carol")
    assert carol1.get("alice-0") is None and carol1.exists("alice-0") == 0 and carol1.ttl("alice-0") == -2


def test_metrics_listen_only_where_configured_and_need_the_token(start_node: Any) -> None:
    mport = free_port()
    node = _node(start_node, '[node]\nmetrics_host = "127.0.0.2"\nmetrics_token = "scrape-secret"\n',
                 "--metrics-port", str(mport))
    wait_for_port("127.0.0.2", mport, 15, alive=lambda: node.running)
    with socket.socket() as s:  # only on the configured address, not on the node's
        assert s.connect_ex(("127.0.0.1", mport)) != 0
    url = f"http://127.0.0.2:{mport}/metrics"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    bad = urllib.request.Request(url, headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 401
    good = urllib.request.Request(url, headers={"Authorization": "Bearer scrape-secret"})
    with urllib.request.urlopen(good, timeout=10) as r:
        assert r.status == 200 and b"memkv" in r.read()
