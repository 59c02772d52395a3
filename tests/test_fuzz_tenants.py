"""Fuzzing the tenant files: a standalone node's ``<data dir>/tenants.json`` and a cluster's tenant
records in etcd (issue 19 item 5).

Both are written outside the node (by hand, by ``memkv tenant ...``, by another version) and read
by it at start and, for etcd, while it runs. A bad record must give a clear typed error -- a node
refuses to start on a bad ``tenants.json`` naming the file; a bad etcd record is logged and ignored
-- never a traceback, never a node that dies. And every reader of a tenant (config file,
tenants.json, etcd) must accept and refuse the same things: the oracle below compares the JSON
reader with the TOML one.

What it found (each a reproducer below): ``"quota": [1]`` was a TypeError out of the etcd
watch and out of ``memkv serve`` at start (tenants.json); ``"no_store": "false"`` was silently
true; ``"rate": NaN``/``Infinity`` were accepted; a ``tenants.json`` that is a list, or whose
``revoked`` is a number, was an AttributeError/TypeError traceback.

Deterministic (hypothesis ``derandomize=True``) and bounded; real node processes and a real etcd.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import poll
from conftest_etcd import LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_config import SETTINGS, _load, _serve, toml_doc

from memkv.client import SyncClient
from memkv.client.etcd import Etcd
from memkv.config import GRANT_LEVELS, NodeConfig, TenantConfig
from memkv.engine.store import Store
from memkv.errors import AuthError, InvalidArgument, MemKVError
from memkv.server.tenants import TENANTS_FILE, TenantRegistry, tenant_from_json

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 45), st.floats(),
                    st.text(max_size=8), st.sampled_from(["64MiB", "1GiB", "-1MiB", "x", "", "false", "rw"]))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=5)
FIELDS = {
    "token": st.one_of(st.sampled_from(["tok-1", "a-long-token-secret", ""]), JSONISH),
    "grants": st.one_of(st.dictionaries(st.sampled_from(["session", "shared", "*", ""]),
                                        st.sampled_from([*GRANT_LEVELS, "x", "RW"]) | JSONISH, max_size=3), JSONISH),
    "quota": st.one_of(st.sampled_from(["64MiB", "0", "1.5GiB", "-1MiB", "12QB"]), st.integers(-5, 1 << 40), JSONISH),
    "rate": st.one_of(st.floats(), st.integers(-3, 1000), JSONISH),
    "burst": st.one_of(st.floats(), st.integers(-3, 1000), JSONISH),
    "no_store": st.one_of(st.booleans(), st.sampled_from(["false", "true", 0, 1]), JSONISH),
}


@st.composite
def tenant_records(draw: Any) -> Any:
    """A tenant record: usually a table of known fields (some absurd), sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSONISH)
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True))
    rec = {k: draw(FIELDS[k]) for k in keys}
    if draw(st.booleans()):
        rec["token"] = "tok-" + draw(st.text("abc", min_size=1, max_size=6))
    if draw(st.integers(0, 5)) == 0:
        rec[draw(st.text(max_size=4))] = draw(JSONISH)  # an unknown field: ignored
    return rec


def _well_formed(t: TenantConfig) -> None:
    """What the node relies on once a tenant is accepted."""
    assert isinstance(t.token, str) and t.token
    assert all(isinstance(k, str) and v in GRANT_LEVELS for k, v in t.grants.items())
    assert t.quota is None or (isinstance(t.quota, int) and t.quota >= 0)
    for v in (t.rate, t.burst):
        assert v is None or (isinstance(v, float) and 0 < v < math.inf)
    assert isinstance(t.no_store, bool)


def _toml_can_say(v: Any) -> bool:
    """TOML has no null; json's NaN/Infinity and big integers it has, but say them differently."""
    if v is None:
        return False
    if isinstance(v, list):
        return all(_toml_can_say(x) for x in v)
    if isinstance(v, dict):
        return all(_toml_can_say(k) and _toml_can_say(x) for k, x in v.items())
    if isinstance(v, int) and not isinstance(v, bool):
        return -(1 << 63) <= v < 1 << 63
    return not isinstance(v, str) or "\x7f" not in v  # json.dumps leaves DEL as is; TOML wants it escaped


def test_every_reader_of_a_tenant_accepts_and_refuses_the_same(tmp_path: Path) -> None:
    """tenant_from_json (tenants.json, etcd) returns a well-formed tenant or raises InvalidArgument;
    a record TOML can express gives the same tenant, or a typed error too, through the config file."""
    seen = {"ok": 0, "typed": 0, "compared": 0}

    @settings(SETTINGS, max_examples=int(os.environ.get("MEMKV_FUZZ_TENANT_EXAMPLES", "800")))
    @given(st.sampled_from(["alice", "__cluster", "b.c", ""]), tenant_records())
    def run(name: str, rec: Any) -> None:
        try:
            t = tenant_from_json(name, rec)
        except InvalidArgument:
            t = None
            seen["typed"] += 1
        else:
            _well_formed(t)
            seen["ok"] += 1
        if name and "." not in name and isinstance(rec, dict) and _toml_can_say(rec) \
                and all(k.isidentifier() for k in rec):
            seen["compared"] += 1
            c = _load(tmp_path, toml_doc({f"tenants.{name}": rec}))
            if t is None:
                assert isinstance(c, MemKVError), (rec, c)
            else:
                assert isinstance(c, NodeConfig) and c.tenants[name] == t, (rec, c)

    run()
    assert seen["ok"] > 50 and seen["typed"] > 50 and seen["compared"] > 100, seen
    print(f"tenant record fuzz: {seen}")


def _registry(tmp: Path, data: bytes) -> TenantRegistry | InvalidArgument:
    (tmp / TENANTS_FILE).write_bytes(data)
    store = Store(memory=1 << 20, shm_dir=str(tmp))
    try:
        reg = TenantRegistry({"root": TenantConfig("root", "root-token", {"*": "admin"})}, store, data_dir=str(tmp))
        try:
            reg.load_file()
        except InvalidArgument as exc:
            assert TENANTS_FILE in exc.message, exc.message  # the error names the file
            return exc
        return reg
    finally:
        store.close()


@st.composite
def tenants_files(draw: Any) -> bytes:
    """tenants.json as ``persist_sync`` writes it, with fuzzed records, shapes and damage."""
    doc: Any = {"tenants": draw(st.dictionaries(st.sampled_from(["alice", "bob", "root", "__x"]), tenant_records(),
                                                max_size=3)),
                "revoked": draw(st.one_of(st.lists(st.sampled_from(["root", "alice", "carol"]), max_size=2), JSONISH))}
    if draw(st.integers(0, 6)) == 0:
        doc = draw(JSONISH)
    data = json.dumps(doc).encode()
    for off, junk in draw(st.lists(st.tuples(st.integers(0, 4096), st.binary(max_size=3)), max_size=1)):
        off %= max(1, len(data))
        data = data[:off] + junk + data[off + len(junk):]
    return data


GOOD_FILES = st.builds(
    lambda ts, rv: json.dumps({"tenants": ts, "revoked": rv}).encode(),
    st.dictionaries(st.sampled_from(["alice", "bob"]),
                    st.fixed_dictionaries({"token": st.sampled_from(["tok-a", "tok-b"]),
                                           "grants": st.dictionaries(st.sampled_from(["session", "shared", "*"]),
                                                                     st.sampled_from(GRANT_LEVELS))},
                                          optional={"quota": st.sampled_from(["1MiB", 4096]),
                                                    "rate": st.floats(0.5, 1e6), "no_store": st.booleans()}),
                    max_size=2),
    st.lists(st.sampled_from(["root", "carol"]), max_size=2))


def test_tenants_file_loads_or_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    seen = {"ok": 0, "typed": 0}

    @settings(SETTINGS, max_examples=int(os.environ.get("MEMKV_FUZZ_TENANT_EXAMPLES", "500")))
    @given(tenants_files())
    def run(data: bytes) -> None:
        r = _registry(tmp_path, data)
        if isinstance(r, InvalidArgument):
            seen["typed"] += 1
            return
        seen["ok"] += 1
        for t in r.tenants.values():
            _well_formed(t)
        assert not (r.revoked & set(r.tenants) - set(r.runtime))  # a revoked configured tenant is gone

    run()
    assert seen["ok"] > 30 and seen["typed"] > 30, seen
    print(f"tenants.json fuzz: {seen}")


# What the fuzz found: each was a traceback (or, for no_store, a silently wrong tenant) before
# memkv/config.py's tenant_from_table became the one reader of a tenant.
@pytest.mark.parametrize(("data", "says"), [
    (b'{"tenants": {"alice": {"token": "t", "quota": [1]}}}', "quota"),  # TypeError
    (b'{"tenants": {"alice": {"token": "t", "quota": 1.5}}}', "quota"),  # TypeError
    (b'{"tenants": {"alice": {"token": "t", "no_store": "false"}}}', "no_store"),  # was True
    (b'{"tenants": {"alice": {"token": "t", "rate": NaN}}}', "rate"),  # accepted
    (b'{"tenants": {"alice": {"token": "t", "burst": Infinity}}}', "burst"),  # accepted
    (b'[1, 2]', TENANTS_FILE),  # AttributeError
    (b'{"revoked": 5}', TENANTS_FILE),  # TypeError
    (b'{"revoked": [["root"]]}', TENANTS_FILE),  # TypeError (unhashable)
    (b'{"tenants": []}', TENANTS_FILE),  # AttributeError
])
def test_bad_tenants_files_found_by_the_fuzz(tmp_path: Path, data: bytes, says: str) -> None:
    r = _registry(tmp_path, data)
    assert isinstance(r, InvalidArgument) and says in r.message, r


@pytest.mark.timeout(600)
def test_memkv_serve_with_fuzzed_tenants_files_serves_or_refuses_cleanly(tmp_path_factory: Any) -> None:
    """The real command with a fuzzed tenants.json in its data dir: answers PING or exits 2 with
    ``memkv: error: ...``, never a traceback (``_serve`` checks both)."""
    seen = {"served": 0, "error": 0}

    @settings(SETTINGS, max_examples=int(os.environ.get("MEMKV_FUZZ_SERVE_EXAMPLES", "10")))
    @given(st.one_of(GOOD_FILES, tenants_files()))
    def run(data: bytes) -> None:
        tmp = tmp_path_factory.mktemp("tenants")
        (tmp / "data").mkdir()
        (tmp / "data" / TENANTS_FILE).write_bytes(data)
        outcome, _ = _serve(tmp, '[node]\nmemory = "16MiB"\n')
        seen[outcome] += 1

    run()
    assert seen["served"] > 0 and seen["error"] > 0, seen
    print(f"memkv serve tenants.json fuzz: {seen}")


@pytest.mark.timeout(240)
def test_a_bad_tenant_record_in_etcd_is_ignored_and_the_node_keeps_serving(etcd_server: Any,
                                                                           start_node: Any) -> None:
    """Tenant records in etcd are read at start and watched: a malformed one is logged and ignored
    (``quota: [1]`` raised a TypeError out of both before, at start a node that never came up), the
    good ones work, and one that becomes well-formed later is picked up by the watch."""
    name = "fuzz-tenants"
    good = {"token": "alice-secret-alice", "grants": {"session": "rw"}}
    etcd = Etcd(etcd_server.endpoint, timeout=3.0)
    try:
        etcd.put(f"/memkv/{name}/tenants/alice", json.dumps(good))
        etcd.put(f"/memkv/{name}/tenants/bad1", json.dumps({"token": "b", "quota": [1]}))
        etcd.put(f"/memkv/{name}/tenants/bad2", b"\xff not json")
        cl = LocalCluster(etcd_server, name, start_node, "[cluster]\nreplicas = 1\nlease_ttl = 2\n")
        node = cl.add_node("n1")
        cl.wait_members({"n1"})
        with SyncClient.connect(node.url, tenant="alice", token=good["token"], transport="tcp", timeout=10.0) as c:
            c.put(b"k", b"v", namespace="session")
            assert c.get(b"k", namespace="session") == b"v"
        # while it runs: more bad records through the watch, then bob well-formed
        etcd.put(f"/memkv/{name}/tenants/bad3", json.dumps({"token": "c", "no_store": "false", "rate": [2]}))
        etcd.put(f"/memkv/{name}/tenants/bob", json.dumps({"token": "b", "quota": [1]}))
        etcd.put(f"/memkv/{name}/tenants/bob", json.dumps({"token": "bob-secret-bob", "grants": {"session": "rw"}}))
        def bob_writes() -> bool:
            try:
                with SyncClient.connect(node.url, tenant="bob", token="bob-secret-bob", transport="tcp",
                                        timeout=10.0) as c:
                    c.put(b"kb", b"vb", namespace="session")
                return True
            except AuthError:
                return False

        poll(bob_writes, 30, "bob's well-formed record to reach the node through the watch")
        with pytest.raises(AuthError):  # a malformed record is no tenant
            SyncClient.connect(node.url, tenant="bad1", token="b", transport="tcp", timeout=10.0)
        assert node.running
        out = node.output()
        assert "Traceback" not in out, out[-3000:]
        assert "tenant bad1 from etcd is malformed" in out and "tenant bad3 from etcd is malformed" in out, out[-3000:]
    finally:
        etcd.close()
