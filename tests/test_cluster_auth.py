"""Clusters with tenants (and TLS): the cluster-internal identity (cluster/identity.py).

Real etcd, real node processes. Join and drain move the data (with R = 1 a
slot's only copy is the one that moves: nothing is readable afterwards unless
it was copied), tenant-scoped values keep their tenant, tenants cannot use the
migration ops nor write on behalf of another tenant nor log in as the cluster,
RESP forwarding works with auth, node-to-node calls work over TLS.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from typing import Any

import pytest
from conftest import free_port, wait_for_port
from conftest_etcd import LocalCluster

from memkv.client import SyncClient
from memkv.client.core.calls import PutManyCall, SimpleCall
from memkv.client.etcd import Etcd
from memkv.client.executors.blocking_connection import BlockingConnection
from memkv.cluster.identity import etcd_secret, secret_key
from memkv.errors import AuthError, PermissionDenied
from memkv.protocol.auth import INTERNAL_TENANT, internal_token
from memkv.protocol.opcodes import Op

pytestmark = pytest.mark.timeout(240)

TENANTS = {
    "root": {"token": "root-secret-root-secret", "grants": {"*": "admin"}},
    "alice": {"token": "alice-secret-alice", "grants": {"session": "rw", "shared": "rw"}},
    "bob": {"token": "bob-secret-bob-secret", "grants": {"session": "rw", "shared": "r"}},
}
N = 300


def _tenants_in_etcd(etcd_server: Any, name: str) -> None:
    etcd = Etcd(etcd_server.endpoint, timeout=3.0)
    try:
        for t, spec in TENANTS.items():
            etcd.put(f"/memkv/{name}/tenants/{t}", json.dumps(spec))
    finally:
        etcd.close()


def _settled(cl: LocalCluster, ids: set[str]) -> Any:
    return cl.wait(lambda st: set(st.nodes) == ids and st.slotmap is not None and not st.slotmap.pending
                   and {n for row in st.slotmap.table for n in row} == ids
                   and set(st.slotmap.members) == ids, 120, f"slots on exactly {sorted(ids)}")


def _two_nodes_with_data(etcd_server: Any, name: str, start: Any, tag: str) -> tuple[LocalCluster, Any]:
    """n1 + n2 (R = 1) settled, with every tenant's test values written."""
    cl = LocalCluster(etcd_server, name, start, "[cluster]\nreplicas = 1\nlease_ttl = 2\n")
    cl.add_node("n1")
    cl.add_node("n2")
    _settled(cl, {"n1", "n2"})
    data = Data(tag)
    data.write(cl.url)
    return cl, data


def _connect(url: str, tenant: str, **kw: Any) -> SyncClient:
    return SyncClient.connect(url, tenant=tenant, token=TENANTS[tenant]["token"], transport="tcp", timeout=10.0, **kw)


class Data:
    """Shared blocks of alice; session values of alice and bob under the *same* keys; alice-only session keys."""

    def __init__(self, prefix: str) -> None:
        self.shared = {f"{prefix}-sh-{i}".encode(): f"shared-{i}".encode() * 50 for i in range(N)}
        self.both = [f"{prefix}-s-{i}".encode() for i in range(N)]
        self.alice_only = [f"{prefix}-a-{i}".encode() for i in range(N // 3)]

    def write(self, url: str, **kw: Any) -> None:
        with _connect(url, "alice", **kw) as a, _connect(url, "bob", **kw) as b:
            a.put_many(self.shared)
            a.put_many({k: b"alice:" + k for k in self.both + self.alice_only}, namespace="session")
            b.put_many({k: b"bob:" + k for k in self.both}, namespace="session")

    def check(self, url: str, **kw: Any) -> None:
        with _connect(url, "alice", **kw) as a, _connect(url, "bob", **kw) as b:
            keys = list(self.shared)
            assert a.get_many(keys) == [self.shared[k] for k in keys]
            assert b.get_many(keys) == [self.shared[k] for k in keys]
            assert a.get_many(self.both, namespace="session") == [b"alice:" + k for k in self.both]
            assert b.get_many(self.both, namespace="session") == [b"bob:" + k for k in self.both]
            assert a.get_many(self.alice_only, namespace="session") == [b"alice:" + k for k in self.alice_only]
            assert b.get_many(self.alice_only, namespace="session") == [None] * len(self.alice_only)


def _holds_some(node: Any, tenant: str, keys: list[bytes], namespace: str, **kw: Any) -> int:
    """How many of ``keys`` the node itself holds in ``tenant``'s scope (a direct memkv:// read is not routed)."""
    with SyncClient.connect(node.url, tenant=tenant, token=TENANTS[tenant]["token"], transport="tcp", **kw) as c:
        return sum(1 for v in c.get_many(keys, namespace=namespace) if v is not None)


def test_join_drain_and_resp_forwarding_with_tenants(etcd_server: Any, start_node: Any, capsys: Any) -> None:
    import redis

    from memkv.cli import main as cli_main

    name = f"ca{uuid.uuid4().hex[:8]}"
    _tenants_in_etcd(etcd_server, name)
    resp: dict[str, int] = {}

    def start_with_resp(*args: str, config: str | None = None) -> Any:
        port = free_port()
        node = start_node(*args, "--resp-port", str(port), config=config)
        wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
        resp[args[args.index("--node-id") + 1]] = port
        return node

    cl, data = _two_nodes_with_data(etcd_server, name, start_with_resp, "j")
    data.check(cl.url)

    # join: n3 takes slots, and their values (all tenants, each in its own scope) move with them
    cl.add_node("n3")
    st = _settled(cl, {"n1", "n2", "n3"})
    data.check(cl.url)
    mine = [k for k in data.both if st.slotmap.owners(k)[0] == "n3"]
    assert mine, "n3 owns none of the test keys"
    n3 = cl.nodes["n3"]
    assert _holds_some(n3, "alice", mine, "session") == len(mine)
    assert _holds_some(n3, "bob", mine, "session") == len(mine)
    with SyncClient.connect(n3.url, tenant="bob", token=TENANTS["bob"]["token"], transport="tcp") as b:
        assert b.get_many(mine, namespace="session") == [b"bob:" + k for k in mine]

    # RESP forwarding with auth: any node's RESP port serves every key, as the logged-in tenant
    def rc(node: str, tenant: str, token: str | None = None) -> Any:  # db 1 = the session namespace
        return redis.Redis(host="127.0.0.1", port=resp[node], socket_timeout=30, username=tenant,
                           password=token or TENANTS[tenant]["token"], db=1)

    with pytest.raises(redis.AuthenticationError):
        rc("n1", "alice", "wrong-token").ping()
    r1, r3 = rc("n1", "alice"), rc("n3", "alice")
    assert r1.mget(data.both) == [b"alice:" + k for k in data.both]
    fkeys = [f"fwd-{i}".encode() for i in range(40)]
    assert len({st.slotmap.owners(k)[0] for k in fkeys}) > 1  # some are forwarded
    for k in fkeys:
        assert r1.set(k, b"resp:" + k) is True
    assert r3.mget(fkeys) == [b"resp:" + k for k in fkeys]
    rb = rc("n3", "bob")
    assert rb.mget(fkeys) == [None] * len(fkeys)  # alice's session keys stay hers
    with _connect(cl.url, "alice") as a:
        assert a.get_many(fkeys, namespace="session") == [b"resp:" + k for k in fkeys]

    # drain n1: its slots (and values) move to n2/n3; nothing is lost
    capsys.readouterr()
    assert cli_main(["drain", cl.url, "n1", "--timeout", "150", "--quiet"]) == 0, capsys.readouterr().err
    st = cl.state()
    assert not any("n1" in row for row in st.slotmap.table)
    data.check(cl.url)
    with _connect(cl.url, "alice") as a:
        assert a.get_many(fkeys, namespace="session") == [b"resp:" + k for k in fkeys]


def test_internal_ops_need_the_cluster_identity_over_mutual_tls(etcd_server: Any, start_node: Any, tmp_path: Any,
                                                         capsys: Any) -> None:
    from tls_certs import make_certs

    from memkv.cli import main as cli_main

    certs = make_certs(tmp_path / "certs")
    name = f"ct{uuid.uuid4().hex[:8]}"
    _tenants_in_etcd(etcd_server, name)
    # mutual TLS: nodes require client certificates signed by the CA; node-to-node calls verify peers with
    # [tls] ca and present the node's own certificate
    config = (f"[cluster]\nreplicas = 1\nlease_ttl = 2\n"
              f"[tls]\ncert = \"{certs.cert}\"\nkey = \"{certs.key}\"\nca = \"{certs.ca}\"\n")
    cl = LocalCluster(etcd_server, name, start_node, config)
    cl.add_node("n1")
    cl.add_node("n2")
    _settled(cl, {"n1", "n2"})
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    tls = {"tls": ctx}
    data = Data("t")
    data.write(cl.url, **tls)

    # the cluster secret was generated in etcd on formation; the internal token derives from it
    etcd = Etcd(etcd_server.endpoint, timeout=3.0)
    try:
        kv, _ = etcd.get(secret_key(name))
        assert kv is not None and len(kv.value) >= 32
        secret = etcd_secret(etcd, name)
    finally:
        etcd.close()
    n1 = cl.nodes["n1"]
    ctx_host, ctx_port = n1.host, n1.port

    def open_as(tenant: str, token: str) -> BlockingConnection:
        return BlockingConnection.open(ctx_host, ctx_port, tenant=tenant, token=token, timeout=10.0, tls=ctx)

    push = {"job": "x:n1:n2", "slots": list(range(4096)), "nslots": 4096, "dest": cl.nodes["n2"].address,
            "epoch": 1, "max_bytes": 1 << 20}
    for tenant in ("alice", "root"):  # a normal tenant, and even an admin tenant
        conn = open_as(tenant, TENANTS[tenant]["token"])
        try:
            for op, meta in ((Op.MIGRATE_PUSH, push), (Op.DROP_SLOTS, {"slots": [1], "nslots": 4096, "epoch": 1}),
                             (Op.SLOT_SIZES, {"nslots": 4096})):
                with pytest.raises(PermissionDenied):
                    conn.call(SimpleCall(op, meta))
            # and no tenant may write on behalf of another (migrated values keep their tenant)
            with pytest.raises(PermissionDenied):
                conn.call(PutManyCall([b"forged"], [b"x"], namespace="session", ttl=None, pin=False,
                                      extra={"owner": "bob"}))
        finally:
            conn.close()
    # nobody logs in as the cluster without the secret; a tenant of that name cannot be created
    with pytest.raises(AuthError):
        open_as(INTERNAL_TENANT, internal_token("not-the-secret", name))
    with pytest.raises(AuthError):
        open_as(INTERNAL_TENANT, TENANTS["root"]["token"])
    capsys.readouterr()
    assert cli_main(["tenant", "add", f"etcd://{etcd_server.endpoint}/{name}", INTERNAL_TENANT,
                     "--token", "x" * 20, "--grant", "*=admin"]) != 0
    # with the secret: allowed
    conn = open_as(INTERNAL_TENANT, internal_token(secret, name))
    try:
        sizes = conn.call(SimpleCall(Op.SLOT_SIZES, {"nslots": 4096}))
        assert sum(sizes["values"]) > 0
    finally:
        conn.close()
    with _connect(cl.url, "bob", **tls) as b:
        assert b.get(b"forged", namespace="session") is None

    # a join moves the data node to node over TLS, as the cluster identity
    cl.add_node("n3")
    st = _settled(cl, {"n1", "n2", "n3"})
    data.check(cl.url, **tls)
    mine = [k for k in data.alice_only if st.slotmap.owners(k)[0] == "n3"]
    assert mine and _holds_some(cl.nodes["n3"], "alice", mine, "session", **tls) == len(mine)


def test_refused_push_keeps_the_slots_with_their_old_owner(etcd_server: Any, start_node: Any) -> None:
    """A joining node with a wrong cluster secret refuses the copies: its slots are never flipped to it
    uncopied (the rebalancer retries with backoff), so no value is lost; once it is gone all is as before."""
    name = f"cr{uuid.uuid4().hex[:8]}"
    _tenants_in_etcd(etcd_server, name)
    cl, data = _two_nodes_with_data(etcd_server, name, start_node, "r")
    cl.config += 'secret = "not-the-cluster-secret"\nrebalancer = false\n'
    bad = cl.add_node("n3")
    cl.wait(lambda st: "n3" in st.nodes, 30, "n3 registered")
    # the rebalancer tries (n3 appears as a pending destination) but never makes n3 an owner
    seen_pending = False
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        sm = cl.state().slotmap
        seen_pending |= any("n3" in p for p in sm.pending.values())
        assert not any("n3" in row and "n3" not in sm.pending.get(s, ()) for s, row in enumerate(sm.table))
        time.sleep(0.2)
    assert seen_pending, "the rebalancer never tried to move a slot to n3"
    data.check(cl.url)
    bad.kill()
    _settled(cl, {"n1", "n2"})
    data.check(cl.url)
