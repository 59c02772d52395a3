"""``memkv bench URL``: a quick put/get measurement against a running node or cluster.

The side-by-side comparison with peers lives in ``bench/`` (``python -m bench.run``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from memkv.sizes import format_size, parse_size


def _timed(call: Callable[[Any], object], items: Iterable[Any]) -> tuple[float, list[float]]:
    """``call`` on each item in turn: the seconds all of them took and each one's latency, sorted."""
    lats: list[float] = []
    t0 = time.perf_counter()
    for item in items:
        t = time.perf_counter()
        call(item)
        lats.append(time.perf_counter() - t)
    return time.perf_counter() - t0, sorted(lats)


def run_quickbench(url: str, *, value_size: str, count: int, batch: int) -> int:
    from memkv.client import SyncClient

    size = parse_size(value_size)
    value = os.urandom(size)
    keys = [f"bench-{i}".encode() for i in range(count)]
    buf = bytearray(size)
    bufs = [bytearray(size) for _ in range(batch)]
    with SyncClient.connect(url) as c:
        runs = {"put": _timed(lambda k: c.put(k, value), keys),
                "get_into": _timed(lambda k: c.get_into(k, buf), keys)}
        many_s, _ = _timed(lambda i: c.get_many_into(keys[i:i + batch], bufs), range(0, count - batch + 1, batch))
    total = size * count
    print(f"value {format_size(size)}, {count} keys")
    for name, (secs, lats) in runs.items():
        print(f"  {name:9s} {total / secs / 1e9:6.2f} GB/s  p50 {statistics.median(lats) * 1e6:8.1f} us  "
              f"p99 {lats[int(len(lats) * 0.99) - 1] * 1e6:8.1f} us")
    print(f"  get_many_into x{batch}: {total / many_s / 1e9:6.2f} GB/s")
    return 0
