"""Rebalancer tests (issue #5): real etcd, real node processes, a concurrent read/write load.

Every scenario runs a load that records each acknowledged write and checks
every read against it; at the end: no acknowledged write lost, no corrupt
read, no read failing more than one retry, the map valid (R distinct live
replicas per slot, nothing pending) and every replica of every slot holding
the slot's values (so the data really moved, reads did not just hit the old
primary). No wall-clock speed asserts: every wait is a poll with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from conftest import poll
from conftest_etcd import LocalCluster

from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot, leader_key
from memkv.client.etcd import Etcd
from memkv.cluster.rebalancer import migrations_prefix, throttle_key, under_replicated

pytestmark = pytest.mark.timeout(240)

VALUE = 4096
PRELOAD = 2500  # ~10 MB, x R=2


def value_of(key: bytes) -> bytes:
    return (hashlib.sha256(key).digest() * (VALUE // 32 + 1))[:VALUE]


class Load:
    """A writer and a reader thread over one cluster client; records every acknowledged write."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.acked: list[bytes] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.write_errors = 0
        self.reads = 0
        self.corrupt: list[bytes] = []
        self.missing: list[bytes] = []
        self.read_failed: list[str] = []  # failed twice in a row
        self.under_replicated_seen = 0
        self.threads = [threading.Thread(target=self._writer, daemon=True),
                        threading.Thread(target=self._reader, daemon=True)]

    def preload(self, n: int) -> None:
        with SyncClient.connect(self.url, transport="tcp", timeout=10.0) as c:
            keys = [f"{self.prefix}-pre-{i}".encode() for i in range(n)]
            for i in range(0, n, 200):
                part = keys[i:i + 200]
                c.put_many({k: value_of(k) for k in part})
                self.acked.extend(part)

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def _writer(self) -> None:
        with SyncClient.connect(self.url, transport="tcp", timeout=5.0) as c:
            i = 0
            while not self.stop.is_set():
                k = f"{self.prefix}-w-{i}".encode()
                i += 1
                try:
                    c.put(k, value_of(k))
                except Exception:  # noqa: BLE001 - an unacknowledged write may be lost
                    self.write_errors += 1
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.acked.append(k)
                time.sleep(0.002)

    def _reader(self) -> None:
        rng = random.Random(7)
        with SyncClient.connect(self.url, transport="tcp", timeout=5.0) as c:
            while not self.stop.is_set():
                with self.lock:
                    k = self.acked[rng.randrange(len(self.acked))] if self.acked else None
                if k is None:
                    time.sleep(0.01)
                    continue
                self._check(c, k)
                time.sleep(0.001)

    def _check(self, c: SyncClient, k: bytes) -> None:
        for attempt in range(2):
            try:
                v = c.get(k)
            except Exception as exc:  # noqa: BLE001
                if attempt == 1:
                    self.read_failed.append(f"{k!r}: {exc!r}")
                continue
            self.reads += 1
            if v is None:
                self.missing.append(k)
            elif v != value_of(k):
                self.corrupt.append(k)
            return

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def verify(self, cl: LocalCluster) -> None:
        """Every acknowledged write is readable and correct, and on every replica of its slot."""
        assert not self.corrupt, f"corrupt reads: {self.corrupt[:5]}"
        assert not self.missing, f"reads of acknowledged keys found nothing: {len(self.missing)} {self.missing[:5]}"
        assert not self.read_failed, f"reads failing after one retry: {self.read_failed[:5]}"
        assert self.reads > 0
        st = cl.state()
        check_map(st)
        sm = st.slotmap
        with SyncClient.connect(cl.url, transport="tcp", timeout=10.0) as c:
            got = c.get_many(self.acked)
        lost = [k for k, v in zip(self.acked, got, strict=True) if v != value_of(k)]
        assert not lost, f"{len(lost)} of {len(self.acked)} acknowledged writes lost, e.g. {lost[:3]}"
        for node_id, info in st.nodes.items():
            mine = [k for k in self.acked if node_id in sm.table[key_slot(k, sm.slots)]]
            with SyncClient.connect(f"memkv://{info.addr}", transport="tcp", timeout=10.0) as d:
                there = d.exists_many(mine) if mine else []
            absent = [k for k, ok in zip(mine, there, strict=True) if not ok]
            assert not absent, f"{node_id} owns the slots of {len(absent)} keys it does not hold, e.g. {absent[:3]}"


def check_map(st: Any) -> None:
    sm = st.slotmap
    assert sm is not None and not sm.pending, "slots still pending"
    live = set(st.nodes)
    want = min(sm.replicas, len(live))
    for s, row in enumerate(sm.table):
        assert len(set(row)) == len(row), f"slot {s} lists a node twice: {row}"
        assert len(row) == want, f"slot {s} has {len(row)} replicas, want {want}: {row}"
        assert set(row) <= live, f"slot {s} names a dead node: {row}"


def converged(cl: LocalCluster, ids: set[str], timeout: float = 120.0) -> Any:
    etcd = Etcd(cl.etcd.endpoint, timeout=2.0)
    try:
        def done(st: Any) -> Any:
            sm = st.slotmap
            if sm is None or set(st.nodes) != ids or set(sm.members) != ids or sm.pending:
                return None
            if any(len(r) != min(sm.replicas, len(ids)) or not set(r) <= ids for r in sm.table):
                return None
            if etcd.get_prefix(migrations_prefix(cl.name))[0]:
                return None
            return st

        return cl.wait(done, timeout, f"rebalanced onto {sorted(ids)}")
    finally:
        etcd.close()


def make_cluster(etcd_server: Any, start_node: Any, n: int, *, mbps: float = 4.0, in_node: bool = True) -> LocalCluster:
    config = (f"[cluster]\nreplicas = 2\nlease_ttl = 2\nrebalance_mbps = {mbps}\n"
              f"rebalancer = {'true' if in_node else 'false'}\n")
    cl = LocalCluster(etcd_server, f"rb{uuid.uuid4().hex[:8]}", start_node, config)
    for i in range(n):
        cl.add_node(f"n{i + 1}")
    return cl


def wait_copying(cl: LocalCluster, timeout: float = 60.0) -> dict[str, Any]:
    """Until a migration round is copying and has moved some bytes (but is not finished)."""
    etcd = Etcd(cl.etcd.endpoint, timeout=2.0)
    try:
        def copying() -> Any:
            for kv in etcd.get_prefix(migrations_prefix(cl.name))[0]:
                rec = json.loads(kv.value)
                if rec.get("state") == "copying" and any(
                        0 < m["bytes_done"] < m["bytes_total"] for m in rec["moves"]):
                    return rec
            return None

        return poll(copying, timeout, "a migration in progress")
    finally:
        etcd.close()


def set_throttle(cl: LocalCluster, mbps: float | None) -> None:
    etcd = Etcd(cl.etcd.endpoint, timeout=2.0)
    try:
        if mbps is None:
            etcd.delete(throttle_key(cl.name))
        else:
            etcd.put(throttle_key(cl.name), str(mbps))
    finally:
        etcd.close()


# -- join / drain / loss --------------------------------------------------------------------------

def test_join_under_load_warms_the_new_node(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 3)
    converged(cl, {"n1", "n2", "n3"})
    load = Load(cl.url, "join")
    load.preload(PRELOAD)
    load.start()
    cl.add_node("n4")
    rec = wait_copying(cl)
    assert {m["dst"] for m in rec["moves"]} == {"n4"}
    # while copying, n4 is only a pending replica: it is no slot's primary and owns nothing yet
    st = cl.state()
    assert st.slotmap.pending and all(row[0] != "n4" for row in st.slotmap.table)
    from memkv.cli import main

    assert main(["status", cl.url]) == 0  # progress bars render mid-migration
    converged(cl, {"n1", "n2", "n3", "n4"})
    load.finish()
    load.verify(cl)
    sm = cl.state().slotmap
    primary, other = sm.slots_of("n4")
    assert primary + other > 1000  # ~S*R/4 ownerships moved to the newcomer


def test_drain_then_leave_loses_nothing(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 4, mbps=20.0)
    converged(cl, {"n1", "n2", "n3", "n4"})
    load = Load(cl.url, "drain")
    load.preload(PRELOAD)
    load.start()
    proc = subprocess.run([sys.executable, "-m", "memkv.cli", "drain", cl.url, "n2", "--timeout", "150"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "can be stopped" in proc.stderr
    st = cl.state()
    assert all("n2" not in row for row in st.slotmap.table)
    assert under_replicated(st.slotmap, set(st.nodes) - {"n2"}) == 0  # n2 can go: no slot needs it
    cl.nodes["n2"].stop()
    del cl.nodes["n2"]
    converged(cl, {"n1", "n3", "n4"})
    load.finish()
    load.verify(cl)


def test_node_loss_rereplicates_from_survivors(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 3, mbps=20.0)
    converged(cl, {"n1", "n2", "n3"})
    load = Load(cl.url, "loss")
    load.preload(PRELOAD)
    load.start()
    cl.nodes["n3"].kill()
    del cl.nodes["n3"]
    converged(cl, {"n1", "n2"})
    load.finish()
    load.verify(cl)  # R=2 restored: every slot on both survivors, with its data


# -- failures mid-migration -----------------------------------------------------------------------

def test_rebalancer_leader_killed_mid_migration(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 3, in_node=False)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def candidate(name: str) -> None:
        procs[name] = subprocess.Popen([sys.executable, "-m", "memkv.cli", "rebalancer", cl.url, "--id", name,
                                        "--lease-ttl", "2", "--mbps", "3"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        candidate("rb-a")
        converged(cl, {"n1", "n2", "n3"})
        candidate("rb-b")
        load = Load(cl.url, "leader")
        load.preload(PRELOAD)
        load.start()
        cl.add_node("n4")
        rec = wait_copying(cl)
        etcd = Etcd(cl.etcd.endpoint, timeout=2.0)
        try:
            leader = etcd.get(leader_key(cl.name))[0].value.decode()
            assert leader == rec["leader"]
            procs[leader].kill()
            procs[leader].wait()
            other = "rb-b" if leader == "rb-a" else "rb-a"
            poll(lambda: (kv := etcd.get(leader_key(cl.name))[0]) is not None and kv.value.decode() == other,
                 30, "the other candidate takes over")
        finally:
            etcd.close()
        converged(cl, {"n1", "n2", "n3", "n4"})
        load.finish()
        load.verify(cl)  # no slot lost, none owned twice (check_map), data on every replica
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_destination_killed_mid_migration_keeps_old_owner(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 3, mbps=3.0)
    converged(cl, {"n1", "n2", "n3"})
    before = cl.state().slotmap
    load = Load(cl.url, "dest")
    load.preload(PRELOAD)
    load.start()
    cl.add_node("n4")
    wait_copying(cl)
    cl.nodes["n4"].kill()
    del cl.nodes["n4"]
    st = converged(cl, {"n1", "n2", "n3"})
    # the slots went back to their old owners: nothing moved but the aborted copy
    assert all("n4" not in row for row in st.slotmap.table)
    moved = sum(1 for a, b in zip(before.table, st.slotmap.table, strict=True) if set(a) != set(b))
    assert moved == 0
    load.finish()
    load.verify(cl)


def test_join_quickly_followed_by_leave_converges(etcd_server: Any, start_node: Any) -> None:
    cl = make_cluster(etcd_server, start_node, 3, mbps=5.0)
    converged(cl, {"n1", "n2", "n3"})
    load = Load(cl.url, "flap")
    load.preload(PRELOAD // 2)
    load.start()
    cl.add_node("n4")
    poll(lambda: cl.state().slotmap.pending, 30, "the join's migration started")
    cl.nodes["n4"].stop()  # a clean leave, mid-migration
    del cl.nodes["n4"]
    converged(cl, {"n1", "n2", "n3"})
    set_throttle(cl, 0)
    cl.add_node("n5")
    converged(cl, {"n1", "n2", "n3", "n5"})
    load.finish()
    load.verify(cl)


# (the chaos rolling_restart regression -- a chunk whose delivery failed must be sent again -- is a test of the
# push program itself now: tests/test_simulation.py::test_push_resends_a_chunk_whose_sending_failed_...)


# -- regression (chaos disk_full): pooled connections to a destination's previous process
def test_migration_copies_survive_a_destination_restarted_on_its_address(start_node: Any) -> None:
    """A destination that restarted on the same address leaves the source's pool holding
    connections to its previous process. The source's copy calls (idempotent) drop them and
    call again on a fresh connection instead of failing the push (which cost the rebalancer a
    failed push and a retry round every time a node came back)."""
    import types

    from memkv.client.executors.blocking_connection import BlockingConnection
    from memkv.client.url import NodeAddress
    from memkv.cluster.migration import MigrationService

    dest = start_node()
    member = types.SimpleNamespace(node_id="src", credentials=types.SimpleNamespace(pool_kwargs=dict))
    svc = MigrationService(None, member)  # type: ignore[arg-type]  # (sends only: no store needed)
    pool = svc._pool_()
    try:
        for _ in range(3):  # idle pooled connections to the first process
            pool.give(NodeAddress(dest.host, dest.port), BlockingConnection.open(dest.host, dest.port))
        svc._send(dest.address, {("shared", "", None): ([b"k1"], [b"v1"], [5])})
        dest.stop()
        dest.start()
        svc._send(dest.address, {("shared", "", None): ([b"k2", b"k3"], [b"v2", b"v3"], [6, 7])})
        with SyncClient.connect(dest.url, transport="tcp") as c:
            assert c.get(b"k3", namespace="shared") == b"v3"
    finally:
        pool.close()
