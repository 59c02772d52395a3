"""The flash record format: round trips, torn writes and flipped bytes (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv.flash import record as r

names = st.text(min_size=0, max_size=12)
keys = st.binary(min_size=1, max_size=40)
values = st.binary(min_size=0, max_size=300)
recs = st.tuples(names, names, keys, values, st.one_of(st.none(), keys), st.integers(1, 2**40),
                 st.sampled_from([r.PUT, r.DELETE]))
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _enc(t) -> bytes:
    ns, tn, key, value, parent, lsn, kind = t
    if kind == r.DELETE:
        return r.encode(r.DELETE, ns, tn, key, lsn=lsn)
    return r.encode(r.PUT, ns, tn, key, value, parent=parent, lsn=lsn, generation=lsn, expires=None)


@SETTINGS
@given(recs)
def test_round_trip(t):
    ns, tn, key, value, parent, lsn, kind = t
    buf = _enc(t)
    rec = r.decode(buf)
    assert (rec.kind, rec.namespace, rec.tenant, rec.key, rec.lsn) == (kind, ns, tn, key, lsn)
    if kind == r.PUT:
        assert rec.parent == parent
        assert buf[rec.value_off:rec.end] == value
    assert rec.size == len(buf)


@SETTINGS
@given(recs, st.data())
def test_truncation_is_detected(t, data):
    buf = _enc(t)
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(r.Truncated):
        r.decode(buf[:cut])


@SETTINGS
@given(recs, st.data())
def test_flipped_byte_is_detected(t, data):
    buf = bytearray(_enc(t))
    i = data.draw(st.integers(0, len(buf) - 1))
    bit = data.draw(st.integers(0, 7))
    buf[i] ^= 1 << bit
    # a flipped byte is never decoded as a valid record with different contents
    with pytest.raises(r.RecordError):
        r.decode(bytes(buf))


@SETTINGS
@given(st.lists(recs, min_size=1, max_size=8), st.data())
def test_scan_skips_only_the_damaged_record(ts, data):
    encoded = [_enc(t) for t in ts]
    victim = data.draw(st.integers(0, len(encoded) - 1))
    bad = bytearray(encoded[victim])
    i = data.draw(st.integers(0, len(bad) - 1))
    bad[i] ^= 0xFF
    junk = data.draw(st.binary(max_size=20))
    parts = [*encoded[:victim], bytes(bad), *encoded[victim + 1:]]
    buf = junk + b"".join(parts)
    found = [x for x in r.scan(buf) if isinstance(x, r.Record)]
    expect = [r.decode(e) for j, e in enumerate(encoded) if j != victim]
    # every record except the damaged one is found, in order
    assert [(x.key, x.lsn, x.kind) for x in found] == [(x.key, x.lsn, x.kind) for x in expect]


@SETTINGS
@given(st.lists(recs, min_size=1, max_size=6), st.data())
def test_scan_torn_tail(ts, data):
    encoded = [_enc(t) for t in ts]
    whole = b"".join(encoded)
    cut = data.draw(st.integers(len(whole) - len(encoded[-1]), len(whole) - 1))
    items = list(r.scan(whole[:cut]))
    recs_found = [x for x in items if isinstance(x, r.Record)]
    assert [x.lsn for x in recs_found] == [r.decode(e).lsn for e in encoded[:-1]]
    if cut > len(whole) - len(encoded[-1]):
        assert isinstance(items[-1], r.Damage)


def test_zero_filled_and_garbage_are_damage():
    good = r.encode(r.PUT, "ns", "", b"k", b"value", lsn=7)
    buf = bytes(100) + good + b"\x00" * 50 + r.MAGIC_BYTES + b"garbage" * 20 + good
    found = [x for x in r.scan(buf) if isinstance(x, r.Record)]
    assert [x.key for x in found] == [b"k", b"k"]
    assert any(isinstance(x, r.Damage) for x in r.scan(buf))


def test_bad_value_does_not_swallow_next_record():
    a = bytearray(r.encode(r.PUT, "ns", "", b"a", b"x" * 100, lsn=1))
    b = r.encode(r.PUT, "ns", "", b"b", b"y" * 100, lsn=2)
    a[-5] ^= 1
    items = list(r.scan(bytes(a) + b))
    assert isinstance(items[0], r.Damage) and isinstance(items[0].error, r.BadValue)
    assert [x.key for x in items if isinstance(x, r.Record)] == [b"b"]


@settings(SETTINGS, derandomize=True, database=None)
@given(recs, st.integers(0, 2**40))
def test_stamp_head_sets_the_durable_field_and_keeps_the_record_valid(t, durable):
    """The log writer stamps a header it did not build (compaction's copies too): the record still
    decodes to the same fields, with the stamp (capped to its 32 bits: a lower bound stays true)."""
    buf = _enc(t)
    before = r.decode(buf)
    head = buf[:before.value_off]
    stamped = r.stamp_head(head, durable) + buf[before.value_off:]
    after = r.decode(stamped)
    assert after._replace(durable=0) == before and before.durable == 0
    assert after.durable == min(durable, r.MAX_DURABLE)
