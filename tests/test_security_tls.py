"""Security (issue 9): TLS between clients and a node (sans-IO on the node), optional mutual TLS."""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio
from tls_certs import make_certs

from memkv.client import Client, SyncClient
from memkv.errors import AuthError, ConnectionLost, NodeUnavailable

TENANTS = """
[tenants.alice]
token = "alice-secret"
grants = { "*" = "rw" }
"""


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "certs")


def _tls_url(node) -> str:
    return f"memkvs://{node.host}:{node.port}"


def test_tls_roundtrip_sync_and_trio(start_node, certs):
    node = start_node("--tls-cert", certs.cert, "--tls-key", certs.key, config=TENANTS)
    big = os.urandom(3 * 1024 * 1024 + 17)
    with SyncClient.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=str(certs.ca),
                            transport="tcp") as c:
        c.put(b"small", b"hello")
        c.put(b"big", big)
        items = {f"k{i}".encode(): os.urandom(1000 + i) for i in range(50)}
        c.put_many(items)
        assert c.get(b"small") == b"hello"
        assert c.get(b"big") == big
        assert c.get_many(list(items)) == list(items.values())
        assert c.get(b"missing") is None
        assert c.stats()["security"]["tls"] is True

    async def main() -> None:
        async with Client.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=str(certs.ca),
                                  transport="tcp") as ac:
            await ac.put(b"trio", big)
            got = []

            async def one(i: int) -> None:
                got.append(await ac.get(b"big"))

            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(one, i)
            assert got == [big] * 4
            assert await ac.get(b"trio") == big

    trio.run(main)


def test_tls_refuses_plaintext_and_untrusted(start_node, certs):
    node = start_node("--tls-cert", certs.cert, "--tls-key", certs.key, config=TENANTS)
    # a plain-TCP client cannot talk to a TLS node (no hang: it fails)
    with pytest.raises((NodeUnavailable, AuthError, Exception)):
        SyncClient.connect(node.url, tenant="alice", token="alice-secret", transport="tcp", timeout=2.0)
    # a client that does not trust the node's CA refuses the handshake
    with pytest.raises(NodeUnavailable):
        SyncClient.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=str(certs.other_ca),
                           transport="tcp")
    # the node survives both and still serves
    with SyncClient.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=str(certs.ca),
                            transport="tcp") as c:
        c.put(b"x", b"y")
        assert c.get(b"x") == b"y"


def test_mutual_tls_from_config(start_node, certs):
    cfg = TENANTS + f"""
[tls]
cert = "{certs.cert}"
key = "{certs.key}"
ca = "{certs.ca}"
"""
    node = start_node(config=cfg)
    # without a client certificate: refused (TLS 1.3: the node's alert comes after the client's
    # side of the handshake, so the first request fails)
    with pytest.raises((NodeUnavailable, ConnectionLost)):
        c = SyncClient.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=str(certs.ca),
                               transport="tcp")
        c.close()
        raise NodeUnavailable("connected without a client certificate")
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    with SyncClient.connect(_tls_url(node), tenant="alice", token="alice-secret", tls=ctx, transport="tcp") as c:
        c.put(b"m", b"tls")
        assert c.get(b"m") == b"tls"


def test_tls_bytes_on_the_wire_are_encrypted(start_node, certs):
    """A raw look at what the node sends: a TLS handshake record, never our plaintext."""
    node = start_node("--tls-cert", certs.cert, "--tls-key", certs.key)
    marker = b"PLAINTEXT-MARKER-" * 64
    with SyncClient.connect(_tls_url(node), tls=str(certs.ca), transport="tcp") as c:
        c.put(b"marker", marker)
    with socket.create_connection((node.host, node.port), timeout=5) as s:
        s.sendall(b"MK" + bytes(22))  # a memkv header, not a ClientHello
        s.settimeout(5)
        try:
            data = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert marker[:16] not in data
