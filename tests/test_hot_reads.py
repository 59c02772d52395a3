"""TCP GETs served on a connection's own thread from the client-readable index (memkv/server/hot_reads.py).

Real node processes and real sockets: the values read while a writer overwrites, deletes and
evicts the same keys are always a whole value of that key (never another key's, never torn);
tenants never reach the hot path; whatever it cannot answer (misses, values near their TTL,
other operations, bad requests) is answered by the pipeline on the same connection; and a
connection parked in the thread is still closed by the [limits] idle timeout.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from conftest import poll

from memkv.client import SyncClient
from memkv.errors import MemKVError, OutOfMemory, PermissionDenied
from memkv.errors import TimeoutError as MemKVTimeout
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op

KiB = 1024
HEAD = struct.Struct("<16sQ")


def _value(key: bytes, n: int, size: int) -> bytes:
    """Key and write number up front, then a body of one byte derived from them: a torn or foreign
    value shows as a wrong header or a body that is not uniform."""
    return HEAD.pack(key.ljust(16, b"."), n) + bytes([(n * 7 + len(key)) % 251]) * (size - HEAD.size)


def _check(key: bytes, v: bytes | bytearray | memoryview | None) -> None:
    if v is None:
        return
    v = bytes(v)
    k, n = HEAD.unpack_from(v)
    assert k == key.ljust(16, b"."), (key, k)
    body = v[HEAD.size:]
    assert body.count(bytes([(n * 7 + len(key)) % 251])) == len(body), (key, n, "torn value")


HOT = "[node]\ntcp_hot_reads = true\n"


def _hot(node) -> dict:
    with SyncClient.connect(node.url, transport="tcp") as cl:
        return cl.stats()["hot_reads"]


def test_hot_reads_never_return_a_wrong_or_torn_value(start_node):
    """Readers GET (single, into a buffer, batches) over TCP while a writer overwrites and deletes the
    same keys and fills a small region, so that freed extents are reused at once: every value read is
    a whole value of its key, and most reads were served by the hot path."""
    node = start_node("--memory", "8MiB", config=HOT)
    keys = [b"hot%d" % i for i in range(6)]
    sizes = [4 * KiB, 64 * KiB, 200 * KiB]
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0, 0]  # values, misses

    with SyncClient.connect(node.url, transport="tcp") as w:
        for i, k in enumerate(keys):
            w.put(k, _value(k, 0, sizes[i % 3]), namespace="session")

    def writer() -> None:
        try:
            with SyncClient.connect(node.url, transport="tcp") as cl:
                n = 1
                while not stop.is_set():
                    try:
                        for i, k in enumerate(keys):
                            if n % 5 == i % 5:
                                cl.delete(k, namespace="session")
                            else:
                                cl.put(k, _value(k, n, sizes[(i + n) % 3]), namespace="session")
                        cl.put(b"fill%d" % (n % 40), _value(b"fill", n, 256 * KiB), namespace="session")
                    except OutOfMemory:
                        pass  # "retry shortly": a value a reader is being sent is held back, in a small region
                    n += 1
        except BaseException as exc:
            errors.append(exc)

    def reader(which: int) -> None:
        buf = bytearray(256 * KiB)
        try:
            with SyncClient.connect(node.url, transport="tcp") as cl:
                while not stop.is_set():
                    for k in keys:
                        if which == 0:
                            v = cl.get(k, namespace="session")
                        else:
                            got = cl.get_into(k, buf, namespace="session")
                            v = None if got is None else memoryview(buf)[:got]
                        _check(k, v)
                        reads[v is None] += 1
                    for k, v in zip(keys, cl.get_many(keys, namespace="session"), strict=True):
                        _check(k, v)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader, args=(0,)),
               threading.Thread(target=reader, args=(1,))]
    for t in threads:
        t.start()
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    hot = _hot(node)
    assert reads[0] > 50 and reads[1] > 0, reads
    assert hot["served"] > 50 and hot["handed_back"] > 0 and hot["cut"] == 0, hot
    st = SyncClient.connect(node.url, transport="tcp").stats()
    assert st["corrupt"] == 0 and st["checksum_mismatches"] == 0


def test_misses_other_ops_and_near_expiry_go_through_the_pipeline(start_node):
    node = start_node(config=HOT)
    with SyncClient.connect(node.url, transport="tcp") as cl:
        cl.put(b"a", b"A" * 5000)
        cl.put(b"b", b"B" * 70_000)
        for _ in range(5):
            assert cl.get(b"a") == b"A" * 5000
        # (the first frames of a connection are the trio loop's; the thread reports once a second)
        served = poll(lambda: _hot(node)["served"] >= 3 and _hot(node)["served"], 10, "hot GETs")
        assert cl.get(b"missing") is None  # a miss: handed back, answered by the pipeline
        cl.put(b"c", b"C" * 10)  # a PUT on the same connection
        assert cl.get(b"c") == b"C" * 10
        assert cl.get_many([b"a", b"missing", b"b"]) == [b"A" * 5000, None, b"B" * 70_000]
        cl.put(b"t", b"T" * 100, namespace="session", ttl=1.0)  # within the TTL margin: the pipeline's
        assert cl.get(b"t", namespace="session") == b"T" * 100
        with pytest.raises(MemKVError):
            cl.get(b"a", namespace="no-such-namespace")
        assert cl.get(b"a") == b"A" * 5000
        time.sleep(1.3)
        assert cl.get(b"t", namespace="session") is None
        for _ in range(40):  # (after frames it had to hand back, a connection waits a few on the trio loop)
            assert cl.get(b"a") == b"A" * 5000
        hot = cl.stats()["hot_reads"]  # (the thread hands STATS back with what it served)
        assert hot["served"] > served and hot["handed_back"] >= 4 and hot["threads"] <= 1, hot


def test_the_hot_path_is_off_by_default(start_node):
    node = start_node()
    with SyncClient.connect(node.url, transport="tcp") as cl:
        cl.put(b"a", b"A" * 5000)
        for _ in range(5):
            assert cl.get(b"a") == b"A" * 5000
        assert "hot_reads" not in cl.stats()


TENANTS = HOT + """
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.alice]
token = "alice-secret"
grants = { session = "rw", shared = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { session = "rw" }
"""


def test_tenants_never_take_the_hot_path(start_node):
    """With tenants every GET passes the pipeline's login, revocation, rate and grant checks: a tenant
    reads its own scope only, and the hot path serves nothing."""
    node = start_node(config=TENANTS)
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret", transport="tcp") as a, \
            SyncClient.connect(node.url, tenant="bob", token="bob-secret", transport="tcp") as b:
        a.put(b"secret", b"alice only")
        a.put(b"same", b"alice's", namespace="session")
        for _ in range(5):
            assert a.get(b"same", namespace="session") == b"alice's"
            assert b.get(b"same", namespace="session") is None
            with pytest.raises(PermissionDenied):
                b.get(b"secret")
        b.put(b"same", b"bob's", namespace="session")
        for _ in range(5):
            assert b.get(b"same", namespace="session") == b"bob's"
            assert a.get(b"same", namespace="session") == b"alice's"
    with SyncClient.connect(node.url, tenant="root", token="root-secret", transport="tcp") as r:
        hot = r.stats()["hot_reads"]
    assert hot["served"] == 0 and hot["threads"] == 0, hot


def _read_frame(s: socket.socket, r: c.FrameReader, timeout: float) -> c.Frame | None:
    s.settimeout(timeout)
    while True:
        f = r.next_frame()
        if isinstance(f, c.Frame):
            return f
        try:
            data = s.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            return None
        if not data:
            return None
        r.feed(data)


def test_idle_timeout_closes_a_connection_parked_in_the_hot_thread(start_node):
    node = start_node(config=HOT + '[limits]\nidle_timeout = "1s"\n')
    with SyncClient.connect(node.url, transport="tcp") as cl:
        cl.put(b"k", b"v" * 100)
    s = socket.create_connection((node.host, node.port), timeout=5)
    r = c.FrameReader()
    for rid in range(1, 6):
        s.sendall(c.encode_frame(Op.GET, rid, {"k": b"k"}))
        f = _read_frame(s, r, 5)
        assert f is not None and not f.is_error and f.request_id == rid and f.payload == b"v" * 100
    poll(lambda: _hot(node)["served"] >= 3, 10, "hot GETs")  # the connection now waits on the thread
    t0 = time.monotonic()
    f = _read_frame(s, r, 10)
    assert f is not None and f.is_error and f.meta["code"] == MemKVTimeout.code and "idle" in f.meta["msg"], f
    assert time.monotonic() - t0 < 8
    assert _read_frame(s, r, 5) is None  # then closed
    s.close()
    assert _hot(node)["threads"] == 0


def test_an_extent_being_sent_is_not_reused(start_node):
    """A reply the client reads slowly: while the node's hot thread is still sending a value, a writer
    overwrites the key again and again (the allocator would hand the old value's extent to the next
    write at once). The reply is the old value whole, or the connection is cut if it took longer than
    the node may keep the extent; never a value overwritten in the middle."""
    MiB = 1 << 20
    node = start_node("--memory", "64MiB", config=HOT)
    with SyncClient.connect(node.url, transport="tcp") as w:
        w.put(b"big", _value(b"big", 0, 8 * MiB), namespace="session")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)  # the node's send blocks on us
        s.connect((node.host, node.port))
        s.settimeout(10)

        def reply(rid: int, pause=None) -> bytes | None:
            s.sendall(c.encode_frame(Op.GET, rid, {"k": b"big", "ns": "session"}))
            buf = bytearray()
            need = None
            while need is None or len(buf) < need:
                if pause is not None and len(buf) >= 64 * KiB:
                    pause()
                    pause = None
                data = s.recv(1 << 20)
                if not data:
                    return None
                buf += data
                if need is None and len(buf) >= c.HEADER_SIZE:
                    h = c.parse_header(memoryview(buf), c.DEFAULT_LIMITS)
                    need = c.HEADER_SIZE + h.meta_len + h.payload_len
            r = c.FrameReader()
            r.feed(buf)
            f = r.next_frame()
            assert isinstance(f, c.Frame) and not f.is_error and f.request_id == rid, f
            return bytes(f.payload)

        for rid in range(1, 4):
            _check(b"big", reply(rid))
        poll(lambda: _hot(node)["served"] >= 1, 10, "hot GETs")  # this connection now reads on the thread

        def overwrite() -> None:
            for n in range(1, 6):
                try:
                    w.put(b"big", _value(b"big", n, 8 * MiB), namespace="session")
                except MemKVError:
                    pass  # OutOfMemory "retry shortly": the extent being sent is held back

        v = reply(9, overwrite)
        if v is not None:
            _check(b"big", v)
            assert HEAD.unpack_from(v)[1] == 0  # the value as it was when the GET was read
        s.close()
    hot = poll(lambda: (h := _hot(node))["threads"] == 0 and h, 10, "the thread gone with its connection")
    assert hot["served"] >= 1 and (v is not None or hot["cut"] == 1), hot
