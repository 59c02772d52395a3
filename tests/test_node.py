"""A real node process on loopback, driven through both clients."""

from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np
import pytest
import trio
from conftest import poll

from memkv.client import Client, SyncClient
from memkv.errors import (
    AuthError,
    KeyExists,
    KeyTooLarge,
    MemKVError,
    PermissionDenied,
    ProtocolError,
)
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Flag, Op

TENANTS = """
[pools.session]
tenant_quota = "4MiB"
[tenants.alice]
token = "alice-secret"
grants = { session = "rw", shared = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { session = "rw", shared = "r" }
"""


def test_every_operation_sync(memkv_node):
    with SyncClient.connect(memkv_node.url) as c:
        assert c.get(b"missing") is None
        c.put(b"k1", b"v1")
        assert c.get(b"k1") == b"v1"
        assert c.get("k1") == b"v1"  # str keys are utf-8
        big = os.urandom(3 * 1024 * 1024 + 17)
        c.put(b"big", big)
        buf = bytearray(len(big) + 100)
        assert c.get_into(b"big", buf) == len(big)
        assert buf[: len(big)] == big
        arr = np.zeros(len(big), dtype=np.uint8)
        assert c.get_into(b"big", arr) == len(big) and arr.tobytes() == big
        items = [(f"m{i}".encode(), os.urandom(1000 + i)) for i in range(40)]
        c.put_many(items)
        keys = [k for k, _ in items]
        assert c.get_many([*keys, b"nope"]) == [v for _, v in items] + [None]
        bufs = [bytearray(2000) for _ in keys]
        assert c.get_many_into(keys, bufs) == [len(v) for _, v in items]
        assert all(b[: len(v)] == v for b, (_, v) in zip(bufs, items, strict=True))
        assert c.exists_many([b"k1", b"zz", b"m3"]) == [True, False, True]
        assert c.lookup_prefix([b"m0", b"m1", b"m2", b"gap", b"m3"]) == 3
        assert c.pin([b"m0", b"nope"], ttl=30) == 1
        assert c.unpin([b"m0"]) == 1
        assert c.delete(b"k1") is True
        assert c.delete(b"k1") is False
        assert c.get(b"k1") is None
        # Blocks are immutable in "shared": a different value for the same key is refused...
        with pytest.raises(KeyExists):
            c.put(b"m0", b"other bytes")
        c.put(b"m0", items[0][1])  # ...while re-putting the same bytes is fine.
        # "session" allows overwrite and TTL.
        c.put(b"s", b"one", namespace="session")
        c.put(b"s", b"two", namespace="session", ttl=30)
        assert c.get(b"s", namespace="session") == b"two"
        assert c.get(b"s") is None  # namespaces are separate key spaces
        st = c.stats()
        assert st["entries"] >= 40 and st["region"]["size"] == 64 * 1024**2
        assert "fragmentation" in st["region"]
        assert c.ping()


async def test_every_operation_trio(memkv_node):
    async with Client.connect(memkv_node.url) as c:
        await c.put(b"t1", b"hello")
        assert await c.get(b"t1") == b"hello"
        buf = bytearray(10)
        assert await c.get_into(b"t1", buf) == 5 and buf[:5] == b"hello"
        await c.put_many({b"a": b"1", b"b": b"22"})
        assert await c.get_many([b"a", b"x", b"b"]) == [b"1", None, b"22"]
        assert await c.get_many_into([b"a", b"b"], [bytearray(1), bytearray(2)]) == [1, 2]
        assert await c.exists_many([b"a", b"x"]) == [True, False]
        assert await c.lookup_prefix([b"a", b"b", b"x"]) == 2
        assert await c.pin([b"a"]) == 1 and await c.unpin([b"a"]) == 1
        assert await c.delete(b"a") is True
        assert (await c.stats())["entries"] >= 2

        # Many tasks multiplexed over the client's connections.
        async def worker(i: int) -> None:
            v = os.urandom(5000 + i)
            await c.put(f"w{i}", v)
            assert await c.get(f"w{i}") == v

        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(worker, i)


def test_ttl_expires(memkv_node):
    with SyncClient.connect(memkv_node.url) as c:
        # the first "auto" GET maps the node's region (0.3-0.4 s on a loaded machine, longer
        # than a short TTL): set the transport up before the clock of the TTL starts
        assert c.get(b"not-there") is None
        c.put(b"short", b"x", ttl=1.0)
        assert c.get(b"short") == b"x"
        poll(lambda: c.get(b"short") is None, 10, "the TTL to expire")


def test_torch_tensor_buffers(memkv_node):
    torch = pytest.importorskip("torch")
    with SyncClient.connect(memkv_node.url) as c:
        t = torch.randn(64, 128, dtype=torch.bfloat16)
        c.put(b"tensor", t)
        out = torch.empty_like(t)
        assert c.get_into(b"tensor", out) == t.numel() * 2
        assert torch.equal(out, t)


def test_corrupt_value_in_region_is_a_miss_and_reported(memkv_node):
    with SyncClient.connect(memkv_node.url) as c:
        marker = os.urandom(64)
        value = marker + os.urandom(100_000)
        c.put(b"victim", value)
        c.put(b"bystander", b"safe")
        path = c.stats()["region"]["path"]
        with open(path, "r+b") as f:
            data = f.read()
            off = data.find(marker)
            assert off >= 0
            f.seek(off + 5000)
            f.write(b"\xff" if data[off + 5000] != 0xFF else b"\x00")
        assert c.get(b"victim") is None
        assert c.get_many([b"victim", b"bystander"]) == [None, b"safe"]
        st = c.stats()
        assert st["corrupt"] == 1  # the node re-verified and dropped it
        assert c.exists_many([b"victim"]) == [False]


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _read_frame(s: socket.socket) -> c.Frame:
    reader = c.FrameReader()
    while True:
        f = reader.next_frame()
        if isinstance(f, c.Frame):
            return f
        data = s.recv(65536)
        assert data, "node closed the connection without a reply"
        reader.feed(data)


def test_malformed_frames_get_typed_errors_and_node_keeps_serving(memkv_node):
    # Garbage: a typed error reply, then that connection (only) closes.
    s = _raw(memkv_node.port)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 32)
    f = _read_frame(s)
    assert f.is_error and f.meta["code"] == ProtocolError.code
    assert s.recv(10) == b""
    # Oversized key and wrong field types: typed errors, connection stays usable.
    s = _raw(memkv_node.port)
    s.sendall(c.encode_frame(Op.GET, 1, {"k": b"x" * 100_000}))
    f = _read_frame(s)
    assert f.is_error and f.meta["code"] == KeyTooLarge.code
    s.sendall(c.encode_frame(Op.PUT, 2, {"k": 42, "cs": "no"}, b"payload"))
    f = _read_frame(s)
    assert f.is_error and f.meta["code"] == ProtocolError.code
    s.sendall(c.encode_frame(Op.PING, 3, {}))
    f = _read_frame(s)
    assert f.request_id == 3 and not f.is_error
    # A frame header announcing a huge payload is refused before any allocation.
    s = _raw(memkv_node.port)
    s.sendall(c.HEADER.pack(c.MAGIC, c.VERSION, Op.PUT, 0, 0, 9, 0, 1 << 40))
    f = _read_frame(s)
    assert f.is_error and f.meta["code"] in (c.FrameTooLarge.code,)
    # A PUT whose checksum does not match its bytes is refused, nothing stored.
    s = _raw(memkv_node.port)
    s.sendall(c.encode_frame(Op.PUT, 4, {"k": b"bad", "cs": 12345}, b"payload"))
    f = _read_frame(s)
    assert f.is_error and f.meta["code"] == 13
    # The node is alive and well for everyone else.
    with SyncClient.connect(memkv_node.url) as cl:
        cl.put(b"after", b"ok")
        assert cl.get(b"after") == b"ok" and cl.get(b"bad") is None


def test_response_flag_from_client_is_rejected(memkv_node):
    s = _raw(memkv_node.port)
    s.sendall(c.encode_frame(Op.GET, 1, {"k": b"a"}, flags=Flag.RESPONSE))
    assert _read_frame(s).is_error


def test_truncated_frame_then_disconnect_does_not_leak_or_crash(memkv_node):
    for cut in (5, 30, 60):
        s = _raw(memkv_node.port)
        frame = c.encode_frame(Op.PUT, 1, {"k": b"half", "cs": 0}, b"z" * 1000)
        s.sendall(frame[:cut])
        s.close()
    with SyncClient.connect(memkv_node.url) as cl:
        assert cl.get(b"half") is None
        assert cl.stats()["region"]["used"] == 0


def test_auth_and_acls(start_node):
    node = start_node(config=TENANTS)
    with pytest.raises(AuthError):
        SyncClient.connect(node.url)  # unauthenticated ping is refused... stats/ops need auth
    with pytest.raises(AuthError):
        SyncClient.connect(node.url, tenant="alice", token="wrong")
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a, \
            SyncClient.connect(node.url, tenant="bob", token="bob-secret") as b:
        a.put(b"sys-prompt", b"shared block")
        assert b.get(b"sys-prompt") == b"shared block"
        with pytest.raises(PermissionDenied):
            b.put(b"bob-shared", b"x")
        a.put(b"conv", b"alice private", namespace="session")
        assert b.get(b"conv", namespace="session") is None  # invisible, a plain miss
        b.put(b"conv", b"bob private", namespace="session")
        assert a.get(b"conv", namespace="session") == b"alice private"


def test_session_flood_cannot_touch_shared_or_pinned(start_node):
    node = start_node("--memory", "32MiB", config=TENANTS)
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as a, \
            SyncClient.connect(node.url, tenant="bob", token="bob-secret") as b:
        shared = {f"sys{i}".encode(): os.urandom(256 * 1024) for i in range(8)}
        a.put_many(shared)
        b.put(b"bob-pinned", os.urandom(512 * 1024), namespace="session", pin=True)
        bob_kept = os.urandom(256 * 1024)
        b.put(b"bob-other", bob_kept, namespace="session")
        # Alice floods her session pool far beyond her 4 MiB quota.
        for i in range(200):
            a.put(f"flood{i}".encode(), os.urandom(128 * 1024), namespace="session")
        assert a.get_many(list(shared)) == list(shared.values())
        assert b.get(b"bob-pinned", namespace="session") is not None
        assert b.get(b"bob-other", namespace="session") == bob_kept
        st = a.stats()
        assert st["pools"]["session"]["tenants"]["alice"] <= 4 * 1024 * 1024
        assert st["pools"]["session"]["evictions"] > 0
        assert st["pools"]["shared"]["evictions"] == 0


def test_lookup_prefix_lease_holds_off_eviction(start_node):
    # The session pool (LRU) of a 16 MiB node holds ~6.4 MiB: the chain plus a few fillers.
    node = start_node("--memory", "16MiB")
    block = 1024 * 1024
    ns = "session"
    with SyncClient.connect(node.url) as c:
        chain = [f"chain{i}".encode() for i in range(4)]
        c.put_many([(k, os.urandom(block)) for k in chain], parents=[None, *chain[:-1]], namespace=ns)
        assert c.lookup_prefix(chain, lease=2.0, namespace=ns) == 4
        # Without the lease the chain (least recently used) would go first.
        for i in range(12):
            c.put(f"filler{i}".encode(), os.urandom(block), namespace=ns)
        assert c.exists_many(chain, namespace=ns) == [True] * 4
        time.sleep(2.5)  # the lease expires
        for i in range(12, 24):
            c.put(f"filler{i}".encode(), os.urandom(block), namespace=ns)
        assert c.exists_many(chain, namespace=ns) == [False] * 4


def test_eviction_takes_chain_tail_before_head(start_node):
    node = start_node("--memory", "16MiB")
    block = 1024 * 1024
    with SyncClient.connect(node.url) as c:
        chain = [f"c{i}".encode() for i in range(6)]
        c.put_many([(k, os.urandom(block)) for k in chain], parents=[None, *chain[:-1]])
        for i in range(5):
            c.put(f"f{i}".encode(), os.urandom(block))
        present = c.exists_many(chain)
        # Whatever was evicted, what remains is a prefix: no gaps.
        n = present.count(True)
        assert present == [True] * n + [False] * (len(chain) - n)
        assert n < len(chain)


def test_500_concurrent_clients(memkv_node):
    async def main() -> None:
        async def one(i: int) -> None:
            async with Client.connect(memkv_node.url, timeout=30) as cl:
                v = struct.pack("<I", i) * 256
                await cl.put(f"cc{i}", v)
                assert await cl.get(f"cc{i}") == v
                assert await cl.exists_many([f"cc{i}"]) == [True]

        with trio.fail_after(90):
            async with trio.open_nursery() as n:
                for i in range(500):
                    n.start_soon(one, i)

    trio.run(main)


def test_dead_node_is_a_fast_typed_failure(start_node):
    node = start_node()
    c = SyncClient.connect(node.url, timeout=2)
    c.put(b"x", b"y")
    node.kill()
    t0 = time.monotonic()
    with pytest.raises(MemKVError):
        c.get(b"x")
    assert time.monotonic() - t0 < 5  # bounded by the timeout, never a hang (not a speed assertion)
    c.close()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_batches_longer_than_one_request_are_split(memkv_node, transport):
    """A node refuses a request naming more than 4096 keys (``BatchTooLarge``); the client's batch
    methods take any number of keys and send them in requests the node accepts."""
    n = 3 * 4096 + 5
    keys = [f"b{i}".encode() for i in range(n)]
    with SyncClient.connect(memkv_node.url, transport=transport) as c:
        c.put_many([(k, k * 3) for k in keys[:-1]], parents=[None] * (n - 1))
        assert c.get_many(keys) == [k * 3 for k in keys[:-1]] + [None]
        bufs = [bytearray(32) for _ in keys]
        assert c.get_many_into(keys, bufs) == [3 * len(k) for k in keys[:-1]] + [None]
        assert all(b[: 3 * len(k)] == k * 3 for b, k in zip(bufs[:-1], keys, strict=False))
        assert c.exists_many(keys) == [True] * (n - 1) + [False]
        assert c.lookup_prefix(keys) == n - 1
        assert c.pin(keys, ttl=30) == n - 1
        assert c.unpin(keys) == n - 1
