"""Store: the engine of one node (region + allocator + index + pools), with a fake clock."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from memkv.config import NamespacePolicy, PoolConfig, default_namespaces
from memkv.engine import Region, Store, checksum
from memkv.engine.clock import ManualClock
from memkv.errors import (
    ChecksumMismatch,
    InvalidArgument,
    KeyExists,
    OutOfMemory,
    QuotaExceeded,
    UnknownNamespace,
    ValueTooLarge,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_store(tmp_path, clock):
    stores: list[Store] = []

    def _make(**kw) -> Store:
        kw.setdefault("memory", 1 * MiB)
        kw.setdefault("shm_dir", str(tmp_path))
        kw.setdefault("clock", clock)
        s = Store(**kw)
        stores.append(s)
        return s

    yield _make
    for s in stores:
        s.close()


@pytest.fixture
def store(make_store) -> Store:
    return make_store()


def lru_pools(shared: float = 0.5, session: float = 0.5, quota: int | None = None) -> dict[str, PoolConfig]:
    return {
        "shared": PoolConfig("shared", shared, "lru"),
        "session": PoolConfig("session", session, "lru", tenant_quota=quota),
    }


def val(i: int, n: int = 4 * KiB) -> bytes:
    return bytes([i % 251]) * n


def put(s: Store, key: bytes, value: bytes, ns: str = "shared", tenant: str = "", **kw):
    return s.put(key, value, namespace=ns, tenant=tenant, **kw)


# -- region ------------------------------------------------------------------------------------

def test_region_is_a_shared_file_mapping(tmp_path) -> None:
    r = Region(64 * KiB, directory=str(tmp_path), name="t")
    assert os.path.basename(r.path).startswith(f"memkv-t-{os.getpid()}-") and r.path.endswith(".region")
    assert r.size == 64 * KiB and len(r.view) == 64 * KiB and not r.view.readonly
    r.view[100:105] = b"hello"
    with open(r.path, "rb") as f:  # another mapping/reader of the file sees the bytes
        f.seek(100)
        assert f.read(5) == b"hello"
    r.close()
    assert not os.path.exists(r.path)
    r.close()  # idempotent
    with pytest.raises(InvalidArgument):
        Region(0, directory=str(tmp_path))


def test_region_default_dir_is_dev_shm() -> None:
    with Region(4096) as r:
        assert r.path.startswith("/dev/shm/memkv-node-")
        assert os.path.exists(r.path)
    assert not os.path.exists(r.path)


def test_store_close_removes_region(make_store) -> None:
    s = make_store()
    path = s.region.path
    assert os.path.exists(path)
    s.close()
    s.close()
    assert not os.path.exists(path)


# -- checksum ----------------------------------------------------------------------------------

def test_checksum_any_buffer() -> None:
    data = np.arange(4096, dtype=np.float16)
    raw = data.tobytes()
    c = checksum(raw)
    assert checksum(bytearray(raw)) == c == checksum(memoryview(raw)) == checksum(data)
    assert checksum(raw[:-1]) != c


# -- put / get ---------------------------------------------------------------------------------

def test_put_get_roundtrip_and_readonly_view(store) -> None:
    e = put(store, b"k1", b"hello world")
    assert e.length == 11 and e.offset >= 0 and e.generation == 1 and e.namespace == "shared"
    got = store.get(b"k1", namespace="shared")
    assert got is e and got.hits == 1
    v = store.view(got)
    assert v.readonly and bytes(v) == b"hello world"
    with pytest.raises(TypeError):
        v[0] = 0
    assert store.get(b"nope", namespace="shared") is None
    assert store.exists(b"k1", namespace="shared") and not store.exists(b"nope", namespace="shared")
    st = store.stats()
    assert st["namespaces"]["shared"]["hits"] == 1 and st["namespaces"]["shared"]["misses"] == 1
    assert st["namespaces"]["shared"]["puts"] == 1 and st["namespaces"]["shared"]["bytes"] == 11
    assert st["tenants"][""]["hits"] == 1


def test_reserve_commit_zero_copy(store) -> None:
    arr = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    res = store.reserve(b"t", arr.nbytes, namespace="shared", checksum=checksum(arr))
    assert len(res.view) == arr.nbytes and res.length == arr.nbytes and res.key == b"t"
    np.frombuffer(res.view, dtype=np.float32)[:] = arr
    e = store.commit(res)
    out = np.frombuffer(store.view(e), dtype=np.float32)
    assert np.array_equal(out, arr)
    with pytest.raises(InvalidArgument):
        store.commit(res)  # only once


def test_empty_value(store) -> None:
    e = put(store, b"empty", b"")
    assert e.length == 0 and bytes(store.view(e)) == b""


def test_checksum_mismatch_frees_and_raises(store) -> None:
    used = store.allocator.used_bytes
    res = store.reserve(b"k", 100, namespace="shared", checksum=checksum(b"x" * 100))
    res.view[:] = b"y" * 100
    with pytest.raises(ChecksumMismatch):
        store.commit(res)
    assert store.get(b"k", namespace="shared") is None
    assert store.allocator.used_bytes == used and store.allocator.quarantined_bytes == 0
    assert store.pools["shared"].used == 0
    assert store.stats()["checksum_mismatches"] == 1


def test_abort_releases_into_quarantine(store, clock) -> None:
    res = store.reserve(b"k", 1000, namespace="shared", checksum=1)
    assert store.pools["shared"].used == 1024
    store.abort(res)
    store.abort(res)  # idempotent
    assert store.pools["shared"].used == 0
    assert store.allocator.quarantined_bytes == 1024
    clock.advance(2.0)
    store.expire()
    assert store.allocator.quarantined_bytes == 0 and store.allocator.used_bytes == 0
    assert store.get(b"k", namespace="shared") is None


def test_fast_rejects_before_allocating(make_store) -> None:
    s = make_store(max_value=10 * KiB)
    put(s, b"k", b"a" * 100)
    used = s.allocator.used_bytes
    with pytest.raises(UnknownNamespace):
        s.reserve(b"k", 1, namespace="nope", checksum=0)
    with pytest.raises(ValueTooLarge):
        s.reserve(b"k2", 10 * KiB + 1, namespace="shared", checksum=0)
    with pytest.raises(KeyExists):
        s.reserve(b"k", 100, namespace="shared", checksum=checksum(b"b" * 100))
    with pytest.raises(KeyExists):
        s.reserve(b"k", 101, namespace="shared", checksum=checksum(b"a" * 100))
    with pytest.raises(InvalidArgument):
        s.reserve(b"k3", -1, namespace="shared", checksum=0)
    assert s.allocator.used_bytes == used


def test_value_larger_than_pool_is_rejected(make_store) -> None:
    s = make_store(memory=256 * KiB)
    with pytest.raises(ValueTooLarge):
        s.reserve(b"big", 200 * KiB, namespace="shared", checksum=0)


# -- overwrite rules ---------------------------------------------------------------------------

def test_idempotent_reput_keeps_old_entry(store) -> None:
    e1 = put(store, b"k", val(1))
    used = store.allocator.used_bytes
    e2 = put(store, b"k", val(1))
    assert e2 is e1 and e2.generation == 1
    assert store.allocator.used_bytes == used and store.allocator.quarantined_bytes == 0
    assert len(store) == 1 and store.stats()["namespaces"]["shared"]["puts"] == 2


def test_no_overwrite_namespace_refuses_different_bytes(store) -> None:
    put(store, b"k", val(1))
    with pytest.raises(KeyExists):
        put(store, b"k", val(2))
    assert bytes(store.view(store.get(b"k", namespace="shared"))) == val(1)


def test_concurrent_reservations_conflict_at_commit(store) -> None:
    r1 = store.reserve(b"k", 4, namespace="shared", checksum=checksum(b"aaaa"))
    r2 = store.reserve(b"k", 4, namespace="shared", checksum=checksum(b"bbbb"))
    r1.view[:] = b"aaaa"
    r2.view[:] = b"bbbb"
    store.commit(r1)
    with pytest.raises(KeyExists):
        store.commit(r2)
    assert bytes(store.view(store.get(b"k", namespace="shared"))) == b"aaaa"
    assert store.pools["shared"].used == 256


def test_overwrite_namespace_replaces(store, clock) -> None:
    e1 = put(store, b"s", b"v1", ns="session", tenant="a")
    off1 = e1.offset
    store.expose(store.get(b"s", namespace="session", tenant="a"))  # a one-sided reader knows where v1 is
    e2 = put(store, b"s", b"version2", ns="session", tenant="a")
    assert e2 is not e1 and e2.generation > e1.generation
    assert bytes(store.view(store.get(b"s", namespace="session", tenant="a"))) == b"version2"
    assert store.allocator.quarantined_bytes == 256  # the old extent waits before reuse
    assert e2.offset != off1
    assert len(store) == 1 and store.pools["session"].used == 256


def test_tenant_scoped_namespace_isolates_tenants(store) -> None:
    put(store, b"k", b"alice", ns="session", tenant="alice")
    put(store, b"k", b"bob", ns="session", tenant="bob")
    assert bytes(store.view(store.get(b"k", namespace="session", tenant="alice"))) == b"alice"
    assert bytes(store.view(store.get(b"k", namespace="session", tenant="bob"))) == b"bob"
    assert store.get(b"k", namespace="session", tenant="eve") is None
    # shared is not tenant scoped: one copy visible to everyone
    put(store, b"p", b"prefix", ns="shared", tenant="alice")
    assert store.get(b"p", namespace="shared", tenant="bob") is not None
    assert put(store, b"p", b"prefix", ns="shared", tenant="bob").tenant == "alice"


# -- TTL ---------------------------------------------------------------------------------------

def test_ttl_explicit_and_namespace(make_store, clock) -> None:
    nss = default_namespaces()
    nss["tmp"] = NamespacePolicy("tmp", pool="shared", ttl=10.0)
    s = make_store(namespaces=nss)
    put(s, b"a", b"1", ns="tmp")
    put(s, b"b", b"2", ns="tmp", ttl=30.0)
    put(s, b"c", b"3", ns="shared", ttl=5.0)
    put(s, b"d", b"4", ns="shared")
    clock.advance(6)
    assert not s.exists(b"c", namespace="shared")
    assert s.get(b"c", namespace="shared") is None
    clock.advance(5)
    assert s.get(b"a", namespace="tmp") is None
    assert s.get(b"b", namespace="tmp") is not None
    clock.advance(100)
    assert s.expire() == 1  # b, swept proactively
    assert s.get(b"d", namespace="shared") is not None
    assert len(s) == 1 and s.stats()["expirations"] == 3


def test_reput_refreshes_ttl(store, clock) -> None:
    put(store, b"a", b"1", ttl=5.0)
    clock.advance(4)
    put(store, b"a", b"1", ttl=5.0)
    clock.advance(4)
    assert store.expire() == 0
    assert store.get(b"a", namespace="shared") is not None
    clock.advance(2)
    assert store.expire() == 1


def test_expired_key_can_be_rewritten(store, clock) -> None:
    put(store, b"a", b"1", ttl=1.0)
    clock.advance(2)
    e = put(store, b"a", b"different")
    assert bytes(store.view(e)) == b"different"


# -- eviction, pins, leases, chains -------------------------------------------------------------

def fill(s: Store, prefix: bytes, n: int, size: int = 4 * KiB, ns: str = "shared", tenant: str = "", **kw):
    return [put(s, prefix + b"%d" % i, val(i, size), ns=ns, tenant=tenant, **kw) for i in range(n)]


def test_eviction_makes_room_lru(make_store) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0)
    budget = s.pools["shared"].budget
    n = budget // (4 * KiB)
    fill(s, b"k", n)
    assert s.pools["shared"].used == n * 4 * KiB and s.stats()["evictions"] == 0
    s.get(b"k0", namespace="shared")  # k0 recently used: k1 is the LRU
    put(s, b"new", val(9))
    assert s.exists(b"k0", namespace="shared") and not s.exists(b"k1", namespace="shared")
    assert s.stats()["pools"]["shared"]["evictions"] == 1


def test_everything_pinned_is_out_of_memory(make_store) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0)
    n = s.pools["shared"].budget // (4 * KiB)
    fill(s, b"k", n, pin=True)
    with pytest.raises(OutOfMemory):
        put(s, b"more", val(1))
    assert len(s) == n
    assert s.unpin([b"k3", b"missing"], namespace="shared") == 1
    put(s, b"more", val(1))
    assert not s.exists(b"k3", namespace="shared") and len(s) == n


def test_pin_with_ttl_and_pin_count(make_store, clock) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0)
    n = s.pools["shared"].budget // (4 * KiB)
    fill(s, b"k", n)
    assert s.pin([b"k%d" % i for i in range(n)] + [b"zz"], namespace="shared", ttl=10) == n
    with pytest.raises(OutOfMemory):
        put(s, b"x", val(1))
    clock.advance(11)
    put(s, b"x", val(1))


def test_lookup_prefix_leases(make_store, clock) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0)
    n = s.pools["shared"].budget // (4 * KiB)
    fill(s, b"k", n)
    assert s.lookup_prefix([b"k0", b"k1", b"k2", b"nope", b"k3"], namespace="shared", lease_s=5) == 3
    assert s.lookup_prefix([b"nope", b"k0"], namespace="shared") == 0
    assert s.lookup_prefix([], namespace="shared") == 0
    put(s, b"x", val(1))  # evicts the LRU entry that is not leased: k3
    assert all(s.exists(b"k%d" % i, namespace="shared") for i in range(3))
    assert not s.exists(b"k3", namespace="shared")
    k0 = s.get(b"k0", namespace="shared")
    assert k0.lease_until == clock() + 5 and not k0.evictable(clock())
    clock.advance(6)
    assert k0.evictable(clock())  # the lease is over


def test_chain_tail_is_evicted_before_head(make_store) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0)
    n = s.pools["shared"].budget // (4 * KiB)
    parent = None
    chain = [b"c%d" % i for i in range(5)]
    for k in chain:
        put(s, k, val(1), parent=parent)
        parent = k
    ents = [s.get(k, namespace="shared") for k in chain]
    assert [e.children for e in ents] == [1, 1, 1, 1, 0]
    fill(s, b"f", n - 5)
    # touch the fillers so that the chain is the least recently used part
    for i in range(n - 5):
        s.get(b"f%d" % i, namespace="shared")
    put(s, b"x0", val(2))
    assert [s.exists(k, namespace="shared") for k in chain] == [True, True, True, True, False]
    put(s, b"x1", val(3))
    put(s, b"x2", val(4))
    assert [s.exists(k, namespace="shared") for k in chain] == [True, True, False, False, False]
    assert ents[0].children == 1 and ents[1].children == 0


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_eviction_never_leaves_a_gap_in_a_chain(make_store, clock, policy) -> None:
    pools = {"shared": PoolConfig("shared", 0.5, policy), "session": PoolConfig("session", 0.5, "lru")}
    s = make_store(pools=pools, quarantine_s=0.5)
    rng = np.random.default_rng(11)
    for c in range(150):
        parent = None
        for j in range(int(rng.integers(1, 8))):
            key = b"c%d-%d" % (c, j)
            try:
                put(s, key, val(j), parent=parent)
            except OutOfMemory:
                break
            parent = key
            if rng.random() < 0.3:  # re-read an older chain's prefix
                old = int(rng.integers(0, c + 1))
                s.lookup_prefix([b"c%d-%d" % (old, k) for k in range(8)], namespace="shared", lease_s=0.1)
        clock.advance(0.2)
    assert s.stats()["evictions"] > 100
    for e in s.entries():
        if e.parent is not None:
            assert s.exists(e.parent, namespace="shared"), f"gap: {e.key!r} lives, its parent does not"


def test_children_counts_follow_deletes_and_late_parents(store) -> None:
    put(store, b"child", b"c", parent=b"head")  # parent written later (out of order)
    head = put(store, b"head", b"h")
    assert head.children == 1
    assert store.delete(b"child", namespace="shared")
    assert head.children == 0
    assert not store.delete(b"child", namespace="shared")
    put(store, b"self", b"s", parent=b"self")  # a self-loop is ignored
    assert store.get(b"self", namespace="shared").children == 0


def test_session_flood_cannot_evict_shared(make_store, clock) -> None:
    s = make_store()  # default pools: shared s3fifo 60%, session lru 40%; quarantine on
    shared = fill(s, b"sys", 20, size=16 * KiB)
    for i in range(2000):
        try:
            put(s, b"sess%d" % i, val(i, 8 * KiB), ns="session", tenant="chatty")
        except OutOfMemory:
            pass  # back-pressure while the session pool's freed bytes sit in quarantine
        if i % 50 == 0:
            clock.advance(1.0)
    for e in shared:
        assert s.get(e.key, namespace="shared") is e
    st = s.stats()
    assert st["pools"]["shared"]["evictions"] == 0
    assert st["pools"]["session"]["evictions"] > 0
    assert st["pools"]["session"]["used"] <= st["pools"]["session"]["budget"]
    # and the shared pool can still take writes at full speed
    fill(s, b"more", 10, size=16 * KiB)


def test_quarantined_extent_not_reused_early(make_store, clock) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=2.0, headroom=0.5)
    n = s.pools["shared"].budget // (4 * KiB)
    ents = fill(s, b"k", n)
    for e in ents:
        s.expose(s.get(e.key, namespace="shared"))  # one-sided readers know where the values are
    off0 = ents[0].offset
    e = put(s, b"x", val(1))  # evicts k0, whose extent goes to quarantine
    assert not s.exists(b"k0", namespace="shared")
    assert e.offset != off0
    clock.advance(2.5)
    for i in range(3):
        put(s, b"y%d" % i, val(i))
    assert s.allocator.quarantined_bytes <= 3 * 4 * KiB


def test_quarantine_overflow_is_back_pressure_not_eviction(make_store, clock) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=2.0, headroom=0.1)
    n = s.pools["shared"].budget // (4 * KiB)
    for e in fill(s, b"k", n):
        s.expose(e)
    with pytest.raises(OutOfMemory):
        for i in range(n):
            put(s, b"x%d" % i, val(i))
    # the pool's quarantine share (10% of 512 KiB) ran out after ~13 evictions: no mass eviction
    assert 10 <= s.stats()["evictions"] <= 14
    assert len(s) >= n - 1
    clock.advance(3)
    put(s, b"later", val(1))


def test_extents_without_descriptors_skip_the_quarantine(make_store) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=2.0)
    n = s.pools["shared"].budget // (4 * KiB)
    ents = fill(s, b"k", n)
    off0 = ents[0].offset
    e = put(s, b"x", val(1))  # no descriptor of k0 was handed out: its extent is reused at once
    assert e.offset == off0 and s.allocator.quarantined_bytes == 0
    for i in range(3 * n):  # streaming writes at full memory never hit back-pressure
        put(s, b"y%d" % i, val(i))


# -- tenant quotas -----------------------------------------------------------------------------

def test_tenant_quota_evicts_own_entries_only(make_store) -> None:
    s = make_store(pools=lru_pools(quota=64 * KiB), quarantine_s=0)
    bob = fill(s, b"b", 10, ns="session", tenant="bob")
    fill(s, b"a", 16, ns="session", tenant="alice")
    assert s.pools["session"].tenant_used["alice"] == 64 * KiB
    put(s, b"a-more", val(1), ns="session", tenant="alice")  # over quota: alice's LRU goes
    assert not s.exists(b"a0", namespace="session", tenant="alice")
    assert s.exists(b"a1", namespace="session", tenant="alice")
    assert all(s.get(e.key, namespace="session", tenant="bob") is e for e in bob)
    assert s.pools["session"].tenant_used["alice"] == 64 * KiB
    with pytest.raises(QuotaExceeded):  # can never fit
        s.reserve(b"huge", 65 * KiB, namespace="session", tenant="alice", checksum=0)


def test_tenant_quota_exceeded_when_own_entries_pinned(make_store) -> None:
    s = make_store(pools=lru_pools(), quarantine_s=0, tenant_quotas={"alice": 32 * KiB})
    fill(s, b"a", 8, ns="session", tenant="alice", pin=True)
    fill(s, b"b", 20, ns="session", tenant="bob")  # no quota for bob
    with pytest.raises(QuotaExceeded):
        put(s, b"a-more", val(1), ns="session", tenant="alice")
    assert len(s) == 28
    # the quota is per pool: alice's writes to shared are charged there
    fill(s, b"sa", 8, ns="shared", tenant="alice")
    put(s, b"sa-more", val(1), ns="shared", tenant="alice")  # evicts alice's own LRU in shared
    assert s.pin([b"sa0", b"sa1"], namespace="shared") == 1


# -- corruption, stats, iteration ---------------------------------------------------------------

def test_report_corrupt(store) -> None:
    e = put(store, b"k", b"abcdef")
    assert store.verify(e)
    store.region.view[e.offset] ^= 0xFF  # a bit flip in memory
    assert not store.verify(e)
    store.report_corrupt(e)
    store.report_corrupt(e)  # second report of a dropped entry: counted, harmless
    assert store.get(b"k", namespace="shared") is None
    assert store.stats()["corrupt"] == 2


def test_flash_only_entry_has_no_view(store) -> None:
    e = put(store, b"k", b"abc")
    e2 = type(e)(b"f", "shared", "", -1, 3, 0, 0, 0.0)
    with pytest.raises(InvalidArgument):
        store.view(e2)
    assert e.flash is None


def test_stats_are_json(make_store) -> None:
    s = make_store(tenant_quotas={"a": MiB})
    put(s, b"k", b"v" * 1000, tenant="a")
    put(s, b"s", b"v", ns="session", tenant="a")
    s.get(b"k", namespace="shared", tenant="a")
    s.get(b"zz", namespace="session", tenant="b")
    st = json.loads(json.dumps(s.stats()))
    assert st["entries"] == 2 and st["bytes"] == 1001
    assert st["region"]["size"] == MiB and st["region"]["used"] == 1024 + 256
    assert st["region"]["waste"] == (1024 - 1000) + 255
    assert set(st["pools"]) == {"shared", "session"}
    assert st["pools"]["shared"]["policy"] == "s3fifo" and st["pools"]["session"]["policy"] == "lru"
    assert st["pools"]["shared"]["entries"] == 1 and st["pools"]["shared"]["used"] == 1024
    assert st["tenants"]["a"]["puts"] == 2 and st["tenants"]["a"]["hits"] == 1
    assert st["tenants"]["b"]["misses"] == 1 and st["namespaces"]["session"]["misses"] == 1
    assert st["corrupt"] == 0 and st["evictions"] == 0 and st["generation"] == 2


def test_entries_iterator(store) -> None:
    put(store, b"a", b"1")
    put(store, b"b", b"2", ns="session", tenant="t")
    assert {e.key for e in store.entries()} == {b"a", b"b"}
    assert [e.key for e in store.entries("session")] == [b"b"]
    for e in store.entries():  # safe to mutate while iterating
        store.delete(e.key, namespace=e.namespace, tenant=e.tenant)
    assert len(store) == 0


def test_unknown_namespace_everywhere(store) -> None:
    for call in (
        lambda: store.get(b"k", namespace="x"),
        lambda: store.exists(b"k", namespace="x"),
        lambda: store.delete(b"k", namespace="x"),
        lambda: store.pin([b"k"], namespace="x"),
        lambda: store.lookup_prefix([b"k"], namespace="x"),
    ):
        with pytest.raises(UnknownNamespace):
            call()


def test_pin_flag_on_put(store, clock) -> None:
    e = put(store, b"k", b"v", pin=True)
    assert e.pin_until == math.inf and not e.evictable(clock())
    store.unpin([b"k"], namespace="shared")
    assert e.evictable(clock())


def test_many_entries_churn_keeps_accounting_exact(make_store, clock) -> None:
    s = make_store(memory=4 * MiB)
    rng = np.random.default_rng(5)
    for i in range(3000):
        clock.advance(0.01)
        n = int(rng.integers(1, 20 * KiB))
        ns = "session" if i % 3 else "shared"
        try:
            s.put(b"k%d" % int(rng.integers(0, 800)), b"x" * n, namespace=ns, tenant=f"t{i % 4}",
                  parent=b"k%d" % int(rng.integers(0, 800)) if i % 5 == 0 else None)
        except (OutOfMemory, KeyExists):
            pass
        if i % 7 == 0:
            s.delete(b"k%d" % int(rng.integers(0, 800)), namespace="shared")
    live = list(s.entries())
    for p in s.pools.values():
        assert p.used == sum(e.size for e in live if e.pool == p.name)
        assert p.used <= p.budget
        assert p.entries == sum(1 for e in live if e.pool == p.name)
    assert s.allocator.used_bytes == sum(e.size for e in live)
    offs = sorted((e.offset, e.size) for e in live)
    for (o1, s1), (o2, _) in zip(offs, offs[1:], strict=False):
        assert o1 + s1 <= o2
    for e in live:
        assert s.verify(e)


# -- write versions (memkv/protocol/versions.py) -----------------------------------------------

def test_newer_version_wins_whatever_the_arrival_order(store) -> None:
    """Replicas receive the writes of one key in any order (a slow send, a read repair, a slot
    copy): every replica must end with the newest."""
    put(store, b"a", b"old", ns="session", version=1_000)
    put(store, b"a", b"new", ns="session", version=2_000)
    late = put(store, b"a", b"old", ns="session", version=1_000)  # the older write arrives again, late
    assert bytes(store.view(late)) == b"new" and late.version == 2_000
    assert store.stats()["superseded_writes"] == 1
    put(store, b"b", b"new", ns="session", version=2_000)
    e = put(store, b"b", b"old", ns="session", version=1_000)
    assert bytes(store.view(e)) == b"new" and e.version == 2_000
    # equal versions, different bytes (two clients in the same microsecond): every replica picks the same
    x = put(store, b"c", b"xxxx", ns="session", version=5_000)
    y = put(store, b"c", b"yyyy", ns="session", version=5_000)
    winner = max((b"xxxx", b"yyyy"), key=checksum)
    assert bytes(store.view(y)) == winner and x.version == y.version == 5_000


def test_store_assigns_increasing_versions_and_same_bytes_take_the_newer(store) -> None:
    e1 = put(store, b"k", b"one", ns="session")
    e2 = put(store, b"k", b"two", ns="session")
    assert 0 < e1.version < e2.version
    # the same bytes with a newer version: a new entry (its flash record must carry the version)
    e3 = put(store, b"k", b"two", ns="session", version=e2.version + 10)
    assert e3 is not e2 and e3.version == e2.version + 10
    # ... and with an older version: kept as it is
    assert put(store, b"k", b"two", ns="session", version=e2.version) is e3
    # write-once namespace: the same bytes are idempotent whatever the version
    w1 = put(store, b"w", b"once", version=100)
    assert put(store, b"w", b"once", version=50) is w1 and w1.version == 100


# -- versioned deletes ---------------------------------------------------------------------------

def test_versioned_delete_keeps_a_tombstone_that_refuses_older_writes(store) -> None:
    """A delete as of version 20 stands against any write no newer (a late replica send, a read
    repair, a slot copy); a newer write replaces the tombstone; a delete older than the value
    held leaves the value."""
    put(store, b"k", b"v10", ns="session", tenant="a", version=10)
    assert store.delete(b"k", namespace="session", tenant="a", version=20)
    assert store.get(b"k", namespace="session", tenant="a") is None
    assert store.tombstone(b"k", namespace="session", tenant="a") == 20
    assert store.tombstone(b"k", namespace="session", tenant="b") == 0  # tenants' scopes stay apart
    assert put(store, b"k", b"v15", ns="session", tenant="a", version=15) is None  # older: dropped
    assert put(store, b"k", b"v20", ns="session", tenant="a", version=20) is None  # the same: dropped
    assert store.get(b"k", namespace="session", tenant="a") is None
    e = put(store, b"k", b"v30", ns="session", tenant="a", version=30)
    assert e is not None and e.version == 30
    assert store.tombstone(b"k", namespace="session", tenant="a") == 0
    assert not store.delete(b"k", namespace="session", tenant="a", version=25)  # older than the value
    assert bytes(store.view(store.get(b"k", namespace="session", tenant="a"))) == b"v30"
    assert store.stats()["tombstones"]["superseded_deletes"] == 1
    # a delete of a key never seen still leaves a tombstone (the write may arrive later)
    assert not store.delete(b"late", namespace="session", tenant="a", version=50)
    assert put(store, b"late", b"old", ns="session", tenant="a", version=40) is None


def test_tombstones_have_bounded_retention(make_store, clock) -> None:
    s = make_store(tombstone_retention=10.0, max_tombstones=3)
    for i in range(3):
        s.delete(b"t%d" % i, namespace="session", tenant="a", version=100 + i)
    clock.advance(5)
    s.delete(b"t3", namespace="session", tenant="a", version=200)  # the fourth: the oldest goes
    st = s.stats()["tombstones"]
    assert st["held"] == 3 and st["evicted"] == 1
    assert s.tombstone(b"t0", namespace="session", tenant="a") == 0
    clock.advance(6)  # t1, t2 are 11 s old, t3 6 s
    s.expire()
    st = s.stats()["tombstones"]
    assert st["held"] == 1 and st["expired"] == 2
    assert s.tombstone(b"t3", namespace="session", tenant="a") == 200
    # past its retention a tombstone no longer refuses an older write (the documented bound)
    assert put(s, b"t1", b"old", ns="session", tenant="a", version=5) is not None
