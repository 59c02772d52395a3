"""Security (issue 9), cluster path: tenants under /memkv/NAME/tenants/ in etcd, watched by nodes;
audit history and purge across every node."""

from __future__ import annotations

import json
import os
import time

import pytest

from memkv.cli import main as cli_main
from memkv.client import SyncClient
from memkv.errors import AuthError

ROOT = ["--admin", "root", "--admin-token", "root-secret-root-secret"]


def _cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _eventually(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (AssertionError, AuthError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_etcd_tenants_audit_and_purge_across_cluster(start_cluster, etcd_server, capsys):
    name = f"sec{os.getpid() % 10000}"
    url = f"etcd://{etcd_server.endpoint}/{name}"
    _cli(capsys, "tenant", "add", url, "root", "--token", "root-secret-root-secret", "--grant", "*=admin")
    _cli(capsys, "tenant", "add", url, "alice", "--token", "alice-secret-alice", "--grant", "*=rw")
    listed = json.loads(_cli(capsys, "tenant", "list", url, "--json"))
    assert {t["name"] for t in listed["tenants"]} == {"root", "alice"}
    cluster = start_cluster(2, replicas=2, name=name)
    n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
    for node in (n1, n2):
        with pytest.raises(AuthError):
            SyncClient.connect(node.url)
        with SyncClient.connect(node.url, tenant="alice", token="alice-secret-alice") as c:
            c.ping()
    # a tenant added in etcd reaches every node through the watch; a revocation too
    _cli(capsys, "tenant", "add", url, "bob", "--token", "bob-secret-bob-secret", "--grant", "session=rw")
    for node in (n1, n2):
        _eventually(lambda node=node: SyncClient.connect(node.url, tenant="bob", token="bob-secret-bob-secret").close())
    _cli(capsys, "tenant", "revoke", url, "bob")

    def bob_refused(node) -> None:
        try:
            SyncClient.connect(node.url, tenant="bob", token="bob-secret-bob-secret").close()
        except AuthError:
            return
        raise AssertionError("bob still accepted")

    for node in (n1, n2):
        _eventually(lambda node=node: bob_refused(node))
    # writes through the cluster client land on both replicas: the audit shows both nodes
    with SyncClient.connect(url, tenant="alice", token="alice-secret-alice") as c:
        c.put(b"cluster-block", b"z" * 1000, model="m-7b")
    hist = json.loads(_cli(capsys, "audit", url, "--key", "cluster-block", "--json", *ROOT))
    assert {r["node"] for r in hist} == {"n1", "n2"} and all(r["model"] == "m-7b" for r in hist)
    out = json.loads(_cli(capsys, "purge", url, "--tenant", "alice", "--json", *ROOT))
    assert out["values"] == 2 and len(out["nodes"]) == 2
    for node in (n1, n2):
        with SyncClient.connect(node.url, tenant="alice", token="alice-secret-alice") as c:
            assert c.get(b"cluster-block") is None
