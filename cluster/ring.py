"""A consistent-hash ring of virtual nodes (mmh3), zone-aware. Pure functions.

Each node owns ``vnodes`` points on a 32-bit ring (``mmh3("<id>#<i>")``). A
slot's preference list is the sequence of distinct nodes met walking clockwise
from the slot's own point. ``memkv.cluster.slotmap`` turns these preferences
into a balanced, sticky slot map.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator, Mapping

import mmh3

VNODES = 64


def point(data: bytes) -> int:
    return mmh3.hash(data, 0, signed=False)


def slot_point(slot: int) -> int:
    return point(b"slot:%d" % slot)


@functools.lru_cache(maxsize=8)
def slot_points(slots: int) -> tuple[int, ...]:
    """Every slot's ring point (the rebalancer asks for them at every change: hash them once)."""
    return tuple(slot_point(s) for s in range(slots))


@functools.lru_cache(maxsize=1 << 14)
def node_points(node_id: str, vnodes: int) -> tuple[tuple[int, str], ...]:
    """A node's virtual-node points (a node keeps them for life: hash them once)."""
    return tuple((point(f"{node_id}#{i}".encode()), node_id) for i in range(vnodes))


class Ring:
    def __init__(self, members: Mapping[str, str], vnodes: int = VNODES) -> None:
        """``members``: node id -> zone."""
        self.members = dict(members)
        pts = sorted(p for nid in self.members for p in node_points(nid, vnodes))
        self.points = [p for p, _ in pts]
        self.owners = [n for _, n in pts]
        self._by_node: dict[str, list[int]] = {}
        for p, n in pts:
            self._by_node.setdefault(n, []).append(p)

    def __len__(self) -> int:
        return len(self.points)

    def start(self, h: int) -> int:
        """Index of the first ring position clockwise from hash ``h``."""
        i = bisect.bisect_left(self.points, h)
        return 0 if i == len(self.points) else i

    def walk(self, h: int) -> Iterator[str]:
        """Distinct nodes clockwise from ``h`` (each once)."""
        if not self.points:
            return
        seen: set[str] = set()
        i = self.start(h)
        for k in range(len(self.points)):
            n = self.owners[(i + k) % len(self.points)]
            if n not in seen:
                seen.add(n)
                yield n
                if len(seen) == len(self.members):
                    return

    def preference(self, h: int, count: int, *, zone_aware: bool = True) -> list[str]:
        """The first ``count`` nodes clockwise from ``h``; with ``zone_aware``,
        nodes of not-yet-used zones come first while there are any."""
        order = list(self.walk(h))
        if not zone_aware:
            return order[:count]
        out: list[str] = []
        used: set[str] = set()
        for n in order:
            if len(out) == count:
                break
            z = self.members[n]
            if z not in used:
                out.append(n)
                used.add(z)
        for n in order:
            if len(out) == count:
                break
            if n not in out:
                out.append(n)
        return out

    def distance_to(self, node_id: str, h: int) -> int:
        """Clockwise distance from ``h`` to ``node_id``'s nearest point (its "claim" on ``h``)."""
        pts = self._by_node.get(node_id)
        if not pts:
            return 1 << 33
        i = bisect.bisect_left(pts, h)
        p = pts[i] if i < len(pts) else pts[0] + (1 << 32)
        return p - h
