"""Transport conformance: the same suite against TCP, shared memory and RDMA (docs/transports.md).

``transport`` is a parameter; each test checks that the transport it asked
for really carried the reads (``client.onesided`` counters, the node's
``bytes_out``). RDMA needs pyverbs and an RDMA device: it runs for real in the
Soft-RoCE VM (``make test-rdma``) and is skipped elsewhere with the reason.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import trio

from memkv.client import Client, SyncClient
from memkv.client.core import onesided as onesided_mod
from memkv.client.core.calls import SimpleCall
from memkv.errors import InvalidArgument, PermissionDenied
from memkv.protocol.opcodes import Op
from memkv.transport import pyverbs_available, rdma_devices

KiB, MiB = 1024, 1024 * 1024
# Node start-up takes longer in the emulated Soft-RoCE guest (TCG + 9p): the harness raises this.
START_TIMEOUT = float(os.environ.get("MEMKV_NODE_START_TIMEOUT", "15"))


@pytest.fixture
def start_node(tmp_path_factory: pytest.TempPathFactory):
    """conftest's factory, with ``START_TIMEOUT``."""
    from conftest import NodeProc

    nodes: list[NodeProc] = []

    def _start(*args: str, config: str | None = None) -> NodeProc:
        workdir = tmp_path_factory.mktemp("node")
        extra = [str(a) for a in args]
        if config is not None:
            (workdir / "memkv.toml").write_text(config)
            extra = ["--config", str(workdir / "memkv.toml"), *extra]
        node = NodeProc(extra, workdir)
        nodes.append(node)
        return node.start(START_TIMEOUT)

    yield _start
    for node in nodes:
        node.kill()


@pytest.fixture
def memkv_node(start_node):
    return start_node()
SIZES = [0, 1, 4 * KiB + 3, 1 * MiB + 1]


def _rdma_skip_reason() -> str | None:
    if not pyverbs_available():
        return "pyverbs not importable (Debian python3-pyverbs); RDMA runs for real in `make test-rdma`"
    if not rdma_devices():
        return "no RDMA device (no NIC, no rdma_rxe); RDMA runs for real in `make test-rdma`"
    return None


TRANSPORTS = ["tcp", "shm", "rdma"]
ONESIDED = ["shm", "rdma"]


@pytest.fixture(autouse=True)
def _no_inline(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The conformance suite checks that bytes really travel one-sided: no inline replies."""
    if "inline" not in request.node.name:
        monkeypatch.setattr(onesided_mod, "INLINE_MAX", 0)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "rdma":
        why = _rdma_skip_reason()
        if why:
            pytest.skip(why)
    return request.param


@pytest.fixture(params=ONESIDED)
def onesided(request: pytest.FixtureRequest) -> str:
    if request.param == "rdma":
        why = _rdma_skip_reason()
        if why:
            pytest.skip(why)
    return request.param


def _values(prefix: bytes) -> dict[bytes, bytes]:
    return {prefix + str(n).encode(): os.urandom(n) for n in SIZES}


def _node_of(c):
    return c.router.replicas(b"x")[0]


def _check_carried(c, transport: str, before_out: int) -> None:
    """The reads went the way the test asked."""
    st = c.stats()
    if transport == "tcp":
        assert c.onesided is None
        assert st["server"]["bytes_out"] > before_out
    else:
        assert c.onesided.transport_of(_node_of(c)) == transport
        assert c.onesided.counters["onesided"] > 0
        assert c.onesided.counters["tcp"] == 0
        assert st["server"]["bytes_out"] == before_out  # no payload from the node: one-sided


def test_conformance_sync(memkv_node, transport):
    with SyncClient.connect(memkv_node.url, transport=transport) as c:
        vals = _values(b"s")
        c.put_many(vals)
        out0 = c.stats()["server"]["bytes_out"]
        for k, v in vals.items():
            assert c.get(k) == v
            buf = bytearray(len(v) + 10)
            assert c.get_into(k, buf) == len(v)
            assert bytes(buf[: len(v)]) == v
        keys = [*vals, b"missing", *vals]
        assert c.get_many(keys) == [*vals.values(), None, *vals.values()]
        bufs = [np.zeros(len(v) + 1, dtype=np.uint8) for v in vals.values()]
        assert c.get_many_into(list(vals), bufs) == [len(v) for v in vals.values()]
        for b, v in zip(bufs, vals.values(), strict=True):
            assert b[: len(v)].tobytes() == v
        assert c.get(b"missing") is None
        assert c.get_into(b"missing", bytearray(1)) is None
        assert c.get_many([]) == []
        c.put(b"ns-key", b"in session", namespace="session")
        assert c.get(b"ns-key", namespace="session") == b"in session"
        assert c.get(b"ns-key") is None
        _check_carried(c, transport, out0)
        with pytest.raises(InvalidArgument):
            c.get_into(b"s" + str(MiB + 1).encode(), bytearray(10))
        with pytest.raises(InvalidArgument):
            c.get_many_into([b"s1"], [])


async def test_conformance_trio(memkv_node, transport):
    async with Client.connect(memkv_node.url, transport=transport) as c:
        vals = _values(b"t")
        await c.put_many(vals)
        st = await c.stats()
        out0 = st["server"]["bytes_out"]

        async def reader(k: bytes, v: bytes) -> None:
            for _ in range(3):
                assert await c.get(k) == v
                buf = bytearray(len(v))
                assert await c.get_into(k, buf) == len(v) and bytes(buf) == v

        async with trio.open_nursery() as n:
            for k, v in vals.items():
                n.start_soon(reader, k, v)
        assert await c.get_many([*vals, b"nope"]) == [*vals.values(), None]
        bufs = [bytearray(len(v)) for v in vals.values()]
        assert await c.get_many_into(list(vals), bufs) == [len(v) for v in vals.values()]
        assert [bytes(b) for b in bufs] == list(vals.values())
        st = await c.stats()
        if transport == "tcp":
            assert st["server"]["bytes_out"] > out0
        else:
            assert c.onesided.transport_of(_node_of(c)) == transport
            assert c.onesided.counters["onesided"] >= 4 * 6 and c.onesided.counters["tcp"] == 0
            assert st["server"]["bytes_out"] == out0


def test_many_values_batched(memkv_node, transport):
    with SyncClient.connect(memkv_node.url, transport=transport) as c:
        vals = {f"b{i}".encode(): os.urandom(1000 + i) for i in range(200)}
        c.put_many(vals)
        locates = c.onesided.counters["locates"] if c.onesided else 0
        assert c.get_many(list(vals)) == list(vals.values())
        if c.onesided is not None:
            assert c.onesided.counters["locates"] == locates + 1  # one LOCATE for the whole batch


# -- verification and fallback (one-sided transports only) ---------------------------------------------

def test_checksum_mismatch_retries_over_tcp_and_reports(memkv_node, onesided):
    with SyncClient.connect(memkv_node.url, transport=onesided) as c:
        marker = os.urandom(64)
        c.put(b"victim", marker + os.urandom(100_000))
        c.put(b"ok", b"fine")
        assert c.get(b"ok") == b"fine"
        path = c.stats()["region"]["path"]
        with open(path, "r+b") as f:
            data = f.read()
            off = data.find(marker)
            f.seek(off + 5000)
            f.write(b"\xff" if data[off + 5000] != 0xFF else b"\x00")
        assert c.get(b"victim") is None  # one-sided copy mismatched -> TCP -> mismatch -> miss, reported
        assert c.onesided.counters["mismatch"] >= 1 and c.onesided.counters["tcp"] >= 1
        assert c.stats()["corrupt"] == 1
        assert c.get_many([b"victim", b"ok"]) == [None, b"fine"]


def test_late_copy_is_not_trusted(memkv_node, onesided, monkeypatch):
    """A copy that ends after the validity window (generation no longer guaranteed) goes over TCP."""
    with SyncClient.connect(memkv_node.url, transport=onesided) as c:
        c.put(b"k", b"v" * 5000)
        assert c.get(b"k") == b"v" * 5000
        monkeypatch.setattr(onesided_mod, "SAFETY", 0.0)
        out0 = c.stats()["server"]["bytes_out"]
        assert c.get(b"k") == b"v" * 5000
        assert c.get_many([b"k", b"k"]) == [b"v" * 5000] * 2
        assert c.onesided.counters["mismatch"] == 3 and c.onesided.counters["tcp"] == 3
        assert c.stats()["server"]["bytes_out"] == out0 + 3 * 5000


def test_freed_extent_is_quarantined_not_recycled(memkv_node, onesided):
    """A descriptor handed out by LOCATE never points at another value's bytes during the grace period."""
    with SyncClient.connect(memkv_node.url, transport=onesided) as c:
        node = _node_of(c)
        old = os.urandom(64 * KiB)
        c.put(b"q", old)
        rep = c.execute(c.core.call(node, SimpleCall(Op.LOCATE, {"ks": [b"q"], "lease": 1.0})))
        off, n, cs, gen = rep["d"][0]
        assert rep["valid"] > 0 and n == len(old)
        assert c.delete(b"q")
        for i in range(20):  # same size: would take the freed extent if it were not quarantined
            c.put(f"q{i}".encode(), os.urandom(64 * KiB))
        with open(c.stats()["region"]["path"], "rb") as f:
            f.seek(off)
            assert f.read(n) == old
        rep2 = c.execute(c.core.call(node, SimpleCall(Op.LOCATE, {"ks": [b"q0"]})))
        assert rep2["d"][0][0] != off and rep2["d"][0][3] > gen
        assert c.stats()["region"]["quarantined"] >= 64 * KiB


def test_node_restart_remaps(start_node, onesided):
    node = start_node()
    with SyncClient.connect(node.url, transport=onesided) as c:
        c.put(b"a", b"1" * 100)
        assert c.get(b"a") == b"1" * 100
        first = c.onesided.nodes[_node_of(c)].region_id
        node.stop()
        node.start(START_TIMEOUT)
        for _ in range(3):  # the first calls may see the dead connection
            try:
                c.put(b"a", b"2" * 100)
                break
            except Exception:
                pass
        assert c.get(b"a") == b"2" * 100
        assert c.get(b"a") == b"2" * 100
        t = c.onesided.nodes.get(_node_of(c))
        assert t is not None and t.region_id != first


def test_rdma_failure_falls_back_to_tcp(memkv_node):
    why = _rdma_skip_reason()
    if why:
        pytest.skip(why)
    with SyncClient.connect(memkv_node.url, transport="rdma") as c:
        c.put_many({b"r1": b"x" * 70_000, b"r2": b"y" * 10})
        assert c.get(b"r1") == b"x" * 70_000
        ch = c.onesided.nodes[_node_of(c)]
        assert ch.kind == "rdma"
        ch.rkey ^= 0x5A5A  # a bad rkey: the READ completes with a remote access error
        assert c.get_many([b"r1", b"r2"]) == [b"x" * 70_000, b"y" * 10]
        assert c.onesided.counters["rdma_errors"] == 1
        assert c.get(b"r2") == b"y" * 10  # a fresh queue pair
        assert c.onesided.transport_of(_node_of(c)) == "rdma"


# -- choosing the transport ----------------------------------------------------------------------------

def test_auto_picks_shm_on_the_same_host(memkv_node):
    with SyncClient.connect(memkv_node.url) as c:  # transport="auto"
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v"
        assert c.onesided.transport_of(_node_of(c)) == "shm"


def test_other_host_falls_back_to_tcp(memkv_node, monkeypatch):
    monkeypatch.setattr(onesided_mod, "host_identity", lambda: "another-host/1")
    monkeypatch.setattr(onesided_mod, "rdma_devices", lambda: [])
    with SyncClient.connect(memkv_node.url, transport="shm") as c:
        c.put(b"k", b"v" * 100)
        assert c.get(b"k") == b"v" * 100
        assert c.onesided.transport_of(_node_of(c)) == "tcp"


TENANTS = """
[tenants.alice]
token = "alice-secret"
grants = { shared = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { session = "r" }
"""


def test_tenants_keep_reads_on_tcp(start_node):
    """A region mapping shows every tenant's bytes: with tenants, reads stay on TCP (ACL per request)."""
    node = start_node(config=TENANTS)
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a:
        a.put(b"secret", b"alice only")
        assert a.get(b"secret") == b"alice only"
        assert a.onesided.transport_of(_node_of(a)) == "tcp"
    with SyncClient.connect(node.url, tenant="bob", token="bob-secret") as b:
        with pytest.raises(PermissionDenied):
            b.get(b"secret")


# -- the region file: nothing left behind ----------------------------------------------------------------

def _shm_files(pids: list[int]) -> set[str]:
    """Region files of these node processes (``memkv-NAME-PID-RAND.region``): /dev/shm is shared with
    every other process of the machine, whose nodes may be starting meanwhile."""
    return {f for f in os.listdir("/dev/shm") if f.startswith("memkv-") and any(f"-{p}-" in f for p in pids)}


def test_sigkill_leaves_nothing_in_dev_shm(start_node):
    nodes = [start_node() for _ in range(2)]
    pids = [n.pid for n in nodes]
    with SyncClient.connect(nodes[0].url) as c:
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v"
        assert c.onesided.transport_of(_node_of(c)) == "shm"
    assert _shm_files(pids) == set()  # unlinked right after mapping
    for n in nodes:
        os.kill(n.pid, signal.SIGKILL)
        n.kill()
    assert _shm_files(pids) == set()


def test_stale_region_files_of_dead_nodes_are_swept(start_node):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"/dev/shm/memkv-old-node-{dead.pid}-deadbeef.region"
    with open(stale, "wb") as f:
        f.write(b"x" * 4096)
    try:
        start_node()
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.unlink(stale)


def test_small_values_come_inline_large_ones_one_sided(memkv_node, onesided):
    small, large = os.urandom(1000), os.urandom(onesided_mod.INLINE_MAX + 1)
    with SyncClient.connect(memkv_node.url, transport=onesided) as c:
        c.put(b"small", small)
        c.put(b"large", large)
        c.put(b"empty", b"")
        assert c.get(b"small") == small and c.get(b"large") == large and c.get(b"empty") == b""
        bufs = [bytearray(len(large)) for _ in range(3)]
        assert c.get_many_into([b"small", b"large", b"empty"], bufs) == [len(small), len(large), 0]
        assert bufs[0][: len(small)] == small and bufs[1] == large
        counters = c.onesided.counters
        assert counters["inline"] == 4 and counters["onesided"] == 2 and counters["tcp"] == 0
        with pytest.raises(InvalidArgument):  # a buffer too small for an inline value: the typed error
            c.get_into(b"small", bytearray(10))
