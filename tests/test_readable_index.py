"""The client-readable index without processes: format, the store's hooks, the seqlock, the quarantine bound.

A reader here is what the client core does (memkv/protocol/index_format.py ``find`` over a window
copied out of the region); the store runs on a ``ManualClock`` so the quarantine bound is exact.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from memkv.config import NamespacePolicy
from memkv.engine.clock import ManualClock
from memkv.engine.readers import ReaderTable
from memkv.engine.store import Store
from memkv.errors import OutOfMemory
from memkv.protocol import index_format as ixf

KiB = 1024


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock, tmp_path):
    namespaces = {"shared": NamespacePolicy("shared"),
                  "session": NamespacePolicy("session", pool="session", overwrite=True, tenant_scoped=True)}
    s = Store(memory=4 << 20, shm_dir=str(tmp_path), clock=clock, quarantine_s=2.0, namespaces=namespaces,
              index_slots=1024)
    s.open_readable_index()
    yield s
    s.close()


def _read(store: Store, key: bytes, namespace: str = "shared", scope: str = "") -> ixf.Found | None:
    ix = store.readable
    fp = ixf.fingerprint(key, ix.seed)
    first = ixf.home_slot(fp, ix.slots)
    at = ixf.slot_offset(ix.base, first)
    window = bytes(store.region.view[at:at + ixf.WINDOW_BYTES])
    return ixf.find(window, first, ixf.fingerprint_bytes(fp), ix.tag_of(namespace, scope))


def _value(store: Store, found: ixf.Found) -> bytes:
    return bytes(store.region.view[found.offset:found.offset + found.length])


def test_header_describes_the_table(store: Store) -> None:
    ix = store.readable
    magic, version, slot, window, slots, epoch, q_ms, seed = ixf.HEADER.unpack_from(store.region.view, ix.base)
    assert (magic, version, slot, window, slots, q_ms, seed) == (
        b"MKIX", ixf.FORMAT_VERSION, 64, ixf.WINDOW, 1024, 2000, ix.seed)
    assert ix.base >= store.allocator.size and ix.base % 4096 == 0  # after every extent the allocator hands out
    assert ix.base + ixf.table_bytes(slots) <= store.region.size


def test_published_on_commit_withdrawn_on_delete(store: Store) -> None:
    e = store.put(b"k", b"value bytes", namespace="shared")
    found = _read(store, b"k")
    assert found is not None and _value(store, found) == b"value bytes"
    assert (found.offset, found.length, found.checksum, found.version) == (e.offset, e.length, e.checksum, e.version)
    assert e.indexed and not e.exposed  # freeing it waits for the reads that may have found it
    assert _read(store, b"k", "session") is None  # another namespace's tag
    store.delete(b"k", namespace="shared")
    assert _read(store, b"k") is None


def test_tags_keep_scopes_apart(store: Store) -> None:
    store.put(b"same", b"alice's", namespace="session", tenant="alice")
    store.put(b"same", b"bob's", namespace="session", tenant="bob")
    a, b = _read(store, b"same", "session", "alice"), _read(store, b"same", "session", "bob")
    assert _value(store, a) == b"alice's" and _value(store, b) == b"bob's"
    assert _read(store, b"same", "session", "") is None


def test_overwrite_republishes_in_place_with_the_new_version(store: Store) -> None:
    store.put(b"s", b"one", namespace="session")
    first = _read(store, b"s", "session")
    store.put(b"s", b"two!", namespace="session")
    second = _read(store, b"s", "session")
    assert _value(store, second) == b"two!" and second.version > first.version
    assert second.raw != first.raw  # a reader holding the first sees the change on its re-check


def test_eviction_and_expiry_withdraw(store: Store, clock: ManualClock) -> None:
    store.put(b"t", b"short-lived", namespace="shared", ttl=1.0)
    found = _read(store, b"t")
    assert found is not None and found.expires > 0  # readers see the TTL (wall seconds after the epoch)
    clock.advance(1.5)
    store.expire()
    assert _read(store, b"t") is None
    for i in range(100):  # the shared pool is 60 % of 4 MiB: these evict the first ones
        store.put(b"e%d" % i, os.urandom(32 * KiB), namespace="shared")
        clock.advance(0.5)  # (evicted extents come back from the quarantine)
    published = [i for i in range(100) if _read(store, b"e%d" % i) is not None]
    live = [i for i in range(100) if store.peek(b"e%d" % i, namespace="shared") is not None]
    assert published == live and len(live) < 100


def test_a_torn_or_changing_entry_is_never_accepted(store: Store) -> None:
    store.put(b"k", b"x" * 1000, namespace="shared")
    found = _read(store, b"k")
    ix = store.readable
    at = ixf.slot_offset(ix.base, found.slot)
    view = store.region.view
    good = bytes(view[at:at + ixf.SLOT])
    # a writer half-way: odd seq
    view[at:at + 4] = (int.from_bytes(good[:4], "little") + 1).to_bytes(4, "little")
    assert _read(store, b"k") is None
    view[at:at + ixf.SLOT] = good
    assert _read(store, b"k") is not None
    # a torn copy: any field of a later write mixed into the old entry fails the self-check
    store.put(b"k2", b"y" * 2000, namespace="shared")
    other = bytes(view[ixf.slot_offset(ix.base, _read(store, b"k2").slot):][:ixf.SLOT])
    for lo, hi in ((32, 40), (40, 44), (44, 52), (52, 60)):  # offset, length, checksum, version
        torn = good[:lo] + other[lo:hi] + good[hi:]
        view[at:at + ixf.SLOT] = torn
        assert _read(store, b"k") is None, (lo, hi)
    view[at:at + ixf.SLOT] = good


def test_freed_extent_stays_quarantined_for_the_bound(store: Store, clock: ManualClock) -> None:
    """The bound readers are told (header, LOCATE info: 2 s here): while a reader that cannot announce
    its reads is attached (RDMA: ``hold``), a withdrawn value's extent is not handed to another value
    until the bound has passed since; afterwards it is."""
    store.readers.hold()
    old = os.urandom(64 * KiB)
    store.put(b"q", old, namespace="shared")
    found = _read(store, b"q")
    store.delete(b"q", namespace="shared")
    t_free = clock.monotonic()
    offsets = []
    while clock.monotonic() - t_free < 1.9:
        e = store.put(b"n%d" % len(offsets), os.urandom(64 * KiB), namespace="shared")
        offsets.append(e.offset)
        assert _value(store, found) == old  # the reader's bytes are still the value's own
        clock.advance(0.1)
    assert found.offset not in offsets
    clock.advance(0.2)  # past the bound
    reused = False
    for i in range(5):
        e = store.put(b"m%d" % i, os.urandom(64 * KiB), namespace="shared")
        reused |= e.offset == found.offset
    assert reused


class _Reader:
    """A same-host reader as the client is one (client/transports/shm.py): a slot of the node's reader
    table, mapped writable from the table's descriptor, and the protocol's ``ReaderSlot``."""

    def __init__(self, store: Store) -> None:
        slot = store.readers.claim(os.getpid())
        assert slot is not None
        self.slot_no = slot
        self.mm = mmap.mmap(store.readers.fd, store.readers.slots * ixf.READER_SLOT)
        self.slot = ixf.ReaderSlot(memoryview(self.mm), slot, store.region.view, store.readable.base)

    def close(self) -> None:
        self.slot.release()
        self.mm.close()


def _fill(store: Store, prefix: bytes, size: int = 64 * KiB) -> int:
    """Put values until the pool evicts (the region is full); values put."""
    n = 0
    while store.stats()["pools"]["shared"]["evictions"] == 0:
        store.put(prefix + b"%d" % n, os.urandom(size), namespace="shared")
        n += 1
    return n


def test_an_announced_read_holds_the_extent_only_until_it_ends(store: Store, clock: ManualClock) -> None:
    """A reader that announced its read before finding an entry keeps the entry's extent from being
    reused while it reads; once it is idle the extent comes back without waiting out the bound."""
    reader = _Reader(store)
    try:
        old = os.urandom(64 * KiB)
        store.put(b"q", old, namespace="shared")
        token, _ = reader.slot.enter(clock.monotonic())
        found = _read(store, b"q")
        assert found is not None
        store.delete(b"q", namespace="shared")
        offsets = []
        for i in range(15):  # 1.5 s, within the bound: the read is still going
            offsets.append(store.put(b"n%d" % i, os.urandom(64 * KiB), namespace="shared").offset)
            assert _value(store, found) == old  # the reader's bytes are still the value's own
            clock.advance(0.1)
        assert found.offset not in offsets
        reader.slot.leave(token)
        clock.advance(0.002)  # the grace after a free (store buffers), far below the bound
        reused = [store.put(b"m%d" % i, os.urandom(64 * KiB), namespace="shared").offset for i in range(5)]
        assert found.offset in reused
        assert store.stats()["region"]["early_reclaimed"] >= 64 * KiB
    finally:
        reader.close()


def test_writes_into_a_full_region_need_no_bound_while_readers_are_idle(store: Store, clock: ManualClock) -> None:
    """Every write into a full region evicts. With announced readers attached but idle (and between
    their reads), evicted extents come back after the grace, so writes never fail for lack of room;
    with a reader that cannot announce (RDMA) they wait out the bound and the node says so."""
    readers = [_Reader(store), _Reader(store)]
    try:
        n = _fill(store, b"f")
        for i in range(3 * n):  # the whole region over three times, in 1/40 of the bound (store time)
            token, _ = readers[i % 2].slot.enter(clock.monotonic())  # reads come and go between writes
            readers[i % 2].slot.leave(token)
            store.put(b"w%d" % i, os.urandom(64 * KiB), namespace="shared")
            clock.advance(0.0005)
        assert store.stats()["pools"]["shared"]["oom"] == 0
        store.readers.hold()
        with pytest.raises(OutOfMemory, match="retry shortly"):
            for i in range(3 * n):
                store.put(b"r%d" % i, os.urandom(64 * KiB), namespace="shared")
                clock.advance(0.002)
        store.readers.unhold()
    finally:
        for r in readers:
            r.close()


def test_a_stalled_or_dead_reader_holds_extents_for_the_bound_only(store: Store, clock: ManualClock) -> None:
    """A reader that announced a read and never finished it (stalled, killed) holds every extent freed
    since, but only for the bound: after it the node ignores its slot (the reader would refuse a read
    that took that long) and writes flow again, the slot still showing the old epoch."""
    stalled = _Reader(store)
    try:
        _fill(store, b"f")
        stalled.slot.enter(clock.monotonic())
        t0 = clock.monotonic()
        with pytest.raises(OutOfMemory, match="retry shortly"):
            for i in range(500):  # 1 s of the store's time
                store.put(b"s%d" % i, os.urandom(64 * KiB), namespace="shared")
                clock.advance(0.002)
        assert clock.monotonic() - t0 < 2.0
        clock.advance(2.1)
        for i in range(200):
            store.put(b"t%d" % i, os.urandom(64 * KiB), namespace="shared")
            clock.advance(0.002)
        assert store.readers.stats()["reading"] == 1  # the slot still says "reading"
    finally:
        stalled.close()


def test_reads_sharing_a_slot_announce_the_oldest_epoch(store: Store, clock: ManualClock) -> None:
    """Threads of one client share its slot: the slot shows the oldest epoch of the reads going on, and
    each read learns the start of the oldest one (it is covered only while that one is in time)."""
    reader = _Reader(store)
    try:
        mine = lambda: ixf.READER.unpack_from(reader.mm, reader.slot_no * ixf.READER_SLOT)[0]  # noqa: E731
        e1 = store.readers.epoch
        first, oldest = reader.slot.enter(10.0)
        assert oldest == 10.0 and mine() == e1
        store.readers.safe_below(e1)  # an extent tagged e1 waits: the epoch moves on
        e2 = store.readers.epoch
        assert e2 == e1 + 1
        second, oldest = reader.slot.enter(11.0)
        assert oldest == 10.0 and mine() == e1  # still the first read's
        reader.slot.leave(first)
        assert mine() == e2  # now the second's
        reader.slot.leave(second)
        assert mine() == ixf.IDLE
    finally:
        reader.close()


def test_reader_slots_are_reused_once_released_or_their_process_is_gone(clock: ManualClock) -> None:
    header = memoryview(bytearray(ixf.HEADER_SIZE))
    table = ReaderTable(header, 0, monotonic=clock.monotonic, quarantine_s=2.0, slots=2)
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              check=True, text=True)
        assert table.claim(os.getpid()) == 0 and table.claim(int(dead.stdout)) == 1
        assert table.claim(os.getpid()) == 1  # the second claimer's process has exited
        assert table.claim(os.getpid()) is None and table.stats()["refused"] == 1  # both taken by live readers
        mm = mmap.mmap(table.fd, 2 * ixf.READER_SLOT)
        slot = ixf.ReaderSlot(memoryview(mm), 0, header, 0)
        slot.enter(0.0)
        assert ixf.READER.unpack_from(mm, 0)[0] == table.epoch == 1
        slot.release()
        mm.close()
        assert table.claim(os.getpid()) == 0  # released
    finally:
        table.close()


def test_values_a_reader_never_saw_are_reusable_at_once_until_the_index_is_opened(clock: ManualClock,
                                                                                   tmp_path) -> None:
    s = Store(memory=1 << 20, shm_dir=str(tmp_path), clock=clock, quarantine_s=2.0)
    try:
        e = s.put(b"a", b"z" * 4096, namespace="shared")
        assert not e.indexed and not e.exposed
        s.delete(b"a", namespace="shared")
        assert s.allocator.quarantined_bytes == 0
        s.put(b"b", b"w" * 4096, namespace="shared")
        assert s.open_readable_index().stats()["live"] == 1  # opening publishes what is there
        assert _read(s, b"b") is not None
    finally:
        s.close()


def test_full_window_and_fingerprint_collision_mean_not_published(store: Store) -> None:
    ix = store.readable
    # fill one window with keys of one home slot (found by search), the next one is not published
    home = None
    same: list[bytes] = []
    i = 0
    while len(same) < ixf.WINDOW + 1:
        k = b"w%d" % i
        i += 1
        h = ixf.home_slot(ixf.fingerprint(k, ix.seed), ix.slots)
        if home is None:
            home = h
        if h == home:
            same.append(k)
    for k in same[:ixf.WINDOW]:
        store.put(k, b"v", namespace="shared")
    assert all(_read(store, k) is not None for k in same[:ixf.WINDOW])
    store.put(same[-1], b"v", namespace="shared")
    assert _read(store, same[-1]) is None and ix.overflows >= 1
    assert store.get(same[-1], namespace="shared") is not None  # the node still has it: readers ask it


def test_heartbeat_moves_and_stops(store: Store) -> None:
    ix = store.readable
    beat = lambda: ixf.HEARTBEAT.unpack_from(store.region.view, ix.base + ixf.HEARTBEAT_OFF)[0]  # noqa: E731
    ix.heartbeat()
    b1 = beat()
    ix.heartbeat()
    assert beat() == b1 + 1
    ix.stop()
    assert beat() == 0
