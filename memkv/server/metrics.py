"""Node metrics kept in plain dicts on the hot path, exported on demand.

prometheus_client's labelled counters cost microseconds per increment; a node
serving 4 KiB GETs cannot afford that on every request. Counters here are dict
increments, and a custom collector turns them into Prometheus families only
when the endpoint is scraped.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

# Latency buckets in seconds: 10 µs .. 10 s.
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0, 10.0)


class Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (coarse, for status views)."""
        if not self.n:
            return 0.0
        target, acc = q * self.n, 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")


class NodeMetrics:
    def __init__(self) -> None:
        self.ops: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.bytes_in = 0
        self.bytes_out = 0
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.connections = 0
        self.connections_total = 0
        self.auth_failures = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "errors": dict(self.errors),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "connections": self.connections,
            "connections_total": self.connections_total,
            "auth_failures": self.auth_failures,
            "latency_p50_us": {op: h.quantile(0.5) * 1e6 for op, h in self.latency.items()},
            "latency_p99_us": {op: h.quantile(0.99) * 1e6 for op, h in self.latency.items()},
        }


class MetricsCollector:
    """A prometheus_client collector reading NodeMetrics and the store's stats."""

    def __init__(self, metrics: NodeMetrics, store_stats: Callable[[], dict[str, Any]],
                 extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.metrics = metrics
        self.store_stats = store_stats
        self.extra = extra

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.metrics
        ops = CounterMetricFamily("memkv_ops", "Requests handled, by operation", labels=["op"])
        for op, n in m.ops.items():
            ops.add_metric([op], n)
        yield ops
        errs = CounterMetricFamily("memkv_errors", "Typed error replies, by error", labels=["error"])
        for name, n in m.errors.items():
            errs.add_metric([name], n)
        yield errs
        yield CounterMetricFamily("memkv_bytes_in", "Payload bytes received", value=m.bytes_in)
        yield CounterMetricFamily("memkv_bytes_out", "Payload bytes sent", value=m.bytes_out)
        yield GaugeMetricFamily("memkv_connections", "Open client connections", value=m.connections)
        yield CounterMetricFamily("memkv_auth_failures", "Failed authentications", value=m.auth_failures)
        lat = HistogramMetricFamily("memkv_request_seconds", "Request latency inside the node",
                                    labels=["op"])
        for op, h in m.latency.items():
            acc, buckets = 0, []
            for bound, c in zip(BUCKETS, h.counts, strict=False):
                acc += c
                buckets.append((repr(bound), acc))
            buckets.append(("+Inf", h.n))
            lat.add_metric([op], buckets, sum_value=h.total)
        yield lat

        st = self.store_stats()
        region = st.get("region", {})
        for name in ("size", "used", "free", "quarantined"):
            if name in region:
                yield GaugeMetricFamily(f"memkv_region_{name}_bytes", f"Region bytes {name}",
                                        value=region[name])
        if "fragmentation" in region:
            yield GaugeMetricFamily("memkv_region_fragmentation", "1 - largest free extent / free bytes",
                                    value=region["fragmentation"])
        yield GaugeMetricFamily("memkv_entries", "Values stored", value=st.get("entries", 0))
        yield CounterMetricFamily("memkv_corrupt_values", "Values dropped after a checksum mismatch",
                                  value=st.get("corrupt", 0))
        ev = CounterMetricFamily("memkv_evictions", "Evictions, by pool", labels=["pool"])
        used = GaugeMetricFamily("memkv_pool_used_bytes", "Bytes used, by pool", labels=["pool"])
        for pool, p in st.get("pools", {}).items():
            ev.add_metric([pool], p.get("evictions", 0))
            used.add_metric([pool], p.get("used", 0))
        yield ev
        yield used
        for fam_name, source in (("namespace", "namespaces"), ("tenant", "tenants")):
            hits = CounterMetricFamily(f"memkv_{fam_name}_hits", f"GET hits, by {fam_name}",
                                       labels=[fam_name])
            misses = CounterMetricFamily(f"memkv_{fam_name}_misses", f"GET misses, by {fam_name}",
                                         labels=[fam_name])
            for name, s in st.get(source, {}).items():
                hits.add_metric([name or "-"], s.get("hits", 0))
                misses.add_metric([name or "-"], s.get("misses", 0))
            yield hits
            yield misses
        if self.extra is not None:
            for name, value in self.extra().items():
                yield GaugeMetricFamily(f"memkv_{name}", name, value=value)
