"""Fuzzing the RESP front end of a real node at the command level (issue 19 item 5).

tests/test_resp_protocol.py fuzzes the pure parser and tests/test_hardening.py throws raw
bytes at the port; here the inputs are well-formed RESP commands -- every command the node
knows, in any case, with arguments drawn from keys, numbers, option words and junk, pipelined
on one connection, MULTI/EXEC and HELLO 3 included -- so they get past the parser into the
command handlers. For every command sent, exactly one well-formed reply must come back (a
connection may close only after QUIT or a protocol error), never "ERR internal error" (what
the dispatcher answers when a handler raised something it did not mean to), and never a hang.

A second test checks the replies against a model (a dict per namespace) for the data
commands, with SELECT between the immutable ``shared`` namespace and the overwritable
``session`` one. Afterwards the node must be alive, hold intact every value written before the
fuzzing, and have logged no traceback.

Bounded and deterministic: hypothesis with ``derandomize=True`` and fixed example counts;
``make fuzz`` runs the longer, coverage-guided atheris harnesses (tests/fuzz/).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

import pytest
from conftest import free_port, wait_for_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv.client import SyncClient
from memkv.protocol import resp as R
from memkv.server.resp import COMMANDS

CONFIG = """
[namespaces.durable]
durability = "durable"
overwrite = true
"""
SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
# FLUSHDB would take the values written before the fuzzing (which the end checks) with it
NAMES = sorted(n.decode() for n in COMMANDS if n != b"FLUSHDB")
WORDS = ["EX", "PX", "EXAT", "PXAT", "NX", "XX", "GET", "KEEPTTL", "MATCH", "COUNT", "TYPE", "SETNAME",
         "GETNAME", "ID", "INFO", "LIST", "KILL", "REPLY", "ON", "OFF", "SKIP", "AUTH", "SETINFO", "LIB-NAME",
         "DOCS", "GETKEYS", "keyspace", "server", "memory", "all", "*", "string", "default", "maxmemory"]


@pytest.fixture(scope="module")
def resp_node(tmp_path_factory):
    from conftest import NodeProc

    workdir = tmp_path_factory.mktemp("respfuzz")
    (workdir / "memkv.toml").write_text(CONFIG)
    port = free_port()
    node = NodeProc(["--config", str(workdir / "memkv.toml"), "--resp-port", str(port)], workdir)
    node.start()
    wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
    node.resp_port = port
    rng = __import__("random").Random(5)
    node.known = {f"known-{i}".encode(): rng.randbytes(rng.choice([1, 300, 5000])) for i in range(20)}
    with SyncClient.connect(node.url) as c:
        c.put_many(list(node.known.items()))
        c.pin(list(node.known), ttl=3600)
        c.put_many(list(node.known.items()), namespace="durable")
    yield node
    node.kill()


def _arg() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from([b"k0", b"k1", b"k2", b"k*", b"*"]),
        st.sampled_from([w.encode() for w in WORDS]),
        st.integers(-(1 << 64), 1 << 64).map(lambda n: str(n).encode()),
        st.sampled_from([b"0", b"-1", b"1", b"3", b"2", b"inf", b"-inf", b"nan", b"1e3", b"0x10", b"+1", b" 1",
                         b"9" * 30, b"", b"\r\n", b"\x00", b"*", b"$-1"]),
        st.binary(max_size=40),
        st.binary(min_size=500, max_size=700),  # around the 512-byte key limit
    )


def _command() -> st.SearchStrategy[list[bytes]]:
    name = st.sampled_from(NAMES).flatmap(lambda n: st.sampled_from([n, n.lower(), n.capitalize()]))
    return st.tuples(name, st.lists(_arg(), max_size=6)).map(lambda t: [t[0].encode(), *t[1]])


def _exchange(port: int, commands: list[list[bytes]], timeout: float = 10.0) -> list[Any]:
    """Send the commands pipelined; returns the replies (fewer only if the server closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(b"".join(R.encode_command(*c) for c in commands))
        buf = bytearray()
        replies: list[Any] = []
        pos = 0
        deadline = time.monotonic() + timeout
        while len(replies) < len(commands):
            r = R.parse_reply(buf, pos)
            if r is not None:
                replies.append(r[0])
                pos = r[1]
                continue
            if time.monotonic() > deadline:
                pytest.fail(f"no reply {len(replies) + 1} of {len(commands)} within {timeout}s: "
                            f"{commands[len(replies)][:3]!r}")
            try:
                chunk = s.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                break
            buf += chunk
        return replies
    finally:
        s.close()


def _closing(command: list[bytes], reply: Any) -> bool:
    name = command[0].upper()
    return name in (b"QUIT",) or (isinstance(reply, R.ReplyError) and "Protocol error" in reply.message)


def _check_replies(commands: list[list[bytes]], replies: list[Any]) -> None:
    for c, r in zip(commands, replies, strict=False):
        if isinstance(r, R.ReplyError):
            assert "internal error" not in r.message, (c[:4], r)
    if len(replies) < len(commands):
        assert replies and _closing(commands[len(replies) - 1], replies[-1]), \
            f"connection closed after {len(replies)} of {len(commands)} replies; next {commands[len(replies)][:3]!r}"


def _node_healthy(node) -> None:
    assert node.running, node.output()[-3000:]
    with SyncClient.connect(node.url, timeout=10) as c:
        assert c.get_many(list(node.known)) == list(node.known.values())
        assert c.get_many(list(node.known), namespace="durable") == list(node.known.values())
    log = node.output()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]


def test_random_command_pipelines(resp_node) -> None:
    count = itertools.count()

    @settings(SETTINGS, max_examples=int(os.environ.get("MEMKV_FUZZ_RESP_EXAMPLES", "300")))
    @given(st.lists(_command(), min_size=1, max_size=20), st.booleans(), st.booleans())
    def run(commands: list[list[bytes]], multi: bool, resp3: bool) -> None:
        next(count)
        pre = ([[b"HELLO", b"3"]] if resp3 else []) + ([[b"MULTI"]] if multi else [])
        cmds = pre + commands + ([[b"EXEC"]] if multi else [])
        replies = _exchange(resp_node.resp_port, cmds)
        _check_replies(cmds, replies)

    run()
    _node_healthy(resp_node)
    with SyncClient.connect(resp_node.url) as c:  # the fuzz reached the handlers, not only the dispatcher
        ran = {k for k, v in c.stats()["server"]["ops"].items() if k.startswith("RESP_") and v}
    assert len(ran) >= 25, sorted(ran)
    print(f"RESP command fuzz: {next(count)} pipelines, {len(ran)} command handlers reached")


# -- model-based: the data commands against a dict per namespace
KEYS = [f"m{i}".encode() for i in range(5)]
VALUES = st.sampled_from([b"a", b"bb", b"", b"x" * 100, b"\x00\r\n", b"a"])


def _model_op() -> st.SearchStrategy[list[bytes]]:
    k = st.sampled_from(KEYS)
    ks = st.lists(k, min_size=1, max_size=4, unique=True)
    return st.one_of(
        st.tuples(k, VALUES, st.sampled_from([[], [b"NX"], [b"XX"], [b"GET"]])).map(
            lambda t: [b"SET", t[0], t[1], *t[2]]),
        k.map(lambda x: [b"GET", x]),
        ks.map(lambda x: [b"DEL", *x]),
        ks.map(lambda x: [b"EXISTS", *x]),
        st.lists(k, min_size=1, max_size=4).map(lambda x: [b"MGET", *x]),
        st.lists(st.tuples(k, VALUES), min_size=1, max_size=3).map(
            lambda ps: [b"MSET", *[b for p in ps for b in p]]),
        k.map(lambda x: [b"STRLEN", x]),
        st.tuples(k, VALUES).map(lambda t: [b"SETNX", *t]),
        st.sampled_from([[b"SELECT", b"0"], [b"SELECT", b"1"]]),
    )


class Model:
    """What the node must answer: ``shared`` (db 0) keeps values immutable, ``session`` (db 1) not."""

    def __init__(self) -> None:
        self.db = 0
        self.data: dict[int, dict[bytes, bytes]] = {0: {}, 1: {}}

    def _set(self, k: bytes, v: bytes) -> str | None:
        d = self.data[self.db]
        if self.db == 0 and k in d and d[k] != v:
            return "different bytes"
        d[k] = v
        return None

    def apply(self, c: list[bytes]) -> Any:
        d = self.data[self.db]
        name, args = c[0], c[1:]
        if name == b"SELECT":
            self.db = int(args[0])
            return "OK"
        if name == b"SET":
            k, v, opts = args[0], args[1], args[2:]
            old = d.get(k)
            if (b"NX" in opts and old is not None) or (b"XX" in opts and old is None):
                return None
            err = self._set(k, v)
            if err:
                return R.ReplyError(err)
            return old if b"GET" in opts else "OK"
        if name == b"SETNX":
            if args[0] in d:
                return 0
            self._set(args[0], args[1])  # absent: cannot conflict
            return 1
        if name == b"GET":
            return d.get(args[0])
        if name == b"MGET":
            return [d.get(k) for k in args]
        if name == b"MSET":
            errs = [self._set(args[i], args[i + 1]) for i in range(0, len(args), 2)]
            return R.ReplyError(next(e for e in errs if e)) if any(errs) else "OK"
        if name == b"DEL":
            return sum(d.pop(k, None) is not None for k in args)
        if name == b"EXISTS":
            return sum(k in d for k in args)
        if name == b"STRLEN":
            return len(d.get(args[0], b""))
        raise AssertionError(name)


def _same(want: Any, got: Any) -> bool:
    if isinstance(want, R.ReplyError):
        return isinstance(got, R.ReplyError) and want.message in got.message
    return want == got


def test_data_commands_match_a_model(resp_node) -> None:
    prefix = itertools.count()

    @settings(SETTINGS, max_examples=200)
    @given(st.lists(_model_op(), min_size=1, max_size=30))
    def run(ops: list[list[bytes]]) -> None:
        p = f"x{next(prefix)}/".encode()  # a key space per example
        named = [[c[0], *[p + a if a in KEYS else a for a in c[1:]]] for c in ops]  # values are never key names
        model = Model()
        want = [model.apply(c) for c in ops]
        got = _exchange(resp_node.resp_port, named)
        assert len(got) == len(named)
        for c, w, g in zip(named, want, got, strict=True):
            assert _same(w, g), (c, w, g)

    run()
    _node_healthy(resp_node)
