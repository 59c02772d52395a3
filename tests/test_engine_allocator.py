"""ExtentAllocator: alloc/free/coalesce/quarantine/fragmentation, and a randomized no-overlap check."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memkv.engine.allocator import ExtentAllocator
from memkv.errors import InvalidArgument

G = 256


def check_consistent(a: ExtentAllocator) -> None:
    """Allocated, quarantined and free extents tile [0, size) exactly, without overlap."""
    spans = [(o, s, "a") for o, s in a.allocated_list()]
    spans += [(o, s, "q") for o, s in a.quarantined_list()]
    spans += [(o, s, "f") for o, s in a.free_extents_list()]
    spans.sort()
    pos = 0
    prev_kind = None
    for off, size, kind in spans:
        assert off == pos, f"gap or overlap at {pos}: next extent starts at {off}"
        assert size > 0 and size % a.granularity == 0
        assert not (kind == "f" and prev_kind == "f"), "two adjacent free extents were not coalesced"
        pos = off + size
        prev_kind = kind
    assert pos == a.size
    assert a.used_bytes == sum(s for _, s in a.allocated_list())
    assert a.free_bytes == sum(s for _, s in a.free_extents_list())
    assert a.quarantined_bytes == sum(s for _, s in a.quarantined_list())


def test_alloc_rounds_up_and_tracks_waste() -> None:
    a = ExtentAllocator(64 * G, granularity=G, quarantine_s=0)
    o1 = a.alloc(1)
    o2 = a.alloc(G)
    o3 = a.alloc(G + 1)
    assert {o1, o2, o3} == {0, G, 2 * G}
    assert a.size_of(o3) == 2 * G
    assert a.used_bytes == 4 * G
    assert a.waste_bytes == (G - 1) + (G - 1)
    a.free(o1)
    assert a.waste_bytes == G - 1
    assert a.alloc(0) is not None  # empty values still take one granule
    check_consistent(a)


def test_alloc_none_when_full_and_double_free_rejected() -> None:
    a = ExtentAllocator(4 * G, granularity=G, quarantine_s=0)
    offs = [a.alloc(G) for _ in range(4)]
    assert None not in offs
    assert a.alloc(1) is None
    assert a.free_bytes == 0 and a.fragmentation() == 0.0
    a.free(offs[0])
    with pytest.raises(InvalidArgument):
        a.free(offs[0])
    with pytest.raises(InvalidArgument):
        a.free(12345)


def test_coalescing_restores_one_extent() -> None:
    a = ExtentAllocator(16 * G, granularity=G, quarantine_s=0)
    offs = [a.alloc(G) for _ in range(16)]
    # free every other one: 8 holes of one granule, fragmented
    for o in offs[::2]:
        a.free(o)
    assert a.free_extents == 8
    assert a.largest_free == G
    assert a.fragmentation() == pytest.approx(1 - 1 / 8)
    assert a.alloc(2 * G) is None  # 8 granules free, none contiguous
    for o in offs[1::2]:
        a.free(o)
    assert a.free_extents == 1
    assert a.largest_free == 16 * G
    assert a.fragmentation() == 0.0
    check_consistent(a)
    assert a.alloc(16 * G) == 0


def test_best_fit_prefers_exact_hole() -> None:
    a = ExtentAllocator(64 * G, granularity=G, quarantine_s=0)
    x = a.alloc(3 * G)
    _sep1 = a.alloc(G)
    y = a.alloc(2 * G)
    _sep2 = a.alloc(G)
    a.free(x)  # 3-granule hole
    a.free(y)  # 2-granule hole (same power-of-two bin as 3)
    assert a.alloc(2 * G) == y
    check_consistent(a)


def test_quarantine_delays_reuse() -> None:
    now = [100.0]
    a = ExtentAllocator(4 * G, granularity=G, quarantine_s=2.0, clock=lambda: now[0])
    offs = [a.alloc(G) for _ in range(4)]
    a.free(offs[0], 100.0, tag="p")
    assert a.quarantined_bytes == G and a.quarantined_for("p") == G and a.quarantined_for("x") == 0
    assert a.free_bytes == 0
    assert a.alloc(G, 101.0) is None  # does not wait, does not reuse early
    check_consistent(a)
    assert a.alloc(G, 102.0) == offs[0]  # quarantine over: alloc reclaims by itself
    assert a.quarantined_bytes == 0 and a.quarantined_for("p") == 0
    a.free(offs[1], 103.0)
    a.free(offs[2], 103.5, immediate=True)  # never visible to a reader: free at once
    assert a.free_bytes == G and a.quarantined_bytes == G
    assert a.reclaim(104.0) == 0
    assert a.reclaim(105.0) == G
    assert a.free_extents == 1 and a.largest_free == 2 * G  # reclaimed extents coalesce
    check_consistent(a)


def test_larger_bin_is_used_when_own_bin_empty() -> None:
    a = ExtentAllocator(1024 * G, granularity=G, quarantine_s=0)
    big = a.alloc(512 * G)
    a.alloc(511 * G)  # leaves a one-granule extent at the end
    a.free(big)
    assert a.alloc(5 * G) == big
    check_consistent(a)


def test_granularity_must_be_power_of_two() -> None:
    with pytest.raises(InvalidArgument):
        ExtentAllocator(1000, granularity=100)


def test_randomized_never_overlaps() -> None:
    rng = random.Random(1234)
    now = 0.0
    a = ExtentAllocator(4096 * G, granularity=G, quarantine_s=1.0)
    live: dict[int, int] = {}
    for _ in range(20000):
        now += 0.01
        if live and (rng.random() < 0.45 or len(live) > 300):
            off = rng.choice(list(live))
            del live[off]
            a.free(off, now, immediate=rng.random() < 0.2)
        else:
            n = rng.choice([rng.randint(1, 4 * G), rng.randint(1, 64 * G), 16 * G])
            off = a.alloc(n, now)
            if off is None:
                continue
            assert off % G == 0
            live[off] = a.size_of(off)
    check_consistent(a)
    # no two live extents overlap
    spans = sorted(live.items())
    for (o1, s1), (o2, _) in zip(spans, spans[1:], strict=False):
        assert o1 + s1 <= o2
    for off in list(live):
        a.free(off, now)
    a.reclaim(now + 10)
    assert a.free_extents == 1 and a.free_bytes == a.size and a.used_bytes == 0


def test_many_extents_is_fast() -> None:
    a = ExtentAllocator(200_000 * G, granularity=G, quarantine_s=0)
    offs = [a.alloc(G) for _ in range(200_000)]
    assert None not in offs
    for o in offs[::2]:
        a.free(o)
    for _ in offs[::2]:
        assert a.alloc(G) is not None
    assert a.free_bytes == 0


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.a = ExtentAllocator(256 * G, granularity=G, quarantine_s=0.5, clock=lambda: self.now)
        self.live: dict[int, int] = {}

    @rule(n=st.integers(min_value=0, max_value=40 * G))
    def alloc(self, n: int) -> None:
        off = self.a.alloc(n)
        if off is not None:
            for o, s in self.live.items():
                assert off + self.a.size_of(off) <= o or o + s <= off, "overlap"
            self.live[off] = self.a.size_of(off)
            assert self.live[off] >= n

    @precondition(lambda self: self.live)
    @rule(data=st.data(), immediate=st.booleans())
    def free(self, data: st.DataObject, immediate: bool) -> None:
        off = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[off]
        self.a.free(off, immediate=immediate)

    @rule(dt=st.floats(min_value=0, max_value=1))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def consistent(self) -> None:
        check_consistent(self.a)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
