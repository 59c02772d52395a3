"""Eviction policies: unit behaviour, and a hit-ratio measurement of LRU vs S3-FIFO.

Run ``python tests/test_engine_eviction.py`` to print the measured hit ratios.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random

import pytest

from memkv.engine.entry import Entry
from memkv.engine.eviction import LRUPolicy, S3FIFOPolicy, make_policy

ALL = lambda e: True  # noqa: E731


def mk(key: bytes, size: int = 1) -> Entry:
    return Entry(key, "ns", "", 0, size, 0, 0, 0.0, ikey=("ns", "", key), size=size)


@pytest.mark.parametrize("cls", [LRUPolicy, S3FIFOPolicy])
def test_empty_and_nothing_eligible(cls) -> None:
    p = cls()
    assert p.pick_victim(0.0, ALL) is None
    es = [mk(b"%d" % i) for i in range(50)]
    for e in es:
        p.insert(e)
        p.access(e)
    assert p.pick_victim(0.0, lambda e: False) is None  # terminates, evicts nothing
    assert len(p) == 50 and p.evictions == 0
    # only one eligible entry: it is found, whatever its position
    v = p.pick_victim(0.0, lambda e: e is es[37])
    assert v is es[37] and len(p) == 49 and p.evictions == 1
    p.remove(es[0])
    p.remove(es[0])  # tolerant
    assert len(p) == 48


def test_lru_order_and_access() -> None:
    p = LRUPolicy()
    a, b, c = mk(b"a"), mk(b"b"), mk(b"c")
    for e in (a, b, c):
        p.insert(e)
    p.access(a)
    assert p.pick_victim(0.0, ALL) is b
    assert p.pick_victim(0.0, lambda e: e is not c) is a  # c skipped, not evicted
    assert p.pick_victim(0.0, ALL) is c
    assert p.pick_victim(0.0, ALL) is None
    assert p.evictions == 3


def test_pinned_entries_rotate_out_of_the_way() -> None:
    p = LRUPolicy()
    pinned = [mk(b"p%d" % i) for i in range(100)]
    free = [mk(b"f%d" % i) for i in range(100)]
    for e in pinned + free:
        p.insert(e)
    ok = lambda e: not e.key.startswith(b"p")  # noqa: E731
    got = [p.pick_victim(0.0, ok) for _ in range(100)]
    assert got == free
    assert p.pick_victim(0.0, ok) is None and len(p) == 100


def test_s3fifo_one_hit_wonders_leave_from_small_and_ghost_goes_to_main() -> None:
    p = S3FIFOPolicy()
    hot = [mk(b"h%d" % i) for i in range(10)]
    for e in hot:
        p.insert(e)
        p.access(e)
    cold = [mk(b"c%d" % i) for i in range(10)]
    for e in cold:
        p.insert(e)
    victims = [p.pick_victim(0.0, ALL) for _ in range(9)]
    assert set(victims) == set(cold[:9])  # accessed entries were promoted to main instead
    assert p.stats()["main"] == 10 and p.stats()["ghost"] == 9
    again = mk(b"c3")  # re-inserted soon after eviction: straight to main
    p.insert(again)
    assert p.ghost_hits == 1 and p.stats()["main"] == 11


def test_s3fifo_main_reinserts_frequent_entries() -> None:
    p = S3FIFOPolicy()
    for i in range(20):  # evicted unaccessed from small: remembered in the ghost queue
        p.insert(mk(b"%d" % i))
    for _ in range(20):
        assert p.pick_victim(0.0, ALL) is not None
    es = [mk(b"%d" % i) for i in range(20)]
    for e in es:
        p.insert(e)  # ghost hit: straight to main
    assert p.stats()["main"] == 20 and p.ghost_hits == 20
    for e in es:
        if e is not es[7]:
            p.access(e)
            p.access(e)
    assert p.pick_victim(0.0, ALL) is es[7]  # the only main entry with frequency 0
    # every remaining one is hot: one pass decrements them and still returns the coldest
    v = p.pick_victim(0.0, ALL)
    assert v is not None and len(p) == 18


def test_make_policy() -> None:
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("s3fifo"), S3FIFOPolicy)
    with pytest.raises(ValueError):
        make_policy("arc")


# -- hit-ratio measurement ------------------------------------------------------------------

def zipf_sampler(n: int, alpha: float, rng: random.Random):
    cdf = list(itertools.accumulate(1.0 / math.pow(i + 1, alpha) for i in range(n)))
    total = cdf[-1]
    return lambda: bisect.bisect_left(cdf, rng.random() * total)


def make_trace(seed: int = 7, n_keys: int = 5000, length: int = 60000, scans: int = 6,
               scan_len: int = 1500) -> list[bytes]:
    """Zipf(0.9) requests over ``n_keys`` keys, polluted by ``scans`` one-time sequential scans."""
    rng = random.Random(seed)
    draw = zipf_sampler(n_keys, 0.9, rng)
    trace = [b"z%d" % draw() for _ in range(length)]
    step = length // (scans + 1)
    out: list[bytes] = []
    scan_id = itertools.count()
    for i, k in enumerate(trace):
        if i and i % step == 0 and i // step <= scans:
            s = next(scan_id)
            out.extend(b"s%d-%d" % (s, j) for j in range(scan_len))
        out.append(k)
    return out


def simulate(policy_name: str, trace: list[bytes], capacity: int) -> float:
    policy = make_policy(policy_name)
    cache: dict[bytes, Entry] = {}
    hits = 0
    for k in trace:
        e = cache.get(k)
        if e is not None:
            hits += 1
            policy.access(e)
            continue
        while len(cache) >= capacity:
            v = policy.pick_victim(0.0, ALL)
            assert v is not None
            del cache[v.key]
        e = mk(k)
        cache[k] = e
        policy.insert(e)
    return hits / len(trace)


def test_s3fifo_beats_lru_on_scan_polluted_zipf() -> None:
    trace = make_trace()
    plain = make_trace(scans=0)
    res = {}
    for name in ("lru", "s3fifo"):
        res[name] = (simulate(name, plain, 500), simulate(name, trace, 500))
    lru_plain, lru_scan = res["lru"]
    s3_plain, s3_scan = res["s3fifo"]
    assert 0.3 < lru_plain < 0.9 and 0.3 < s3_plain < 0.9
    assert s3_scan >= lru_scan, res
    assert s3_plain >= lru_plain - 0.01, res


if __name__ == "__main__":
    trace, plain = make_trace(), make_trace(scans=0)
    for cap in (250, 500, 1000):
        for name in ("lru", "s3fifo"):
            print(f"capacity {cap:5d} {name:7s} zipf {simulate(name, plain, cap):.4f} "
                  f"zipf+scan {simulate(name, trace, cap):.4f}")
