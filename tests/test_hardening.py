"""Issue 9 item 7 (hardening): resource limits with real node processes, and a fuzzed live node.

Each refusal of ``[limits]`` (memkv/server/limits.py) is exercised over raw sockets:
max connections (binary and RESP), per-connection and per-tenant in-flight bytes,
a client that pipelines without reading, idle / partial-frame / slow-payload timeouts.
The RESP front end goes through the same audit, rate-limit and revocation hooks as the
binary protocol. Then a node is fuzzed (hypothesis; atheris if installed) with random
and mutated frames over many connections: it must never die, hang or log a traceback,
and every value written before the fuzzing must still read back intact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from conftest import free_port, poll, wait_for_port
from fuzz.live_node import send_and_read
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv.client import SyncClient
from memkv.client.executors.blocking_connection import BlockingConnection
from memkv.client.url import parse_url
from memkv.engine.checksum import checksum
from memkv.errors import ResourceLimit, TooManyConnections
from memkv.errors import TimeoutError as MemKVTimeout
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.tools.admin import admin_call

# --------------------------------------------------------------------------------------- helpers


def _raw(node, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((node.host, node.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_frame(s: socket.socket, timeout: float = 5.0) -> c.Frame | None:
    """The next frame, or None at EOF/reset."""
    s.settimeout(timeout)
    r = c.FrameReader()
    while True:
        f = r.next_frame()
        if isinstance(f, c.Frame):
            return f
        try:
            data = s.recv(1 << 20)
        except ConnectionResetError:
            return None
        if not data:
            return None
        r.feed(data)


def _wait_closed(s: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed ``s`` (reading and dropping whatever it sends)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def _pong(s: socket.socket) -> c.Frame | None:
    """The node's answer to a PING on ``s`` (an error frame, or None once it closed)."""
    s.sendall(c.encode_frame(Op.PING, 7, {}))
    return _read_frame(s)


def _ping(s: socket.socket) -> dict:
    f = _pong(s)
    assert f is not None and not f.is_error, f
    return f.meta


def _put_frame(key: bytes, value: bytes, rid: int = 1, ns: str = "shared") -> bytes:
    return c.encode_frame(Op.PUT, rid, {"k": key, "cs": checksum(value), "ns": ns}, value)


def _admitted(node) -> socket.socket | None:
    """A raw connection the node admitted (answers PING), or None if it refused it."""
    s = _raw(node)
    f = _pong(s)
    if f is not None and not f.is_error:
        return s
    s.close()
    return None


def _audit_of(addr, key: bytes, n: int) -> list[dict] | None:
    """The audit records of ``key`` once there are ``n`` of them (the log is written asynchronously)."""
    recs = admin_call(addr, {"cmd": "audit", "k": key}, admin="root", token="root-secret")["records"]
    return recs if len(recs) >= n else None


def _stats(node) -> dict:
    with SyncClient.connect(node.url) as cl:
        return cl.stats()


def _resp_node(start_node, config: str):
    """A node with a RESP port; returns (node, RESP port) once both listeners accept."""
    port = free_port()
    node = start_node("--resp-port", str(port), config=config)
    wait_for_port("127.0.0.1", port, 10, alive=lambda: node.running)
    return node, port


def _resp(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _resp_cmd(*args: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _resp_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        ch = s.recv(1)
        if not ch:
            return buf
        buf += ch
    return buf


def _no_tracebacks(node) -> None:
    out = node.output()
    assert "Traceback" not in out, out[-4000:]


LIMITS = """
[limits]
max_connections = {maxc}
max_inflight_bytes = "{inflight}"
tenant_inflight_bytes = "{tenant}"
idle_timeout = "{idle}"
frame_timeout = "{frame}"
min_payload_rate = "{rate}"
write_timeout = "{write}"
"""


def _limits(maxc: int = 64, inflight: str = "8MiB", tenant: str = "64MiB", idle: str = "0", frame: str = "30s",
            rate: str = "64KiB", write: str = "60s") -> str:
    return LIMITS.format(maxc=maxc, inflight=inflight, tenant=tenant, idle=idle, frame=frame, rate=rate,
                         write=write)


# ----------------------------------------------------------------------------------- refusals


def test_max_connections_binary_and_resp(start_node):
    node, port = _resp_node(start_node, _limits(maxc=4))
    held = [_raw(node) for _ in range(3)]
    for s in held:
        _ping(s)
    r = _resp(port)  # the 4th: RESP and binary share the node's limit
    r.sendall(_resp_cmd("PING"))
    assert _resp_line(r) == b"+PONG\r\n"
    # the 5th binary connection: one typed error frame, then the node closes it
    s = _raw(node)
    f = _read_frame(s)
    assert f is not None and f.is_error and f.meta["code"] == TooManyConnections.code, f
    assert _wait_closed(s, 5) < 5
    with pytest.raises(TooManyConnections):
        SyncClient.connect(node.url).stats()
    r2 = _resp(port)
    assert _resp_line(r2).startswith(b"-ERR max number of clients reached")
    # a slot frees up when a connection closes
    held.pop().close()
    s = poll(lambda: _admitted(node), 10, "a connection slot to free up")
    _ping(s)
    assert node.running
    _no_tracebacks(node)


def test_put_over_connection_inflight_limit_is_refused(start_node):
    node = start_node(config=_limits(inflight="1MiB"))
    with SyncClient.connect(node.url) as cl:
        with pytest.raises(ResourceLimit):
            cl.put(b"big", os.urandom(2 << 20))
        assert cl.get(b"big") is None
        cl.put(b"ok", b"x" * (512 << 10))  # the connection (and node) still serve
        assert cl.get(b"ok") == b"x" * (512 << 10)
        assert cl.stats()["limits"]["inflight_refusals"] == 1


def test_pipelining_without_reading_is_throttled_then_closed(start_node):
    node = start_node(config=_limits(inflight="1MiB", write="2s"))
    value = os.urandom(256 << 10)
    with SyncClient.connect(node.url) as cl:
        cl.put(b"v", value)
    rss0 = _rss(node.pid)
    s = _raw(node)
    s.setblocking(False)
    req = c.encode_frame(Op.GET, 1, {"k": b"v"}) * 256  # 256 GETs of 256 KiB: 64 MiB of replies
    sent, stalled_since, t0 = 0, None, time.monotonic()
    while time.monotonic() - t0 < 8 and sent < 400 << 20:
        try:
            sent += s.send(req)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    # The node stopped reading once its replies backed up: our sends block long before
    # 400 MiB of replies (~1600 requests per 64 KiB sent) would have been queued.
    assert stalled_since is not None, f"the node kept reading ({sent} bytes of requests)"
    requests_sent = sent // len(c.encode_frame(Op.GET, 1, {"k": b"v"}))
    assert requests_sent < 1_000_000
    assert _rss(node.pid) - rss0 < 64 << 20
    # Others are served meanwhile, and write_timeout closes the connection that stopped reading.
    deadline = time.monotonic() + 10
    while _stats(node)["limits"].get("timeouts_write", 0) < 1:
        assert time.monotonic() < deadline, "stalled writer never closed"
        time.sleep(0.2)
    s.close()
    assert node.running
    _no_tracebacks(node)


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


TENANTS = """
[tenants.alice]
token = "alice-secret"
grants = { shared = "rw", session = "rw" }
[tenants.bob]
token = "bob-secret"
grants = { shared = "rw", session = "rw" }
"""


def test_tenant_inflight_limit_is_refused(start_node):
    node = start_node(config=_limits(tenant="1MiB", inflight="4MiB") + TENANTS)
    addr = parse_url(node.url).nodes[0]
    a1 = BlockingConnection.open(addr.host, addr.port, tenant="alice", token="alice-secret")
    value = os.urandom(800 << 10)
    raw = _put_frame(b"slow", value)
    half = len(raw) - len(value) // 2
    a1.sock.sendall(raw[:half])  # alice reserves 800 KiB and fills half of it
    with SyncClient.connect(node.url, tenant="alice", token="alice-secret") as alice2:
        poll(lambda: alice2.stats()["limits"]["tenant_inflight"].get("alice"), 10, "alice's reservation")
        with pytest.raises(ResourceLimit):
            alice2.put(b"other", os.urandom(400 << 10))
        with SyncClient.connect(node.url, tenant="bob", token="bob-secret") as bob:
            bob.put(b"bobs", os.urandom(400 << 10))  # per tenant: bob is not affected
        a1.sock.sendall(raw[half:])
        f = _read_frame(a1.sock)
        assert f is not None and not f.is_error, f
        alice2.put(b"other", os.urandom(400 << 10))  # alice's bytes are no longer in flight
        assert alice2.get(b"slow") == value
        lim = alice2.stats()["limits"]
        assert lim["tenant_inflight_refusals"] == 1 and lim["tenant_inflight"] == {}
    a1.close()
    _no_tracebacks(node)


def test_idle_timeout_closes_with_a_typed_error(start_node):
    node = start_node(config=_limits(idle="1s"))
    idle, busy = _raw(node), _raw(node)
    _ping(idle)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:  # a connection that keeps talking stays open
        _ping(busy)
        time.sleep(0.3)
    f = _read_frame(idle, timeout=5)
    assert f is not None and f.is_error and f.meta["code"] == MemKVTimeout.code and "idle" in f.meta["msg"]
    assert _wait_closed(idle, 5) < 5
    _ping(busy)
    assert _stats(node)["limits"]["timeouts_idle"] >= 1


def test_slowloris_partial_frame_is_closed(start_node):
    node, port = _resp_node(start_node, _limits(frame="1s"))
    s = _raw(node)
    frame = c.encode_frame(Op.PING, 1, {"pad": "x" * 200})
    t0 = time.monotonic()
    closed = None
    for i in range(len(frame) - 1):  # one byte every 0.2 s: always some progress, never a frame
        try:
            s.sendall(frame[i:i + 1])
        except OSError:
            closed = time.monotonic() - t0
            break
        s.settimeout(0.2)
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        if data or data == b"":
            closed = time.monotonic() - t0
            break
    assert closed is not None and closed < 4, closed
    # RESP: a command that stalls half way through is closed too
    r = _resp(port)
    r.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nab")
    assert _resp_line(r).startswith(b"-ERR closed: frame timeout")
    assert _wait_closed(r, 5) < 5
    lim = _stats(node)["limits"]
    assert lim["timeouts_frame"] >= 2
    _no_tracebacks(node)


def test_slow_put_payload_is_cut_off(start_node):
    node = start_node(config=_limits(frame="1s", rate="1MiB"))
    value = os.urandom(2 << 20)  # must arrive within 1 s + 2 MiB / (1 MiB/s) = 3 s
    raw = _put_frame(b"trickle", value)
    s = _raw(node)
    t0 = time.monotonic()
    pos, cut = 0, None
    while pos < len(raw):
        try:
            s.sendall(raw[pos:pos + (16 << 10)])  # 64 KiB/s
        except OSError:
            cut = time.monotonic() - t0
            break
        pos += 16 << 10
        time.sleep(0.25)
        if time.monotonic() - t0 > 8:
            break
    if cut is None:
        f = _read_frame(s, timeout=5)
        cut = time.monotonic() - t0
        assert f is None or (f.is_error and f.meta["code"] == MemKVTimeout.code), f
    assert 2 < cut < 7, cut
    with SyncClient.connect(node.url) as cl:
        assert cl.get(b"trickle") is None
        cl.put(b"fast", value)  # at full speed the same write is fine
        assert cl.get(b"fast") == value
        lim = cl.stats()["limits"]
        assert lim["timeouts_payload"] == 1 and lim["tenant_inflight"] == {}
    _no_tracebacks(node)


def test_resp_inflight_limit(start_node):
    node, port = _resp_node(start_node, _limits(inflight="1MiB"))
    r = _resp(port)
    r.sendall(_resp_cmd("ECHO", b"e" * (3 << 20)))  # buffered in the parser: refused, then closed
    assert _resp_line(r).startswith(b"-ERR command exceeds the per-connection in-flight limit")
    assert _wait_closed(r, 5) < 5
    r = _resp(port)
    r.sendall(_resp_cmd("SET", "big", b"s" * (3 << 20)))  # streamed into the region: refused (OOM-style)
    assert _resp_line(r).startswith(b"-ERR a write of")
    r.sendall(_resp_cmd("SET", "small", b"s" * (256 << 10)))
    assert _resp_line(r) == b"+OK\r\n"
    assert node.running
    _no_tracebacks(node)


# ----------------------------------------------- RESP writes go through the security hooks


RESP_TENANTS = """
[tenants.root]
token = "root-secret"
grants = { "*" = "admin" }
[tenants.alice]
token = "alice-secret"
grants = { shared = "rw", session = "rw" }
rate = 20
burst = 20
"""


def test_resp_writes_are_audited_rate_limited_and_revocable(start_node):
    node, port = _resp_node(start_node, RESP_TENANTS)
    r = _resp(port)
    r.sendall(_resp_cmd("AUTH", "alice", "alice-secret"))
    assert _resp_line(r) == b"+OK\r\n"
    r.sendall(_resp_cmd("SET", "rk", "v1") + _resp_cmd("SET", "big", b"b" * (64 << 10)) + _resp_cmd("DEL", "rk"))
    assert [_resp_line(r) for _ in range(3)] == [b"+OK\r\n", b"+OK\r\n", b":1\r\n"]
    # rate: 20/s with a burst of 20 -> a quick burst of 40 commands sees refusals
    r.sendall(b"".join(_resp_cmd("GET", "big") if i % 2 else _resp_cmd("EXISTS", "x") for i in range(40)))
    lines = []
    while len(lines) < 40:
        line = _resp_line(r)
        if line.startswith(b"$"):
            left = int(line[1:]) + 2
            while left:
                left -= len(r.recv(left))
        lines.append(line)
    assert sum(1 for x in lines if b"rate" in x and x.startswith(b"-ERR")) >= 10, lines
    # the audit log has RESP's put and delete, with tenant, key and checksum
    addr = parse_url(node.url).nodes[0]
    recs = poll(
        lambda: _audit_of(addr, b"rk", 2), 10, "the audit records of rk"
    )
    assert [x["op"] for x in recs] == ["put", "delete"], recs
    assert recs[0]["tenant"] == "alice" and recs[0]["cs"] == checksum(b"v1") and recs[0]["via"] == "resp"
    big = admin_call(addr, {"cmd": "audit", "k": b"big"}, admin="root", token="root-secret")["records"]
    assert big and big[0]["len"] == 64 << 10
    # revocation reaches open RESP sessions at their next command
    time.sleep(1.2)  # refill alice's bucket
    admin_call(addr, {"cmd": "tenant.revoke", "name": "alice"}, admin="root", token="root-secret")
    r.sendall(_resp_cmd("GET", "big"))
    assert _resp_line(r).startswith(b"-NOAUTH")
    r.sendall(_resp_cmd("AUTH", "alice", "alice-secret"))
    assert _resp_line(r).startswith(b"-WRONGPASS")
    _no_tracebacks(node)


# ----------------------------------------------------------------------------------- fuzzing

FUZZ_CONFIG = _limits(maxc=256, inflight="4MiB", tenant="16MiB", idle="20s", frame="1s", rate="256KiB",
                      write="3s")
FIELDS = ["k", "ks", "ls", "cs", "ns", "ttl", "pin", "parent", "parents", "lease", "gen", "tenant", "cnonce",
          "proof", "cmd", "nostore", "model", "limit", "name", "epoch"]
SAFE_CMDS = ["tenant.list", "audit", "audit.verify", "bogus", ""]  # never purge/tenant.add: data must stay


def _fuzz_keys() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=24).map(lambda b: b"fz" + b)  # never one of the known keys


_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
                     st.floats(), st.binary(max_size=40), st.text(max_size=12), _fuzz_keys(),
                     st.sampled_from(["shared", "session", "nope", ""]), st.sampled_from(SAFE_CMDS))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)
_metas = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), _values, max_size=6)


@st.composite
def _frames(draw) -> bytes:
    ops = [int(o) for o in Op]
    op = draw(st.one_of(st.sampled_from(ops), st.integers(0, 255)))
    meta = draw(_metas)
    try:
        packed = msgpack.packb(meta, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        packed = b"\x80"
    if draw(st.integers(0, 9)) == 0:
        packed = draw(st.binary(max_size=64))
    payload = draw(st.one_of(st.just(b""), st.binary(max_size=2048)))
    declared = draw(st.one_of(st.just(len(payload)), st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)))
    flags = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    magic = draw(st.one_of(st.just(c.MAGIC), st.binary(min_size=2, max_size=2)))
    version = draw(st.one_of(st.just(c.VERSION), st.integers(0, 255)))
    reserved = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    mlen = draw(st.one_of(st.just(len(packed)), st.integers(0, 1 << 21)))
    head = c.HEADER.pack(magic, version, op, flags, reserved, draw(st.integers(0, 0xFFFFFFFF)), mlen, declared)
    return head + packed + payload


@st.composite
def _mutated(draw) -> bytes:
    seeds = [
        _put_frame(b"fzseed", b"s" * 300),
        c.encode_frame(Op.PUT_MANY, 2, {"ks": [b"fza", b"fzb"], "ls": [3, 4], "cs": [checksum(b"aaa"),
                                                                                   checksum(b"bbbb")]}, b"aaabbbb"),
        c.encode_frame(Op.GET_MANY, 3, {"ks": [b"fza", b"fzseed"]}),
        c.encode_frame(Op.LOOKUP_PREFIX, 4, {"ks": [b"fza", b"fzb"], "lease": 1.0}),
        c.encode_frame(Op.PIN, 5, {"ks": [b"fza"], "ttl": 2.0}),
        c.encode_frame(Op.DELETE, 6, {"k": b"fzb", "ns": "session"}),
        c.encode_frame(Op.HELLO, 7, {}),
        c.encode_frame(Op.AUTH, 8, {"tenant": "x", "cnonce": b"n" * 16, "proof": b"p" * 32}),
        c.encode_frame(Op.ADMIN, 9, {"cmd": "tenant.list"}),
        c.encode_frame(Op.STATS, 10, {}),
    ]
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(seeds), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == 2:
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos + 1] = bytes([draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 0xC1, 0xDE, 0xDF]))])
    return bytes(data)


def _fire(node, data: bytes, dangling: list[socket.socket], keep_open: bool) -> None:
    """Send ``data`` on a fresh connection; then either leave it dangling or half-close and read to EOF."""
    s = _raw(node, timeout=5)
    if not keep_open:
        with s:
            send_and_read(s, data)
        return
    try:
        s.sendall(data)
    except OSError:
        s.close()
        return
    dangling.append(s)
    if len(dangling) > 24:
        dangling.pop(0).close()


def _probe(node) -> None:
    s = _raw(node, timeout=3)
    try:
        _ping(s)
    finally:
        s.close()


def _resp_fuzz_inputs() -> st.SearchStrategy[bytes]:
    names = [b"GET", b"SET", b"MGET", b"MSET", b"DEL", b"EXISTS", b"PING", b"ECHO", b"SELECT", b"EXPIRE", b"TTL",
             b"SCAN", b"MULTI", b"EXEC", b"HELLO", b"AUTH", b"CLIENT", b"INFO", b"SETEX", b"STRLEN", b"NOPE"]
    arg = st.one_of(_fuzz_keys(), st.binary(max_size=30), st.sampled_from([b"EX", b"PX", b"NX", b"-1", b"99999999999"]))
    cmd = st.builds(lambda n, a: _resp_cmd(n, *a), st.sampled_from(names), st.lists(arg, max_size=5))
    raw = st.binary(max_size=200)
    inline = st.builds(lambda n, a: n + b" " + b" ".join(a) + b"\r\n", st.sampled_from(names),
                       st.lists(arg, max_size=3))
    return st.lists(st.one_of(cmd, cmd.map(lambda b: b[: len(b) // 2]), raw, inline), min_size=1, max_size=5).map(
        b"".join)


def test_fuzzed_live_node_survives_with_data_intact(start_node, tmp_path):
    node, port = _resp_node(start_node, FUZZ_CONFIG)
    rng = __import__("random").Random(9)
    known = {f"known-{i}".encode(): rng.randbytes(rng.choice([1, 100, 4096, 70_000])) for i in range(60)}
    session_known = {f"sknown-{i}".encode(): rng.randbytes(500) for i in range(20)}
    with SyncClient.connect(node.url) as cl:
        items = list(known.items())
        for k, v in items[:30]:
            cl.put(k, v)
        cl.put_many(items[30:])
        cl.put_many(list(session_known.items()), namespace="session")
        assert cl.pin(list(known), ttl=3600) == len(known)  # fuzz writes may evict; pins may not
        assert cl.pin(list(session_known), ttl=3600, namespace="session") == len(session_known)

    dangling: list[socket.socket] = []
    count = {"n": 0}
    cfg = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))

    def step(data: bytes, keep_open: bool) -> None:
        _fire(node, data, dangling, keep_open)
        count["n"] += 1
        if count["n"] % 50 == 0:
            assert node.running, node.output()[-3000:]
            _probe(node)

    @cfg
    @given(_frames(), st.integers(0, 9))
    def random_frames(data: bytes, k: int) -> None:
        step(data, k == 0)

    @cfg
    @given(_mutated(), st.integers(0, 9))
    def mutated_frames(data: bytes, k: int) -> None:
        step(data, k == 0)

    @settings(cfg, max_examples=150)
    @given(_resp_fuzz_inputs())
    def resp_inputs(data: bytes) -> None:
        with _resp(port) as s:
            send_and_read(s, data)

    random_frames()
    mutated_frames()
    resp_inputs()
    # atheris (coverage-guided on the frame parser, every input also sent to the live node)
    atheris_runs = _run_atheris(node, tmp_path)
    for s in dangling:
        s.close()

    assert node.running, node.output()[-3000:]
    _probe(node)
    with SyncClient.connect(node.url) as cl:
        assert cl.get_many(list(known)) == list(known.values())
        assert cl.get_many(list(session_known), namespace="session") == list(session_known.values())
        cl.put(b"after-fuzz", b"still serving")
        assert cl.get(b"after-fuzz") == b"still serving"
        stats = cl.stats()
        assert stats["limits"]["tenant_inflight"] == {}, stats["limits"]
        ops = stats["server"]["ops"]  # the fuzz reached the handlers, not only the framing checks
        assert sum(ops.values()) > 150 and len(ops) >= 8, ops
    _no_tracebacks(node)
    print(f"fuzzed: {count['n']} binary inputs, 150 RESP inputs, atheris runs: {atheris_runs}")


ATHERIS_FRAMES = Path(__file__).parent / "fuzz" / "atheris_frames.py"  # frames parsed here, sent to the node


def _run_atheris(node, tmp_path) -> int | str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "skipped (atheris not installed)"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [_put_frame(b"fzseed", b"s" * 100), c.encode_frame(Op.GET_MANY, 3, {"ks": [b"fza"]}),
             c.encode_frame(Op.PUT_MANY, 2, {"ks": [b"fza"], "ls": [3], "cs": [checksum(b"aaa")]}, b"aaa"),
             c.encode_frame(Op.LOOKUP_PREFIX, 4, {"ks": [b"fza"], "lease": 1.0}), c.encode_frame(Op.PING, 1, {})]
    for i, s in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(s)
    runs = 600
    proc = subprocess.run(
        [sys.executable, str(ATHERIS_FRAMES), node.host, str(node.port), f"-runs={runs}", "-max_len=2048",
         "-seed=7", str(corpus)], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return runs


def test_limits_config_is_validated(tmp_path):
    from memkv.config import load_config
    from memkv.errors import InvalidArgument

    p = tmp_path / "c.toml"
    p.write_text(_limits(maxc=10, inflight="2MiB", idle="5m", frame="10s", rate="1MiB", write="30s"))
    lim = load_config(p).limits
    assert (lim.max_connections, lim.max_inflight_bytes, lim.idle_timeout, lim.frame_timeout,
            lim.min_payload_rate, lim.write_timeout) == (10, 2 << 20, 300.0, 10.0, 1 << 20, 30.0)
    p.write_text("[limits]\nmax_conections = 3\n")
    with pytest.raises(InvalidArgument):
        load_config(p)
    assert json.dumps(lim.__dict__)
