"""The client core without sockets: operations and the connection protocol, driven sans-IO.

An operation of the client core (``client/core/``) never does I/O: it yields
requests and is handed their outcomes. These tests are its executor. Each
``NodeCall`` goes through a real ``ConnectionProtocol`` of the node it names:
its bytes are decoded as the node would decode them, and the reply the test
gives is encoded as the node would encode it and fed back, in pieces, through
``recv_buffer``/``received``. So the decisions — which replica next, what to
repair, which version wins, when to run again after MOVED — are checked from
the requests the core really sends, with nothing of memkv replaced.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest

from memkv.client.cluster_map import NodeInfo, SlotMap, key_slot
from memkv.client.cluster_view import ClusterState, ClusterView
from memkv.client.core import dispatch
from memkv.client.core.api import ClientCore
from memkv.client.core.calls import GetCall, GetManyCall, SimpleCall
from memkv.client.core.protocol import ConnectionProtocol
from memkv.client.core.requests import WAIT, Blocking, NodeCall, Parallel
from memkv.client.core.routing import ClusterRouter, StandaloneRouter
from memkv.client.url import NodeAddress
from memkv.errors import (
    AuthError,
    ConnectionLost,
    Fenced,
    KeyExists,
    MemKVError,
    Moved,
    ProtocolError,
    error_from_code,
)
from memkv.protocol import auth
from memkv.protocol import codec as c
from memkv.protocol.checksum import STREAM_MIN, checksum
from memkv.protocol.opcodes import Op

A, B, C = NodeAddress("10.0.0.1", 7400), NodeAddress("10.0.0.2", 7400), NodeAddress("10.0.0.3", 7400)
IDS = {A: "a", B: "b", C: "c"}

# A node's answer to one request: (meta, payload) of the reply, or a MemKVError it replies with.
Answer = tuple[dict[str, Any], bytes] | MemKVError
Node = Callable[[int, dict[str, Any], bytes], Answer]


def cluster(*rows: tuple[NodeAddress, ...], overwritable: set[str] | None = None) -> ClusterRouter:
    """A cluster router over a view holding this slot map (one slot per row); nothing watches etcd."""
    view = ClusterView(None, "test")  # type: ignore[arg-type]
    view.state = ClusterState(nodes={i: NodeInfo(i, f"{a.host}:{a.port}") for a, i in IDS.items()},
                              slotmap=SlotMap(1, len(rows), len(rows[0]), tuple(tuple(IDS[a] for a in r)
                                                                                 for r in rows)))
    router = ClusterRouter(view)
    router.overwritable |= overwritable or set()
    return router


class Wire:
    """Answers the core's requests as the nodes in ``nodes`` would; ``dead`` nodes lose connections."""

    def __init__(self, nodes: dict[NodeAddress, Node], dead: tuple[NodeAddress, ...] = ()) -> None:
        self.nodes = nodes
        self.dead = set(dead)
        self.sent: list[tuple[NodeAddress, str, dict[str, Any]]] = []  # (node, opcode name, meta)
        self.blocking: list[tuple[Any, tuple[Any, ...]]] = []

    def run(self, op: Any) -> Any:
        value: Any = None
        error: MemKVError | None = None
        while True:
            try:
                req = op.send(value) if error is None else op.throw(error)
            except StopIteration as stop:
                return stop.value
            value = error = None
            try:
                if isinstance(req, NodeCall):
                    value = self.call(req.node, req.call)
                elif isinstance(req, Parallel):
                    value = [self.outcome(o) for o in req.ops]
                elif isinstance(req, Blocking):
                    self.blocking.append((req.fn, req.args))  # not run: it would wait for etcd
                else:
                    assert req is WAIT
            except MemKVError as exc:
                error = exc

    def outcome(self, op: Any) -> Any:
        try:
            return self.run(op)
        except MemKVError as exc:
            return exc

    def call(self, node: NodeAddress, call: Any) -> Any:
        if node in self.dead:
            raise ConnectionLost(f"{node} is down")
        proto = ConnectionProtocol(str(node))
        pending = proto.start(call)
        request = b"".join(bytes(b) for b in proto.data_to_send())
        reader = c.FrameReader()
        reader.feed(request)
        frame = reader.next_frame()
        assert isinstance(frame, c.Frame) and frame.request_id == pending.rid
        self.sent.append((node, Op(frame.op).name, frame.meta))
        answer = self.nodes[node](frame.op, frame.meta, bytes(frame.payload))
        if isinstance(answer, MemKVError):
            reply = c.encode_error(frame.op, frame.request_id, answer.code, answer.message)
        else:
            meta, payload = answer
            reply = c.encode_frame(frame.op, frame.request_id, meta, payload, flags=c.F_RESPONSE)
        feed(proto, reply, piece=7)
        assert pending.done
        return pending.outcome()


def feed(proto: ConnectionProtocol, data: bytes, piece: int = 1 << 20) -> None:
    """Hand ``data`` to ``proto`` the way a socket would, at most ``piece`` bytes per read."""
    pos = 0
    while pos < len(data):
        view = proto.recv_buffer()
        n = min(len(view), piece, len(data) - pos)
        view[:n] = data[pos:pos + n]
        proto.received(n)
        pos += n


def found(value: bytes, version: int = 0, ow: bool = False) -> tuple[dict[str, Any], bytes]:
    """A node's GET reply for a value it holds."""
    return {"f": True, "cs": checksum(value), "gen": 1, "ver": version, "ow": ow}, value


def found_many(values: list[bytes | None], versions: list[int] | None = None,
               ow: bool = False) -> tuple[dict[str, Any], bytes]:
    """A node's GET_MANY reply (None: a miss)."""
    meta = {"ls": [-1 if v is None else len(v) for v in values], "cs": [checksum(v or b"") for v in values],
            "gens": [1] * len(values), "vers": versions or [0] * len(values), "ow": ow}
    return meta, b"".join(v for v in values if v is not None)


MISS: tuple[dict[str, Any], bytes] = ({"f": False}, b"")


# -- operations -----------------------------------------------------------------------------------

def test_standalone_get_is_one_request() -> None:
    core = ClientCore(StandaloneRouter(A))
    wire = Wire({A: lambda op, meta, payload: found(b"hello")})
    assert wire.run(core.get("k", namespace="shared")) == b"hello"
    assert wire.sent == [(A, "GET", {"k": b"k"})]


def test_a_corrupt_value_is_a_miss_and_is_reported() -> None:
    def node(op: int, meta: dict[str, Any], payload: bytes) -> Answer:
        if op == Op.GET:
            m, v = found(b"hello")
            return {**m, "cs": m["cs"] ^ 1, "gen": 42}, v
        return {}, b""

    core = ClientCore(StandaloneRouter(A))
    wire = Wire({A: node})
    assert wire.run(core.get("k", namespace="ctx")) is None
    assert wire.sent[1] == (A, "REPORT_CORRUPT", {"k": b"k", "gen": 42, "ns": "ctx"})


def test_a_read_fails_over_to_the_next_replica() -> None:
    core = ClientCore(cluster((A, B)))
    wire = Wire({B: lambda op, meta, payload: found(b"v")}, dead=(A,))
    assert wire.run(core.get("k", namespace="shared")) == b"v"
    assert [n for n, *_ in wire.sent] == [B]


def test_every_epoch_is_stamped() -> None:
    core = ClientCore(cluster((A,)))
    wire = Wire({A: lambda op, meta, payload: found(b"v")})
    wire.run(core.get("k", namespace="shared"))
    assert wire.sent[0][2]["ep"] == 1


def test_a_miss_is_asked_of_the_other_replicas_and_repaired() -> None:
    """A write acknowledged while replica A was skipped is not on A: B has it; A gets it back, with
    its version (so the repair never replaces a newer value)."""
    puts: list[dict[str, Any]] = []

    def a(op: int, meta: dict[str, Any], payload: bytes) -> Answer:
        if op == Op.PUT_MANY:
            puts.append(meta)
            return {"gens": [2]}, b""
        return MISS

    core = ClientCore(cluster((A, B)))
    wire = Wire({A: a, B: lambda op, meta, payload: found_many([b"value"], [7])})
    assert wire.run(core.get("k", namespace="shared")) == b"value"
    assert [(n, o) for n, o, _ in wire.sent] == [(A, "GET"), (B, "GET_MANY"), (A, "PUT_MANY")]
    assert puts[0]["ks"] == [b"k"] and puts[0]["vers"] == [7]


def test_an_overwritable_read_returns_the_newest_version_and_repairs_the_stale_replica() -> None:
    """A missed an overwrite (it was down): it still holds version 5, B has 9. The versions are asked
    of B alongside the read (no value moves), the newer value is fetched from B and put back on A."""
    repairs: list[dict[str, Any]] = []

    def a(op: int, meta: dict[str, Any], payload: bytes) -> Answer:
        if op == Op.PUT_MANY:
            repairs.append({**meta, "payload": payload})
            return {"gens": [3]}, b""
        return found(b"old", 5, ow=True)

    def b(op: int, meta: dict[str, Any], payload: bytes) -> Answer:
        if op == Op.EXISTS_MANY:
            assert meta["v"] is True
            return {"vers": [9]}, b""
        return found_many([b"new"], [9], ow=True)

    core = ClientCore(cluster((A, B), overwritable={"session"}))
    wire = Wire({A: a, B: b})
    assert wire.run(core.get("k", namespace="session")) == b"new"
    assert [(n, o) for n, o, _ in wire.sent] == [(A, "GET"), (B, "EXISTS_MANY"), (B, "GET_MANY"), (A, "PUT_MANY")]
    assert repairs[0]["vers"] == [9] and repairs[0]["payload"] == b"new"


def test_a_namespace_becomes_known_overwritable_from_a_reply() -> None:
    router = cluster((A, B))
    wire = Wire({A: lambda op, meta, payload: found(b"v", 4, ow=True),
                 B: lambda op, meta, payload: ({"vers": [4]}, b"")})
    assert wire.run(ClientCore(router).get("k", namespace="session")) == b"v"
    assert "session" in router.overwritable
    assert [o for _, o, _ in wire.sent] == ["GET", "EXISTS_MANY"]  # same version on B: nothing to repair


def test_a_replicated_write_skips_dead_and_fenced_replicas() -> None:
    core = ClientCore(cluster((A, B, C)))
    wire = Wire({A: lambda op, meta, payload: ({"gen": 1, "ver": meta["ver"]}, b""),
                 B: lambda op, meta, payload: Fenced("lease lost")}, dead=(C,))
    wire.run(core.put("k", b"v", namespace="shared", ttl=None, pin=False))
    assert [(n, o) for n, o, _ in wire.sent] == [(A, "PUT"), (B, "PUT")]
    assert wire.sent[0][2]["ver"] == wire.sent[1][2]["ver"]  # one version on every replica


def test_a_replicated_write_raises_what_is_not_a_dead_replica() -> None:
    core = ClientCore(cluster((A, B)))
    wire = Wire({A: lambda op, meta, payload: ({"gen": 1}, b""),
                 B: lambda op, meta, payload: KeyExists("different bytes")})
    with pytest.raises(KeyExists):
        wire.run(core.put("k", b"v", namespace="shared", ttl=None, pin=False))


def test_moved_refreshes_the_map_and_runs_the_operation_again() -> None:
    router = cluster((A,))
    answers = [Moved("slot 0 moved at epoch 2"), ({"gen": 1}, b"")]
    wire = Wire({A: lambda op, meta, payload: answers.pop(0)})
    wire.run(ClientCore(router).put("k", b"v", namespace="shared", ttl=None, pin=False))
    assert wire.blocking == [(router.refresh, (2,))]
    assert [o for _, o, _ in wire.sent] == ["PUT", "PUT"]


def test_moved_too_often_is_raised() -> None:
    wire = Wire({A: lambda op, meta, payload: Moved("slot 0 moved at epoch 3")})
    with pytest.raises(Moved):
        wire.run(ClientCore(cluster((A,))).delete("k", namespace="shared"))
    assert len(wire.sent) == dispatch.MOVED_RETRIES + 1


def test_moved_on_a_standalone_node_is_the_callers() -> None:
    wire = Wire({A: lambda op, meta, payload: Moved("not mine at epoch 3")})
    with pytest.raises(Moved):
        wire.run(ClientCore(StandaloneRouter(A, epoch=1)).get("k", namespace="shared"))
    assert wire.sent[0][2]["ep"] == 1 and wire.blocking == []


def test_a_batch_is_split_by_replica_set_and_merged_in_order() -> None:
    router = cluster((A, B), (B, C))
    keys = [f"k{i}".encode() for i in range(8)]
    slot = {k: key_slot(k, 2) for k in keys}
    assert set(slot.values()) == {0, 1}
    values = {k: b"v-" + k for k in keys}

    def node(op: int, meta: dict[str, Any], payload: bytes) -> Answer:
        return found_many([values[k] for k in meta["ks"]])

    wire = Wire({A: node, B: node, C: node})
    assert wire.run(ClientCore(router).get_many(keys, namespace="shared")) == [values[k] for k in keys]
    asked = {n: meta["ks"] for n, _, meta in wire.sent}
    assert asked == {A: [k for k in keys if slot[k] == 0], B: [k for k in keys if slot[k] == 1]}


def test_lookup_prefix_stops_at_the_first_short_answer() -> None:
    router = cluster((A,), (B,))
    keys = [f"p{i}".encode() for i in range(12)]
    first = keys.index(next(k for k in keys if key_slot(k, 2) != key_slot(keys[0], 2)))
    wire = Wire({n: (lambda op, meta, payload: ({"n": len(meta["ks"]) - 1}, b"")) for n in (A, B)})
    assert wire.run(ClientCore(router).lookup_prefix(keys, lease=5.0, namespace="shared")) == first - 1
    assert len(wire.sent) == 1 and wire.sent[0][2]["ks"] == keys[:first]


# -- the connection protocol ----------------------------------------------------------------------

def reply_bytes(rid: int, meta: dict[str, Any], payload: bytes = b"", op: int = Op.GET) -> bytes:
    return c.encode_frame(op, rid, meta, payload, flags=c.F_RESPONSE)


def test_protocol_matches_replies_to_calls_in_any_order_byte_by_byte() -> None:
    proto = ConnectionProtocol("n")
    p1 = proto.start(SimpleCall(Op.PING, {}))
    p2 = proto.start(SimpleCall(Op.STATS, {}, "stats"))
    sent = b"".join(bytes(b) for b in proto.data_to_send())
    reader = c.FrameReader()
    reader.feed(sent)
    assert [f.request_id for f in (reader.next_frame(), reader.next_frame())] == [p1.rid, p2.rid]
    feed(proto, reply_bytes(p2.rid, {"stats": {"keys": 3}}, op=Op.STATS), piece=1)
    assert p2.done and not p1.done and p2.outcome() == {"keys": 3}
    feed(proto, reply_bytes(p1.rid, {"pong": True}, op=Op.PING), piece=1)
    assert p1.outcome() == {"pong": True} and proto.in_flight == 0


def test_protocol_receives_a_payload_straight_into_the_callers_buffer() -> None:
    value = bytes(range(256)) * 256
    buf = bytearray(len(value) + 10)
    proto = ConnectionProtocol("n")
    pending = proto.start(GetCall(b"k", namespace="shared", into=buf))
    proto.data_to_send()
    frame = reply_bytes(pending.rid, found(value)[0], value)
    head = len(frame) - len(value)
    feed(proto, frame[:head])
    view = proto.recv_buffer()
    assert view.obj is buf  # the next read lands in the caller's buffer, not in a staging buffer
    feed(proto, frame[head:], piece=1000)
    assert pending.outcome() == len(value) and buf[:len(value)] == value


@pytest.mark.parametrize("piece", [4093, 1 << 20])
@pytest.mark.parametrize("into", [False, True])
def test_large_values_are_checksummed_piece_by_piece_as_they_land(piece: int, into: bool) -> None:
    """Values of STREAM_MIN bytes and more are hashed as each piece arrives (odd piece sizes,
    pieces through the reader's buffer and straight into the destination): the same answer as one
    pass over the whole value, and one flipped byte in the middle is still a corrupt read."""
    big = bytes(range(251)) * (STREAM_MIN // 251 + 7)
    small = b"s" * 1000
    for flip in (False, True):
        proto = ConnectionProtocol("n")
        one = proto.start(GetCall(b"k", namespace="shared", into=bytearray(len(big)) if into else None))
        many = proto.start(GetManyCall([b"a", b"b", b"c", b"d"], namespace="shared"))
        proto.data_to_send()
        meta, payload = found(big)
        mmeta, mpayload = found_many([big, None, small, big[::-1]])
        if flip:  # the reply's bytes differ from the checksum the node sent
            payload = payload[:70000] + bytes([payload[70000] ^ 1]) + payload[70001:]
            mpayload = mpayload[:70000] + bytes([mpayload[70000] ^ 1]) + mpayload[70001:]
        feed(proto, reply_bytes(one.rid, meta, payload) + reply_bytes(many.rid, mmeta, mpayload, op=Op.GET_MANY),
             piece=piece)
        if flip:
            assert one.outcome() is None and [c.key for c in one.call.corrupt] == [b"k"]
            assert many.outcome() == [None, None, small, big[::-1]]
        else:
            assert one.call.watches_payload and many.call.watches_payload
            assert one.outcome() == (len(big) if into else big) and not one.call.corrupt
            assert many.outcome() == [big, None, small, big[::-1]] and not many.call.corrupt


def test_a_reply_nobody_waits_for_is_drained_and_the_buffer_left_alone() -> None:
    buf = bytearray(1000)
    proto = ConnectionProtocol("n")
    given_up = proto.start(GetCall(b"k", namespace="shared", into=buf))
    other = proto.start(SimpleCall(Op.PING, {}))
    proto.data_to_send()
    frame = reply_bytes(given_up.rid, found(b"x" * 600)[0], b"x" * 600)
    feed(proto, frame[:len(frame) - 500])  # 100 payload bytes are in the caller's buffer...
    proto.forget(given_up)  # ...when the caller is cancelled
    feed(proto, frame[len(frame) - 500:] + reply_bytes(other.rid, {"pong": True}, op=Op.PING))
    assert buf[100:] == bytes(900) and other.outcome() == {"pong": True}


def test_an_error_reply_fails_its_call_only() -> None:
    proto = ConnectionProtocol("n")
    p1, p2 = proto.start(SimpleCall(Op.PING, {})), proto.start(SimpleCall(Op.PING, {}))
    proto.data_to_send()
    err = KeyExists("taken")
    feed(proto, c.encode_error(Op.PING, p1.rid, err.code, err.message) + reply_bytes(p2.rid, {}, op=Op.PING))
    with pytest.raises(KeyExists):
        p1.outcome()
    assert p2.outcome() == {} and proto.broken is None


def test_lost_framing_breaks_the_connection_for_every_call() -> None:
    proto = ConnectionProtocol("n")
    p1, p2 = proto.start(SimpleCall(Op.PING, {})), proto.start(SimpleCall(Op.PING, {}))
    with pytest.raises(ProtocolError):
        feed(proto, c.encode_error(Op.PING, 0, ProtocolError.code, "bad frame"))
    for p in (p1, p2):
        with pytest.raises(ConnectionLost):
            p.outcome()
    with pytest.raises(ConnectionLost):
        proto.start(SimpleCall(Op.PING, {}))


def _authenticating(server_token: str) -> tuple[ConnectionProtocol, bytes]:
    proto = ConnectionProtocol("n", tenant="alice", token="secret")
    assert not proto.ready
    reader = c.FrameReader()
    reader.feed(b"".join(bytes(b) for b in proto.data_to_send()))
    hello = reader.next_frame()
    assert isinstance(hello, c.Frame) and hello.op == Op.HELLO
    snonce = auth.new_nonce()
    feed(proto, reply_bytes(hello.request_id, {"nonce": snonce}, op=Op.HELLO))
    reader.feed(b"".join(bytes(b) for b in proto.data_to_send()))
    req = reader.next_frame()
    assert isinstance(req, c.Frame) and req.op == Op.AUTH and req.meta["tenant"] == "alice"
    assert req.meta["proof"] == auth.client_proof("secret", "alice", snonce, req.meta["cnonce"])
    proof = auth.server_proof(server_token, "alice", snonce, req.meta["cnonce"])
    return proto, reply_bytes(req.request_id, {"proof": proof}, op=Op.AUTH)


def test_protocol_authenticates_before_it_is_ready() -> None:
    proto, reply = _authenticating("secret")
    feed(proto, reply)
    assert proto.ready


def test_a_node_that_cannot_prove_the_token_is_refused() -> None:
    proto, reply = _authenticating("not the token")
    with pytest.raises(AuthError):
        feed(proto, reply)
    assert not proto.ready and proto.broken is not None


def test_tls_over_memory_bios_end_to_end(tmp_path: Any) -> None:
    """The client's TLS session is bytes in, bytes out: a real handshake and a call against a
    server-side ``ssl.SSLObject``, with no socket."""
    from tls_certs import make_certs

    certs = make_certs(tmp_path / "certs")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    proto = ConnectionProtocol("127.0.0.1:1", tls=ssl.create_default_context(cafile=str(certs.ca)),
                               server_hostname="127.0.0.1")

    def pump() -> None:
        for data in proto.data_to_send():
            s_in.write(data)
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if s_out.pending:
            feed(proto, s_out.read())

    while not proto.ready:
        pump()
    pending = proto.start(SimpleCall(Op.PING, {}))
    pump()
    reader = c.FrameReader()
    reader.feed(server.read(65536))
    frame = reader.next_frame()
    assert isinstance(frame, c.Frame) and frame.request_id == pending.rid
    server.write(reply_bytes(frame.request_id, {"pong": 1}, op=Op.PING))
    feed(proto, s_out.read(), piece=5)
    assert pending.outcome() == {"pong": 1}


def test_error_codes_round_trip_as_the_same_class() -> None:
    """The core relies on a reply's error code meaning the same class on both ends."""
    for cls in (Moved, Fenced, KeyExists, ConnectionLost):
        assert isinstance(error_from_code(cls.code, "x"), cls)
