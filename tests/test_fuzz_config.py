"""Fuzzing the node's configuration: TOML files with namespaces, pools, tenants, limits and the
other sections, as ``memkv serve --config FILE`` reads them (issue 19 item 5).

A bad file must give a clear, typed error (``memkv: error: ...``, exit 2) -- never a traceback,
never a node that half starts. Two levels:

- ``load_config`` in process, many documents: anything but a NodeConfig or a MemKVError is a bug;
- the real command, fewer documents: files whose values all have the right TOML types but may
  be absurd (zero, negative or huge sizes, fractions above 1, unknown pools or policies, ports out
  of range, missing TLS files), which pass the loader and meet the node's own checks. The node
  either serves (PING answers) or exits with a typed error, within the start timeout.

Deterministic (hypothesis ``derandomize=True``) and bounded.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv.config import NodeConfig, load_config
from memkv.errors import MemKVError

SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


# -- TOML text from Python values (tomllib reads, nothing in the stdlib writes)
def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def toml_doc(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, body in tables.items():
        out.append(f"[{name}]")
        out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
        out.append("")
    return "\n".join(out)


SIZES = ["64MiB", "1GiB", "0", "1", "1B", "-1MiB", "12QB", "1.5GiB", "", " 8 KiB ", "99999999TiB", "MiB"]
DURATIONS = ["24h", "30s", "0", "none", "-5s", "1x", "", "15m", "1e9h"]
ANY = st.recursive(st.one_of(st.none().map(lambda _: "none"), st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
                             st.floats(), st.text(max_size=12)),
                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                   max_leaves=6)


def _typed(kind: str) -> st.SearchStrategy[Any]:
    """A value of the right TOML type for a field of ``kind``, sensible or absurd."""
    return {
        "size": st.one_of(st.sampled_from(SIZES), st.integers(-(1 << 40), 1 << 45)),
        "duration": st.one_of(st.sampled_from(DURATIONS), st.integers(-10, 10 ** 6), st.floats(-1, 1e6)),
        "int": st.one_of(st.integers(-3, 70000), st.sampled_from([0, 1, 2, 65536, 1 << 31])),
        "port": st.integers(-1, 70000),
        "float": st.one_of(st.floats(-2, 3), st.sampled_from([0.0, 0.5, 1.0, 1.5, math.nan, math.inf])),
        "bool": st.booleans(),
        "str": st.one_of(st.sampled_from(["", "x", "shared", "session", "lru", "s3fifo", "memory", "durable",
                                          "r", "rw", "admin", "/nonexistent/file.pem", "127.0.0.1:0", "::1"]),
                         st.text(max_size=16)),
        "pool": st.sampled_from(["shared", "session", "other", ""]),
        "durability": st.sampled_from(["memory", "durable", "disk", ""]),
        "policy": st.sampled_from(["lru", "s3fifo", "fifo", ""]),
        "grants": st.dictionaries(st.sampled_from(["shared", "session", "nope", ""]),
                                  st.sampled_from(["r", "rw", "admin", "w", ""]), max_size=3),
    }[kind]


FIELDS: dict[str, dict[str, str]] = {
    "node": {"memory": "size", "disk": "size", "metrics_port": "port", "resp_port": "port",
             "onesided_tenants": "bool", "zone": "str", "node_id": "str"},
    "flash": {"segment_size": "size", "compaction_rate": "size", "compaction_threshold": "float",
              "snapshot_every": "int"},
    "limits": {"max_connections": "int", "max_inflight_bytes": "size", "tenant_inflight_bytes": "size",
               "idle_timeout": "duration", "frame_timeout": "duration", "min_payload_rate": "size",
               "write_timeout": "duration"},
    "tls": {"cert": "str", "key": "str", "ca": "str"},
    "audit": {"enabled": "bool", "max_bytes": "size", "keep": "int", "path": "str"},
    "security": {"rate": "float", "burst": "float", "no_store_ttl": "duration"},
}
NAMESPACE = {"pool": "pool", "durability": "durability", "replicas": "int", "ttl": "duration",
             "overwrite": "bool", "tenant_scoped": "bool"}
POOL = {"fraction": "float", "policy": "policy", "tenant_quota": "size"}
TENANT = {"token": "str", "grants": "grants", "quota": "size", "rate": "float", "burst": "float", "no_store": "bool"}


@st.composite
def documents(draw: Any, typed_only: bool = False) -> dict[str, dict[str, Any]]:
    """A config as tables: known sections and fields (right type, or with ``typed_only`` False
    sometimes any type), sometimes unknown keys and sections."""
    def value(kind: str) -> Any:
        if not typed_only and draw(st.integers(0, 5)) == 0:
            return draw(ANY)
        return draw(_typed(kind))

    def table(fields: dict[str, str]) -> dict[str, Any]:
        keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
        body = {k: value(fields[k]) for k in keys}
        if not typed_only and draw(st.integers(0, 7)) == 0:
            body[draw(st.text(min_size=1, max_size=8))] = draw(ANY)
        return body

    doc: dict[str, dict[str, Any]] = {}
    for section in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=4)):
        doc[section] = table(FIELDS[section])
    for name in draw(st.lists(st.sampled_from(["shared", "session", "blocks", "x y", ""]), unique=True, max_size=3)):
        doc[f"namespaces.{json.dumps(name)}"] = table(NAMESPACE)
    for name in draw(st.lists(st.sampled_from(["shared", "session", "extra"]), unique=True, max_size=2)):
        doc[f"pools.{name}"] = table(POOL)
    for name in draw(st.lists(st.sampled_from(["alice", "bob", "__internal", "é"]), unique=True, max_size=2)):
        doc[f"tenants.{json.dumps(name)}"] = table(TENANT)
    if not typed_only and draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(["nodes", "cluster", "events", "z"]))] = {"k": draw(ANY)}
    return doc


def _load(tmp: Path, text: str) -> NodeConfig | MemKVError:
    path = tmp / "memkv.toml"
    path.write_text(text)
    try:
        return load_config(path)
    except MemKVError as exc:
        return exc


def test_load_config_fuzz_only_typed_errors(tmp_path: Path) -> None:
    """Any document, any damage: load_config returns a config or raises a MemKVError."""
    seen = {"ok": 0, "typed": 0}

    @settings(SETTINGS, max_examples=600)
    @given(documents(), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=2))
    def run(doc: dict[str, dict[str, Any]], damage: list[tuple[int, bytes]]) -> None:
        raw = toml_doc(doc).encode()
        for off, junk in damage:  # damage to the text itself: the TOML parser's errors are typed too
            off %= max(1, len(raw))
            raw = raw[:off] + junk + raw[off + len(junk):]
        r = _load(tmp_path, raw.decode("utf-8", "replace"))
        seen["ok" if isinstance(r, NodeConfig) else "typed"] += 1

    run()
    assert seen["ok"] > 20 and seen["typed"] > 20, seen  # both sides of the loader were exercised
    print(f"load_config fuzz: {seen}")


# -- the real command
def _serve(tmp: Path, text: str, timeout: float = 20.0) -> tuple[str, str]:
    """Run ``memkv serve --config``: ("served", log) if it answered PING, ("error", stderr) if it
    exited with a typed error; fails the test on anything else."""
    cfg = tmp / "memkv.toml"
    cfg.write_text(text)
    data = tmp / "data"
    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "memkv.cli", "serve", "--config", str(cfg), "--listen",
                                 f"127.0.0.1:{port}", "--data-dir", str(data)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text_out = log.read_text(errors="replace")
                assert "Traceback" not in text_out, f"traceback for config:\n{text}\n---\n{text_out[-3000:]}"
                assert proc.returncode == 2 and "memkv: error:" in text_out, \
                    f"exit {proc.returncode} without a typed error for config:\n{text}\n---\n{text_out[-3000:]}"
                return "error", text_out
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            reply = _ping(port)  # any well-formed reply (tenants configured: a typed AuthError) is service
            assert reply is not None, f"the node accepted a connection but did not answer PING; config:\n{text}"
            text_out = log.read_text(errors="replace")
            assert "Traceback" not in text_out, f"traceback while serving with config:\n{text}\n{text_out[-3000:]}"
            return "served", text_out
        pytest.fail(f"memkv serve neither served nor exited within {timeout}s; config:\n{text}\n---\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _ping(port: int) -> Any:
    from memkv.protocol import codec
    from memkv.protocol.opcodes import Op

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(codec.encode_frame(Op.PING, 1, {}))
        reader = codec.FrameReader()
        while True:
            f = reader.next_frame()
            if isinstance(f, codec.Frame):
                return f
            data = s.recv(1 << 16)
            if not data:
                return None
            reader.feed(data)


@pytest.mark.timeout(900)
def test_memkv_serve_with_fuzzed_configs_serves_or_refuses_cleanly(tmp_path_factory) -> None:
    seen = {"served": 0, "error": 0}

    @settings(SETTINGS, max_examples=int(os.environ.get("MEMKV_FUZZ_SERVE_EXAMPLES", "16")))
    @given(documents(typed_only=True))
    def run(doc: dict[str, dict[str, Any]]) -> None:
        doc.setdefault("node", {}).setdefault("memory", "16MiB")  # keep the region small unless fuzzed
        outcome, _ = _serve(tmp_path_factory.mktemp("cfg"), toml_doc(doc))
        seen[outcome] += 1

    run()
    assert seen["error"] > 0, seen
    print(f"memkv serve config fuzz: {seen}")


# What the fuzz found (tracebacks before memkv/config.py read values with typed accessors): each a
# typed InvalidArgument now, naming the section and key.
@pytest.mark.parametrize(("text", "names"), [
    ('[node]\nmetrics_port = "abc"\n', "[node] metrics_port"),
    ('[namespaces.shared]\nttl = [1, 2]\n', "[namespaces.shared] ttl"),
    ('[namespaces.shared]\nreplicas = "two"\n', "[namespaces.shared] replicas"),
    ('[namespaces.shared]\noverwrite = "false"\n', "[namespaces.shared] overwrite"),  # was silently True
    ('namespaces = 3\n', "[namespaces] must be a table"),
    ('[namespaces]\nshared = 1\n', "[namespaces.shared] must be a table"),
    ('[pools.shared]\nfraction = "none"\n', "[pools.shared] fraction"),
    ('[tenants.alice]\ntoken = "t"\nburst = "none"\n', "[tenants.alice] burst"),
    ('[tenants.alice]\ntoken = "t"\ngrants = true\n', "[tenants.alice.grants] must be a table"),
    ('[tenants.alice]\ntoken = 5\n', "[tenants.alice] token"),
    ('[limits]\nmax_connections = [1]\n', "[limits] max_connections"),
    ('[flash]\nsegment_size = -5\n', "[flash] segment_size"),
    ('node = "x"\n', "[node] must be a table"),
])
def test_bad_values_are_typed_errors_naming_the_key(tmp_path: Path, text: str, names: str) -> None:
    r = _load(tmp_path, text)
    assert isinstance(r, MemKVError) and names in r.message, r


def test_a_config_that_is_not_utf8_is_a_typed_error(tmp_path: Path) -> None:
    """Found by atheris (tests/fuzz/atheris_config.py): a byte that is not UTF-8 was a
    UnicodeDecodeError traceback from ``memkv serve --config``."""
    path = tmp_path / "memkv.toml"
    path.write_bytes(b'[node]\nzone = "\xbb"\n')
    with pytest.raises(MemKVError, match="cannot read config"):
        load_config(path)
