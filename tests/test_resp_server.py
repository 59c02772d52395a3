"""The RESP front end with real Redis clients: redis-py, redis-cli, redis-benchmark."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from conftest import free_port, poll, wait_for_port

redis = pytest.importorskip("redis")

TENANTS = """
[tenants.alice]
token = "alice-secret"
grants = { shared = "rw", session = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { shared = "r" }
"""


@pytest.fixture
def resp_node(start_node):
    def _start(*args: str, config: str | None = None):
        port = free_port()
        node = start_node("--resp-port", str(port), *args, config=config)
        wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
        node.resp_port = port
        return node

    return _start


@pytest.fixture
def rnode(resp_node):
    return resp_node()


def client(node, **kw) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node.resp_port, socket_timeout=30, **kw)


def test_basic_commands(rnode) -> None:
    r = client(rnode)
    assert r.ping() is True
    assert r.echo(b"hi") == b"hi"
    assert r.set("k", b"v") is True
    assert r.get("k") == b"v"
    assert r.get("missing") is None
    assert r.set("k", b"v") is True  # same bytes again: idempotent
    assert r.set("k", b"v", nx=True) is None
    assert r.set("n", b"1", xx=True) is None
    assert r.mset({"a": b"1", "b": b"2"}) is True
    assert r.mget(["a", "b", "zz"]) == [b"1", b"2", None]
    assert r.exists("a", "b", "zz") == 2
    assert r.dbsize() == 3
    assert sorted(r.keys("*")) == [b"a", b"b", b"k"]
    assert sorted(r.scan_iter(match="[ab]", count=1)) == [b"a", b"b"]
    assert r.delete("a", "b", "zz") == 2
    assert r.strlen("k") == 1
    assert r.type("k") == b"string"
    info = r.info()
    assert "redis_version" in info and "db0" in info
    assert r.client_setname("tester") is True
    assert r.client_getname() == "tester" or r.client_getname() == b"tester"
    assert r.command_count() > 10
    assert "get" in r.command()
    with pytest.raises(redis.ResponseError, match="unknown command"):
        r.execute_command("LPUSH", "l", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        r.execute_command("GET")


def test_shared_namespace_is_immutable_session_is_not(rnode) -> None:
    r = client(rnode)
    r.set("blk", b"one")
    with pytest.raises(redis.ResponseError, match="different bytes"):
        r.set("blk", b"two")
    assert r.get("blk") == b"one"
    r1 = client(rnode, db=1)  # db 1 = namespace "session": overwritable
    r1.set("blk", b"one")
    r1.set("blk", b"two")
    assert r1.get("blk") == b"two"
    assert r.get("blk") == b"one"  # separate namespaces
    with pytest.raises(redis.ResponseError, match="out of range"):
        r.execute_command("SELECT", 99)


def test_expire_ttl(rnode) -> None:
    r = client(rnode, db=1)
    r.set("t", b"x", ex=100)
    assert 98 <= r.ttl("t") <= 100
    assert 98_000 <= r.pttl("t") <= 100_000
    r.set("u", b"y")
    assert r.ttl("u") == -1
    assert r.ttl("nope") == -2
    assert r.expire("u", 50) is True
    assert 48 <= r.ttl("u") <= 50
    assert r.persist("u") is True and r.ttl("u") == -1
    assert r.pexpire("u", 150) is True
    r.set("w", b"z", px=150)
    poll(lambda: r.get("u") is None and r.get("w") is None, 10, "u and w to expire")
    assert r.expire("nope", 5) is False
    r.set("v", b"1", ex=100)
    r.set("v", b"2")  # SET without EX clears the TTL (Redis semantics)
    assert r.ttl("v") == -1


def test_pipelines_and_transactions(rnode) -> None:
    r = client(rnode)
    with r.pipeline(transaction=False) as p:
        for i in range(500):
            p.set(f"p{i}", str(i).encode())
        for i in range(500):
            p.get(f"p{i}")
        out = p.execute()
    assert out[:500] == [True] * 500
    assert out[500:] == [str(i).encode() for i in range(500)]
    with r.pipeline() as p:  # MULTI/EXEC
        p.set("tx1", b"a").get("tx1").exists("tx1", "nope").delete("tx1")
        assert p.execute() == [True, b"a", 1, 1]
    with r.pipeline() as p:
        p.set("tx2", b"a")
        p.execute_command("NOPE")
        with pytest.raises(redis.ResponseError):
            p.execute()
    assert r.get("tx2") is None  # EXECABORT: nothing ran


def test_binary_values_of_several_mib(rnode) -> None:
    r = client(rnode)
    r1 = client(rnode, db=1)
    values = {f"big{i}": os.urandom(n) for i, n in enumerate([3 << 20, 5 << 20 | 17, 1, 0, 70_000])}
    for k, v in values.items():
        assert r.set(k, v) is True
    for k, v in values.items():
        assert r.get(k) == v
    assert r.mget(list(values)) == list(values.values())
    assert r.info("stats")["memkv_streamed_values"] >= 2  # received straight into region reservations
    with r1.pipeline(transaction=False) as p:
        for k, v in values.items():
            p.set(k, v)
            p.get(k)
        out = p.execute()
    assert out[1::2] == list(values.values())
    # overwrite in session with a different size, then SET GET returns the old value
    assert r1.set("big0", b"small", get=True) == values["big0"]
    assert r1.get("big0") == b"small"


def test_resp3_hello(rnode) -> None:
    r = client(rnode, protocol=3)
    r.set("h", b"v")
    assert r.get("h") == b"v"
    assert r.get("none") is None
    hello = r.execute_command("HELLO", 3)
    assert hello[b"proto"] == 3 or hello.get("proto") == 3


def test_auth_maps_to_tenants(resp_node) -> None:
    node = resp_node(config=TENANTS)
    anon = client(node)
    with pytest.raises(redis.AuthenticationError):
        anon.get("k")
    with pytest.raises(redis.AuthenticationError):
        client(node, username="alice", password="wrong").ping()
    alice = client(node, username="alice", password="alice-secret")
    assert alice.set("k", b"v") is True
    alice1 = client(node, username="alice", password="alice-secret", db=1)
    alice1.set("mine", b"secret")
    bob = client(node, password="bob-secret")  # AUTH token alone
    assert bob.get("k") == b"v"
    with pytest.raises(redis.ResponseError, match="grant"):
        bob.set("k2", b"v")
    bob1 = client(node, password="bob-secret", db=1)
    with pytest.raises(redis.ResponseError, match="grant"):
        bob1.get("mine")
    # RESP3 HELLO with AUTH
    alice3 = client(node, username="alice", password="alice-secret", protocol=3)
    assert alice3.get("k") == b"v"


def test_bad_input_never_crashes_the_node(rnode) -> None:
    for junk in [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$-7\r\n", b"*999999999999\r\n", b"$$$$\r\n\r\n\x00\xff",
                 b"*1\r\n$3\r\nabcXY", b'set "unterminated\r\n', os.urandom(5000)]:
        with socket.create_connection(("127.0.0.1", rnode.resp_port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    # truncated big SET: the connection dies mid-payload, the reservation is given back
    with socket.create_connection(("127.0.0.1", rnode.resp_port), timeout=10) as s:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$4000000\r\n" + b"x" * 100_000)
    r = client(rnode)
    assert r.ping() is True
    assert r.get("big") is None
    assert r.set("big", b"y" * 4_000_000) is True
    assert rnode.running


needs_tools = pytest.mark.skipif(shutil.which("redis-cli") is None or shutil.which("redis-benchmark") is None,
                                 reason="redis-tools not installed (scripts/bootstrap.sh installs them)")


@needs_tools
def test_redis_cli(rnode) -> None:
    def cli(*args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(rnode.resp_port), *args], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.strip()

    assert cli("PING") == "PONG"
    assert cli("SET", "c", "hello") == "OK"
    assert cli("GET", "c") == "hello"
    assert cli("--raw", "MGET", "c", "nope") == "hello"
    assert cli("TTL", "c") == "-1"
    assert "keys=1" in cli("INFO", "keyspace")
    assert "unknown command" in cli("FOO")
    piped = subprocess.run(["redis-cli", "-p", str(rnode.resp_port)], input="SET p1 a\nGET p1\nDBSIZE\n",
                           capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert piped == ["OK", "a", "2"]


@needs_tools
def test_redis_benchmark_completes_without_errors(rnode) -> None:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(rnode.resp_port), "-t", "get,set,mget", "-d", "65536", "-n", "1000",
         "-c", "8", "-q", "--csv"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "error" not in (out.stdout + out.stderr).lower()
    assert '"SET"' in out.stdout and '"GET"' in out.stdout
    # redis-benchmark has no built-in MGET test: run MGET as a custom command too
    client(rnode).mset({f"m{i}": b"v" * 65536 for i in range(10)})
    out = subprocess.run(
        ["redis-benchmark", "-p", str(rnode.resp_port), "-n", "500", "-c", "4", "-q", "--csv",
         "MGET", *[f"m{i}" for i in range(10)]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    assert rnode.running


def test_cluster_forwarding(etcd_server, start_node) -> None:
    """A plain (not cluster-aware) Redis client on any node reaches every key of the cluster."""
    import uuid

    from conftest_etcd import LocalCluster

    ports: dict[str, int] = {}

    def start_with_resp(*args: str, config: str | None = None):
        port = free_port()
        node = start_node(*args, "--resp-port", str(port), config=config)
        wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
        ports[args[args.index("--node-id") + 1]] = port
        return node

    cluster = LocalCluster(etcd_server, f"r{uuid.uuid4().hex[:8]}", start_with_resp,
                           "[cluster]\nreplicas = 1\nlease_ttl = 2\n")
    cluster.add_node("n1")
    cluster.add_node("n2")
    sm = cluster.wait_members({"n1", "n2"}).slotmap
    keys = [f"fwd{i}".encode() for i in range(60)]
    owners = {sm.owners(k)[0] for k in keys}
    assert owners == {"n1", "n2"}  # the test needs keys on both nodes
    r1 = redis.Redis(host="127.0.0.1", port=ports["n1"], socket_timeout=30)
    r2 = redis.Redis(host="127.0.0.1", port=ports["n2"], socket_timeout=30)
    deadline = time.monotonic() + 30  # nodes learn the slot map through their etcd watch
    while True:
        try:
            for k in keys:
                assert r1.set(k, k * 3) is True
            break
        except redis.ResponseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    big = os.urandom(3 << 20)
    r1.set(b"fwd-big", big)
    assert r2.get(b"fwd-big") == big and r1.get(b"fwd-big") == big
    assert r2.mget(keys) == [k * 3 for k in keys]
    assert r1.exists(*keys) == len(keys)
    with r2.pipeline() as p:
        for k in keys[:10]:
            p.get(k)
        assert p.execute() == [k * 3 for k in keys[:10]]
    # every key landed on its owner (read it with the cluster-aware memkv client)
    from memkv.client import SyncClient

    with SyncClient.connect(cluster.url) as c:
        assert c.get_many(keys) == [k * 3 for k in keys]
    assert r2.delete(*keys) == len(keys)
    assert r1.mget(keys) == [None] * len(keys)


def test_info_keyspace_counts_what_dbsize_counts(resp_node) -> None:
    """INFO keyspace and DBSIZE are one count (the node's Count/Keyspace operations): a tenant sees
    the keys visible to it in a tenant-scoped namespace, never another tenant's, and no line for a
    namespace it may not read."""
    node = resp_node(config=TENANTS + '[tenants.carol]\ntoken = "carol-secret"\ngrants = { session = "rw" }\n')

    def keys(r: redis.Redis) -> dict[str, int]:
        return {db: line["keys"] for db, line in r.info("keyspace").items()}

    alice1 = client(node, username="alice", password="alice-secret", db=1)
    for i in range(3):
        alice1.set(f"s{i}", b"v")
    client(node, username="alice", password="alice-secret").set("shared-key", b"v")
    carol1 = client(node, username="carol", password="carol-secret", db=1)
    assert alice1.dbsize() == 3 and carol1.dbsize() == 0
    assert keys(alice1) == {"db0": 1, "db1": 3}
    assert keys(carol1) == {"db1": 0}  # not alice's session keys; no grant on shared
    bob = client(node, password="bob-secret")
    assert keys(bob) == {"db0": 1}  # no grant on session
    bob1 = client(node, password="bob-secret", db=1)
    with pytest.raises(redis.ResponseError, match="grant"):
        bob1.dbsize()


DURABLE = TENANTS.replace('grants = { shared = "rw", session = "rw" }', 'grants = { shared = "rw", ctx = "rw" }') + """
[tenants.ghost]
token = "ghost-secret"
grants = { ctx = "rw" }
no_store = true
[namespaces.ctx]
pool = "session"
durability = "durable"
overwrite = true
"""


def test_resp_writes_take_the_same_path_as_binary_ones(resp_node) -> None:
    """A RESP write in a durable namespace is acknowledged once it is on disk (it survives a SIGKILL
    right after the reply); a no-store tenant's write stays in DRAM with its TTL capped, and no
    flash record names it -- the pipeline's stages, not a second implementation."""
    from memkv.flash import record as r

    node = resp_node(config=DURABLE)
    alice = client(node, username="alice", password="alice-secret", db=2)  # db 2: ctx
    ghost = client(node, username="ghost", password="ghost-secret", db=2)
    big = os.urandom(200_000)  # streamed into its reservation
    assert alice.set("d", b"durable") is True and alice.set("big", big) is True
    assert ghost.set("g", b"dram only", ex=100_000) is True
    assert 0 < ghost.ttl("g") <= 300  # [security] no_store_ttl
    node.kill()
    node.start()
    alice = client(node, username="alice", password="alice-secret", db=2)
    ghost = client(node, username="ghost", password="ghost-secret", db=2)
    assert alice.get("d") == b"durable" and alice.get("big") == big
    assert ghost.get("g") is None
    keys = {x.key for seg in (node.data_dir / "flash").glob("seg-*.log") for x in r.scan(seg.read_bytes())
            if isinstance(x, r.Record)}
    assert {b"d", b"big"} <= keys and b"g" not in keys
