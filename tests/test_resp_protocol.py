"""RESP parser/serializer (memkv.protocol.resp): unit tests and hypothesis fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memkv.protocol import resp as R

SMALL = R.RespLimits(max_args=64, max_bulk=4096, max_inline=256, stream_threshold=64)


def drain(reader: R.CommandReader) -> list[list[bytes]]:
    out = []
    while True:
        ev = reader.next()
        if isinstance(ev, R.LargeArg):
            reader.buffer_large()
            continue
        if isinstance(ev, R.NeedData):
            return out
        out.append(ev)


def test_multibulk_and_inline() -> None:
    cmds, used = R.parse_commands(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n  set a 'b c'\r\n*1\r\n$4\r\nPI")
    assert cmds == [[b"GET", b"k"], [b"PING"], [b"set", b"a", b"b c"]]
    assert used == len(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n  set a 'b c'\r\n")


def test_empty_multibulk_and_blank_lines_are_ignored() -> None:
    assert R.parse_commands(b"*0\r\n*-1\r\n\r\n\r\nPING\r\n")[0] == [[b"PING"]]


@pytest.mark.parametrize("bad", [b"*x\r\n", b"*2\r\n+3\r\n", b"*1\r\n$-5\r\n", b"*1\r\n$3\r\nabcXY",
                                 b"*99999999999\r\n", b"*1\r\n$99999999\r\n", b"set \"a\r\n"])
def test_malformed_input_is_a_resp_error(bad: bytes) -> None:
    with pytest.raises(R.RespError):
        R.parse_commands(bad, SMALL)


def test_large_argument_is_streamed_into_caller_buffer() -> None:
    value = bytes(range(256)) * 40  # 10 KiB
    wire = R.encode_command("SET", "k", value, "EX", "5")
    reader = R.CommandReader(R.RespLimits(stream_threshold=1024), bufsize=2048)
    reader.feed(wire[:1500])
    ev = reader.next()
    assert isinstance(ev, R.LargeArg) and ev.args == [b"SET", b"k"] and ev.length == len(value) and ev.nargs == 5
    dest = bytearray(len(value))
    got = reader.take_into(memoryview(dest))
    rest = wire[1500:]
    # the caller receives the remaining value bytes itself
    need = len(value) - got
    dest[got:] = rest[:need]
    reader.consumed_directly(need)
    reader.finish_large("PLACEHOLDER")
    reader.feed(rest[need:])
    assert reader.next() == [b"SET", b"k", "PLACEHOLDER", b"EX", b"5"]
    assert bytes(dest) == value
    assert isinstance(reader.next(), R.NeedData)


def test_serializers_roundtrip() -> None:
    for proto in (2, 3):
        for value in [None, 0, -7, b"", b"x\r\ny", [b"a", [1, None]], {b"k": [b"v"]}, True, 1.5]:
            got, end = R.parse_reply(R.encode(value, proto))
            want = value
            if proto == 2 and isinstance(value, dict):
                want = [x for kv in value.items() for x in kv]
            if proto == 2 and isinstance(value, bool):
                want = int(value)
            if proto == 2 and isinstance(value, float):
                want = repr(value).encode()
            assert got == want
    assert R.parse_reply(R.error("boom")) [0] == R.ReplyError("ERR boom")
    assert R.parse_reply(R.error("NOAUTH Authentication required."))[0] == R.ReplyError(
        "NOAUTH Authentication required.")
    assert R.parse_reply(b"$5\r\nab") is None


commands = st.lists(st.lists(st.binary(max_size=200), min_size=1, max_size=6), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(commands, st.lists(st.integers(1, 64), max_size=40))
def test_any_chunking_gives_the_same_commands(cmds: list[list[bytes]], cuts: list[int]) -> None:
    wire = b"".join(R.encode_command(*c) for c in cmds)
    reader = R.CommandReader(SMALL, bufsize=32)
    out: list[list[bytes]] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[pos:pos + cut])
        pos += cut
        out += drain(reader)
        if pos >= len(wire):
            break
    reader.feed(wire[pos:])
    out += drain(reader)
    assert out == cmds


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_input_never_raises_anything_but_resp_error(data: bytes) -> None:
    reader = R.CommandReader(SMALL, bufsize=16)
    try:
        for i in range(0, len(data), 7):
            reader.feed(data[i:i + 7])
            drain(reader)
    except R.RespError:
        pass


prefixes = st.sampled_from([b"*", b"$", b"*2\r\n$", b"*1\r\n$3\r\n", b"+", b"-", b":", b"%", b"~", b"_", b"#", b",",
                            b"=", b"|", b">", b"(", b"!"])


@settings(max_examples=1500, deadline=None)
@given(prefixes, st.binary(max_size=200))
def test_fuzz_commands_with_resp_prefixes(prefix: bytes, data: bytes) -> None:
    try:
        R.parse_commands(prefix + data, SMALL)
    except R.RespError:
        pass


@settings(max_examples=1500, deadline=None)
@given(prefixes, st.binary(max_size=200))
def test_fuzz_reply_parser(prefix: bytes, data: bytes) -> None:
    try:
        R.parse_reply(prefix + data, 0, SMALL)
    except R.RespError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.integers(-2**62, 2**62) | st.binary(max_size=50),
                    lambda inner: st.lists(inner, max_size=5), max_leaves=20), st.integers(0, 400))
def test_truncated_replies_are_incomplete_never_wrong(value: object, cut: int) -> None:
    wire = R.encode(value, 3)
    if cut >= len(wire):
        assert R.parse_reply(wire) == (value, len(wire))
    else:
        assert R.parse_reply(wire[:cut]) is None


def _outcome(data: bytes, cuts: list[int], fast: bool) -> tuple[list[list[bytes]], str | None]:
    """The commands a reader returns for ``data`` fed in pieces, and the error it raised, if any."""
    reader = R.CommandReader(SMALL, bufsize=16, hiredis=fast)
    out: list[list[bytes]] = []
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            reader.feed(data[pos:pos + cut])
            pos += cut
            out += drain(reader)
    except R.RespError as exc:
        return out, str(exc)
    return out, None


wire_pieces = st.lists(st.one_of(
    st.lists(st.binary(max_size=80), min_size=0, max_size=4).map(lambda c: R.encode_command(*c) if c else b"*0\r\n"),
    prefixes, st.sampled_from([b"\r\n", b"$3\r\nabc\r\n", b"*1\r\n$3\r\nabcXY", b"*1\r\n+OK\r\n",
                              b"*1\r\n:1\r\n", b"*2\r\n*1\r\n$1\r\na\r\n", b"*1\r\n$-1\r\n", b"*-1\r\n",
                              b"*1\r\n$03\r\nabc\r\n", b"*99\r\n", b"*1\r\n$5000\r\n", b"PING\r\n",
                              b"*4294967295\r\n", b"*2000000000\r\n$1\r\na\r\n"]),
    st.binary(max_size=20)), max_size=8).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(wire_pieces, st.lists(st.integers(1, 64), max_size=20))
def test_hiredis_and_the_checked_parser_agree(data: bytes, cuts: list[int]) -> None:
    """Whatever the bytes and however they are split: the same commands, and an error exactly where
    the checked parser raises one (hiredis alone is laxer: no CRLF check after a bulk, statuses and
    integers as arguments, no limits)."""
    fast, slow = _outcome(data, cuts, True), _outcome(data, cuts, False)
    assert fast[0] == slow[0]
    assert (fast[1] is None) == (slow[1] is None)


def test_pipelined_commands_then_a_partial_one_that_completes_later() -> None:
    """hiredis takes the complete commands, the checked parser the partial one, hiredis the next."""
    cmds = [[b"SET", b"k%d" % i, b"v" * i] for i in range(50)]
    wire = b"".join(R.encode_command(*c) for c in cmds)
    reader = R.CommandReader()
    reader.feed(wire[:-5])
    got = drain(reader)
    assert got == cmds[:-1]
    reader.feed(wire[-5:] + wire)
    assert drain(reader) == cmds[-1:] + cmds and reader.buffered == 0
