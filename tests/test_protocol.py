"""The sans-IO codec: round trips, and bad bytes give typed errors, never crashes or hangs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memkv.errors import BatchTooLarge, FrameTooLarge, KeyTooLarge, ProtocolError
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Flag, Op

ops = st.sampled_from(list(Op))
meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=64) | st.text(max_size=32)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
metas = st.dictionaries(st.text(max_size=16), meta_values, max_size=8)


@given(op=ops, rid=st.integers(0, 2**32 - 1), meta=metas, payload=st.binary(max_size=4096),
       flags=st.sampled_from([0, Flag.RESPONSE, Flag.RESPONSE | Flag.ERROR]),
       chunk=st.integers(1, 300))
@settings(max_examples=300, deadline=None)
def test_every_frame_round_trips_whatever_the_chunking(op, rid, meta, payload, flags, chunk):
    data = c.encode_frame(op, rid, meta, payload, flags)
    reader = c.FrameReader(buffer_size=128)
    frames = []
    for i in range(0, len(data), chunk):
        reader.feed(data[i:i + chunk])
        while True:
            ev = reader.next_frame()
            if isinstance(ev, c.NeedData):
                break
            frames.append(ev)
    assert len(frames) == 1
    f = frames[0]
    assert (f.op, f.request_id, f.flags, f.meta, bytes(f.payload)) == (op, rid, flags, meta, payload)


@given(metas_payloads=st.lists(st.tuples(metas, st.binary(max_size=2000)), min_size=1, max_size=10))
@settings(max_examples=100, deadline=None)
def test_pipelined_frames_with_zero_copy_payloads(metas_payloads):
    data = b"".join(c.encode_frame(Op.PUT, i, m, p) for i, (m, p) in enumerate(metas_payloads))
    reader = c.FrameReader(buffer_size=64)
    reader.feed(data)
    for i, (m, p) in enumerate(metas_payloads):
        head = reader.next_head()
        assert isinstance(head, c.Frame) and head.request_id == i and head.meta == m
        dest = bytearray(head.payload_len)
        n = reader.take_payload_into(memoryview(dest))
        assert n == len(p)  # everything was fed at once
        reader.payload_done()
        assert bytes(dest) == p
    assert isinstance(reader.next_head(), c.NeedData)


def _drain(reader: c.FrameReader) -> None:
    """Pull events until NEED_DATA or an error; bounded (no hangs)."""
    for _ in range(10_000):
        ev = reader.next_frame()
        if isinstance(ev, c.NeedData):
            return
    raise AssertionError("reader produced unbounded events")


@given(st.binary(max_size=2000))
@settings(max_examples=500, deadline=None)
def test_random_bytes_give_need_data_or_protocol_error(data):
    reader = c.FrameReader(limits=c.Limits(max_payload=1 << 20), buffer_size=64)
    reader.feed(data)
    try:
        _drain(reader)
    except ProtocolError:
        pass


@given(op=ops, meta=metas, payload=st.binary(max_size=500), cut=st.integers(0, 10_000),
       flip=st.integers(0, 10_000), bit=st.integers(0, 7))
@settings(max_examples=500, deadline=None)
def test_truncated_or_bitflipped_frames_never_raise_anything_else(op, meta, payload, cut, flip, bit):
    data = bytearray(c.encode_frame(op, 1, meta, payload))
    if flip < len(data):
        data[flip] ^= 1 << bit
    data = data[: cut % (len(data) + 1)]
    reader = c.FrameReader(buffer_size=64)
    reader.feed(bytes(data))
    try:
        _drain(reader)
    except ProtocolError:
        pass


def test_limits_are_checked_on_the_header_before_allocating():
    limits = c.Limits(max_meta=100, max_payload=1000)
    big_payload = c.HEADER.pack(c.MAGIC, c.VERSION, Op.PUT, 0, 0, 1, 2, 10**12)
    with pytest.raises(FrameTooLarge):
        c.parse_header(big_payload, limits)
    big_meta = c.HEADER.pack(c.MAGIC, c.VERSION, Op.PUT, 0, 0, 1, 10**9, 0)
    reader = c.FrameReader(limits)
    reader.feed(big_meta)
    with pytest.raises(FrameTooLarge):
        reader.next_head()
    # The stream is unusable after a framing error; it stays failed.
    with pytest.raises(FrameTooLarge):
        reader.next_head()


def test_bad_magic_version_opcode_and_reserved_bits():
    good = c.HEADER.pack(c.MAGIC, c.VERSION, Op.GET, 0, 0, 1, 0, 0)
    for bad in (b"XX" + good[2:], good[:2] + bytes([9]) + good[3:], good[:3] + bytes([250]) + good[4:],
                good[:4] + struct.pack("<H", 0x80) + good[6:], good[:6] + b"\x01\x00" + good[8:]):
        with pytest.raises(ProtocolError):
            c.parse_header(bad)


def test_field_accessors_enforce_types_and_limits():
    limits = c.Limits(max_key=8, max_batch=3)
    with pytest.raises(KeyTooLarge):
        c.get_key({"k": b"x" * 9}, "k", limits)
    with pytest.raises(ProtocolError):
        c.get_key({"k": "text"}, "k", limits)
    with pytest.raises(ProtocolError):
        c.get_key({"k": b""}, "k", limits)
    with pytest.raises(BatchTooLarge):
        c.get_keys({"ks": [b"a"] * 4}, "ks", limits)
    with pytest.raises(ProtocolError):
        c.get_ints({"ls": [1, -1]}, "ls", 2)
    with pytest.raises(ProtocolError):
        c.get_ints({"ls": [True, 1]}, "ls", 2)
    with pytest.raises(ProtocolError):
        c.get_opt_float({"ttl": float("nan")}, "ttl")
    assert c.get_keys({"ks": [b"a", b"b"]}, "ks", limits) == [b"a", b"b"]


def test_meta_must_be_a_map_with_string_keys():
    import msgpack

    for bad in (msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\xc1", msgpack.packb({"a": 1})[:-1]):
        with pytest.raises(ProtocolError):
            c.unpack_meta(bad)


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8), data=st.data())
def test_advance_keeps_exactly_the_unsent_bytes(sizes, data):
    bufs = [bytes([i]) * n for i, n in enumerate(sizes)]
    chunk_len = data.draw(st.integers(1, len(bufs)))
    sent = data.draw(st.integers(0, sum(sizes[:chunk_len])))
    left = c.advance(list(bufs), chunk_len, sent)
    assert b"".join(bytes(b) for b in left) == b"".join(bufs)[sent:]
