"""Security (issue 9): tenants at runtime, HMAC challenge-response vs replay, ACL isolation, quotas, rate limits."""

from __future__ import annotations

import json
import os

import pytest

from memkv.cli import main as cli_main
from memkv.client import SyncClient
from memkv.client.core.calls import SimpleCall
from memkv.client.executors.blocking_connection import BlockingConnection
from memkv.client.url import parse_url
from memkv.errors import AuthError, PermissionDenied, RateLimited
from memkv.protocol import auth
from memkv.protocol.opcodes import Op
from memkv.tools.admin import admin_call

ADMIN = """
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.alice]
token = "alice-secret"
grants = { session = "rw", shared = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { session = "rw", shared = "r" }
"""


def _cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _conn(node) -> BlockingConnection:
    return BlockingConnection.open(node.host, node.port)


def test_unauthenticated_clients_are_refused(start_node):
    node = start_node(config=ADMIN)
    with pytest.raises(AuthError):
        SyncClient.connect(node.url)
    conn = _conn(node)
    try:
        for op, meta in ((Op.GET, {"k": b"x"}), (Op.STATS, {}), (Op.ADMIN, {"cmd": "tenant.list"})):
            with pytest.raises(AuthError):
                conn.call(SimpleCall(op, meta))
    finally:
        conn.close()


def test_captured_auth_cannot_be_replayed(start_node):
    node = start_node(config=ADMIN)
    # A legitimate exchange, as an eavesdropper would capture it.
    c1 = _conn(node)
    hello = c1.call(SimpleCall(Op.HELLO, {}))
    cnonce = auth.new_nonce()
    captured = {"tenant": "alice", "cnonce": cnonce,
                "proof": auth.client_proof("alice-secret", "alice", hello["nonce"], cnonce)}
    assert "proof" in c1.call(SimpleCall(Op.AUTH, captured))
    # Replayed on the same connection: the node's nonce is single-use.
    with pytest.raises(AuthError):
        c1.call(SimpleCall(Op.AUTH, captured))
    c1.close()
    # Replayed on a new connection (new server nonce): refused, and the session stays locked.
    c2 = _conn(node)
    try:
        with pytest.raises(AuthError):
            c2.call(SimpleCall(Op.AUTH, captured))  # without HELLO
        c2.call(SimpleCall(Op.HELLO, {}))
        with pytest.raises(AuthError):
            c2.call(SimpleCall(Op.AUTH, captured))
        with pytest.raises(AuthError):
            c2.call(SimpleCall(Op.GET, {"k": b"x"}))
    finally:
        c2.close()
    # The token never crossed the wire.
    assert b"alice-secret" not in json.dumps({k: (v.hex() if isinstance(v, bytes) else v)
                                              for k, v in captured.items()}).encode()


def test_tenant_cli_add_list_revoke_persists(start_node, capsys):
    node = start_node(config=ADMIN)
    creds = ["--admin", "root", "--admin-token", "root-secret"]
    # a non-admin tenant may not manage tenants
    with pytest.raises(PermissionDenied):
        admin_call(parse_url(node.url).nodes[0], {"cmd": "tenant.list"}, admin="alice", token="alice-secret")
    out = _cli(capsys, "tenant", "add", node.url, "carol", "--grant", "session=rw", "--grant", "shared=r",
               "--quota", "2MiB", "--rate", "500", "--json", *creds)
    token = json.loads(out)["token"]
    assert len(token) >= 32
    listed = json.loads(_cli(capsys, "tenant", "list", node.url, "--json", *creds))
    names = {t["name"]: t for t in listed["tenants"]}
    assert names["carol"]["grants"] == {"session": "rw", "shared": "r"}
    assert "token" not in names["carol"]
    with SyncClient.connect(node.url, tenant="carol", token=token) as carol:
        carol.put(b"k", b"v", namespace="session")
        assert carol.get(b"k", namespace="session") == b"v"
        with pytest.raises(PermissionDenied):
            carol.put(b"k", b"v")  # shared needs a writer grant
        # revoke a config tenant and the runtime one; carol's open session is cut off
        _cli(capsys, "tenant", "revoke", node.url, "carol", *creds)
        _cli(capsys, "tenant", "revoke", node.url, "bob", *creds)
        with pytest.raises(AuthError):
            carol.get(b"k", namespace="session")
    # persisted in the data dir: after a restart carol and bob stay revoked, a new tenant stays
    _cli(capsys, "tenant", "add", node.url, "dave", "--token", "dave-secret-dave-secret", "--grant", "*=rw", *creds)
    assert json.loads((node.data_dir / "tenants.json").read_text())["revoked"] == ["bob", "carol"]
    node.restart()
    with pytest.raises(AuthError):
        SyncClient.connect(node.url, tenant="carol", token=token)
    with pytest.raises(AuthError):
        SyncClient.connect(node.url, tenant="bob", token="bob-secret")
    with SyncClient.connect(node.url, tenant="dave", token="dave-secret-dave-secret") as dave:
        dave.put(b"x", b"y")


def test_first_tenant_on_open_node_must_be_admin_then_auth_is_on(start_node, capsys):
    node = start_node()
    with SyncClient.connect(node.url) as c:
        c.put(b"before", b"1")
    # refused (exit code 2): nobody could manage tenants afterwards
    assert cli_main(["tenant", "add", node.url, "x", "--grant", "shared=rw"]) == 2
    _cli(capsys, "tenant", "add", node.url, "root", "--token", "r" * 40, "--grant", "*=admin")
    with pytest.raises(AuthError):
        SyncClient.connect(node.url)  # auth is now required
    with SyncClient.connect(node.url, tenant="root", token="r" * 40) as c:
        assert c.get(b"before") == b"1"


def test_session_miss_is_indistinguishable_from_absence(start_node):
    node = start_node(config=ADMIN)
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a:
        a.put(b"alice-conv", b"private", namespace="session")
    raw = {}
    conn = BlockingConnection.open(node.host, node.port, tenant="bob", token="bob-secret")
    try:
        # The same reply, field for field, for "exists for another tenant" and "never existed".
        for key in (b"alice-conv", b"never-written"):
            raw[key] = (conn.call(SimpleCall(Op.GET, {"k": key, "ns": "session"})),
                        conn.call(SimpleCall(Op.EXISTS_MANY, {"ks": [key], "ns": "session"})),
                        conn.call(SimpleCall(Op.LOOKUP_PREFIX, {"ks": [key], "ns": "session"})),
                        conn.call(SimpleCall(Op.GET_MANY, {"ks": [key], "ns": "session"})))
    finally:
        conn.close()
    assert raw[b"alice-conv"] == raw[b"never-written"]
    assert raw[b"alice-conv"][0] == {"f": False}


def test_per_tenant_quota_and_rate_limit(start_node):
    cfg = ADMIN + """
[tenants.small]
token = "small-secret"
grants = { session = "rw" }
quota = "1MiB"
[tenants.slow]
token = "slow-secret"
grants = { shared = "r" }
rate = 5
burst = 5
"""
    node = start_node(config=cfg)
    with SyncClient.connect(node.url, tenant="small", token="small-secret") as s:
        for i in range(8):
            s.put(f"q{i}".encode(), os.urandom(256 * 1024), namespace="session")
        st = s.stats()
        assert st["pools"]["session"]["tenants"]["small"] <= 1024 * 1024
    # The bucket holds 5 requests; the connect's PING took one. Refill is 5/s, so a burst of
    # 20 back-to-back requests cannot all pass.
    with SyncClient.connect(node.url, tenant="slow", token="slow-secret") as slow:
        with pytest.raises(RateLimited):
            for _ in range(20):
                slow.get(b"anything")
        # other tenants are not affected
        with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a:
            for _ in range(20):
                a.get(b"anything")
        with SyncClient.connect(node.url, tenant="root", token="root-secret") as r:
            assert r.stats()["security"]["rate_limited"] >= 1
