"""``memkv bench URL``: a quick put/get measurement against a running node or cluster.

The side-by-side comparison with peers lives in ``bench/`` (``python -m bench.run``).
"""

from __future__ import annotations

import os
import statistics
import time

from memkv.sizes import format_size, parse_size


def run_quickbench(url: str, *, value_size: str, count: int, batch: int) -> int:
    from memkv.client import SyncClient

    size = parse_size(value_size)
    value = os.urandom(size)
    keys = [f"bench-{i}".encode() for i in range(count)]
    buf = bytearray(size)
    with SyncClient.connect(url) as c:
        lat: dict[str, list[float]] = {"put": [], "get_into": []}
        t0 = time.perf_counter()
        for k in keys:
            t = time.perf_counter()
            c.put(k, value)
            lat["put"].append(time.perf_counter() - t)
        put_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in keys:
            t = time.perf_counter()
            c.get_into(k, buf)
            lat["get_into"].append(time.perf_counter() - t)
        get_s = time.perf_counter() - t0
        bufs = [bytearray(size) for _ in range(batch)]
        t0 = time.perf_counter()
        for i in range(0, count - batch + 1, batch):
            c.get_many_into(keys[i:i + batch], bufs)
        many_s = time.perf_counter() - t0
    total = size * count
    print(f"value {format_size(size)}, {count} keys")
    for name, secs in (("put", put_s), ("get_into", get_s)):
        lats = sorted(lat[name])
        print(f"  {name:9s} {total / secs / 1e9:6.2f} GB/s  p50 {statistics.median(lats) * 1e6:8.1f} us  "
              f"p99 {lats[int(len(lats) * 0.99) - 1] * 1e6:8.1f} us")
    print(f"  get_many_into x{batch}: {total / many_s / 1e9:6.2f} GB/s")
    return 0
