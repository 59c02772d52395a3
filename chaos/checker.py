"""The history checker: pure functions over a recorded :class:`~chaos.history.History`.

Invariants (issue 8 item 3):

1. **No acknowledged write lost** -- for every key with an acknowledged put, the
   verification read after the fault healed (phase ``final``) returns the last
   acknowledged value or the value of a write that may legally have taken effect
   after it (one that overlapped it, or was never acknowledged: an unacknowledged
   write may or may not have happened). A miss, an error, or an older value is a loss.
2. **No invalid read** -- every value a read returned (any phase) has the checksum of
   a value some put wrote *for that key* and issued before the read completed.
3. **Reads recover within the failover bound** -- every window in which reads failed
   (from the first failed read until a read succeeded again) is at most the bound,
   and no window is still open when the load stops.
4. **Convergence** -- after the fault healed, every slot of the slot map names
   min(R, live nodes) distinct replicas, all of them live (:func:`slot_map_problems`).
5. **No zombie write** -- probes marked ``expect="refused"`` (e.g. a write that reached
   a node while it was paused beyond its lease) were not acknowledged.
6. **Served probes** -- probe reads marked ``expect="served"`` (a node asked, after a crash,
   for durable values it had acknowledged) returned an acknowledged value of the key.

Everything here takes plain data (lists of ops, tuples) and returns plain data, so it
is unit-tested with hand-made histories (tests/test_chaos.py), including failing ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.history import History, Op


def _puts_by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.op == "put":
            out[o.key].append(o)
    return out


def invalid_reads(ops: Sequence[Op]) -> list[Op]:
    """Reads that returned bytes no put wrote for that key (before the read completed)."""
    puts = _puts_by_key(ops)
    bad = []
    for o in ops:
        if o.op != "get" or o.result != "ok":
            continue
        if o.crc is None or not any(p.crc == o.crc and p.t0 <= o.t1 for p in puts.get(o.key, ())):
            bad.append(o)
    return bad


def last_acked(puts: Sequence[Op]) -> Op | None:
    acked = [p for p in puts if p.acked]
    return max(acked, key=lambda p: (p.t0, p.t1)) if acked else None


def allowed_final(puts: Sequence[Op]) -> set[int]:
    """Checksums a read after all writes ended may return without losing an acknowledged write."""
    w = last_acked(puts)
    if w is None:
        return {p.crc for p in puts if p.crc is not None}
    ok = {w.crc}
    for p in puts:
        if not p.acked or p.t1 >= w.t0:  # never acknowledged (may have happened), or overlapped w
            ok.add(p.crc)
    ok.discard(None)
    return ok  # type: ignore[return-value]


@dataclass
class Loss:
    key: str
    why: str  # "miss" | "error" | "stale"
    expected_crc: int | None
    got_crc: int | None


def lost_writes(ops: Sequence[Op]) -> tuple[list[Loss], int]:
    """(losses, keys not verified): judged from each key's last ``final``-phase read."""
    puts = _puts_by_key(o for o in ops if o.phase != "probe")
    finals: dict[str, Op] = {}
    for o in ops:
        if o.op == "get" and o.phase == "final":
            if o.key not in finals or o.t0 >= finals[o.key].t0:
                finals[o.key] = o
    losses: list[Loss] = []
    unverified = 0
    for key, ps in puts.items():
        w = last_acked(ps)
        if w is None:
            continue
        f = finals.get(key)
        if f is None:
            unverified += 1
            continue
        if f.result == "miss":
            losses.append(Loss(key, "miss", w.crc, None))
        elif f.result != "ok":
            losses.append(Loss(key, "error", w.crc, None))
        elif f.crc not in allowed_final(ps):
            losses.append(Loss(key, "stale", w.crc, f.crc))
    return losses, unverified


def stale_reads(ops: Sequence[Op]) -> list[Op]:
    """Load-phase reads that missed, or returned a superseded value, although an
    acknowledged put of that key had completed before the read began (informational:
    memkv promises no read-your-writes across a failover)."""
    puts = _puts_by_key(ops)
    out = []
    for o in ops:
        if o.op != "get" or o.phase != "load" or o.result not in ("ok", "miss"):
            continue
        before = [p for p in puts.get(o.key, ()) if p.acked and p.t1 < o.t0]
        if not before:
            continue
        if o.result == "miss":
            out.append(o)
            continue
        w = max(before, key=lambda p: (p.t0, p.t1))
        still = {p.crc for p in puts[o.key] if p.t1 >= w.t0 or not p.acked}
        superseded = {p.crc for p in before if p.t1 < w.t0} - still
        if o.crc in superseded:
            out.append(o)
    return out


@dataclass
class Window:
    start: float
    end: float
    failed: int
    recovered: bool = True

    @property
    def length(self) -> float:
        return self.end - self.start


def unavailability(ops: Sequence[Op], kind: str, *, phase: str = "load", slow_s: float | None = None) -> list[Window]:
    """Windows in which ``kind`` ops ("get"/"put") failed: from the first failed op's start
    to the end of the next successful op (ops in issue order). With ``slow_s``, an op
    that succeeded but took longer counts as failed. A window still open at the end of
    the history has ``recovered=False`` and ends at the last op's end."""
    sel = sorted((o for o in ops if o.op == kind and o.phase == phase), key=lambda o: o.t0)
    windows: list[Window] = []
    cur: Window | None = None
    for o in sel:
        failed = not o.acked or (slow_s is not None and o.t1 - o.t0 > slow_s)
        if failed:
            if cur is None:
                cur = Window(o.t0, o.t1, 0)
            cur.failed += 1
            cur.end = max(cur.end, o.t1)
        elif cur is not None:
            cur.end = max(cur.end, o.t1)
            windows.append(cur)
            cur = None
    if cur is not None:
        cur.end = max([cur.end] + [o.t1 for o in sel])
        cur.recovered = False
        windows.append(cur)
    return windows


def longest(windows: Sequence[Window]) -> float:
    return max((w.length for w in windows), default=0.0)


def slot_map_problems(table: Sequence[Sequence[str]], live: Iterable[str], replicas: int) -> list[int]:
    """Slots that do not name min(R, |live|) distinct live replicas."""
    live = set(live)
    want = min(replicas, len(live))
    return [s for s, row in enumerate(table) if len(set(row)) != len(row) or len(row) != want
            or not set(row) <= live]


def time_to_converge(samples: Sequence[tuple[float, bool]], healed_at: float) -> float | None:
    """Seconds from ``healed_at`` until the first converged sample after which every sample
    is converged; None if the last sample is not converged."""
    after = [(t, ok) for t, ok in sorted(samples) if t >= healed_at]
    if not after or not after[-1][1]:
        return None
    first = after[-1][0]
    for t, ok in reversed(after):
        if not ok:
            break
        first = t
    return max(0.0, first - healed_at)


def zombie_writes(ops: Sequence[Op]) -> list[Op]:
    return [o for o in ops if o.phase == "probe" and o.expect == "refused" and o.acked]


def unserved_probes(ops: Sequence[Op]) -> list[Op]:
    """Probe reads marked ``expect="served"`` that did not return an acknowledged value of the key
    (e.g. a node asked, after a crash, for the durable values it had acknowledged)."""
    acked = {(o.key, o.crc) for o in ops if o.op == "put" and o.acked}
    return [o for o in ops if o.phase == "probe" and o.expect == "served" and o.op == "get"
            and not (o.acked and o.result == "ok" and (o.key, o.crc) in acked)]


@dataclass
class Verdict:
    passed: bool
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def check(history: History, *, read_bound_s: float, check_lost: bool = True,
          converge_samples: Sequence[tuple[float, bool]] = (), healed_at: float | None = None,
          converge_bound_s: float | None = None, slow_s: float | None = None) -> Verdict:
    """All invariants over one run; ``metrics`` feeds the report."""
    ops = history.ops
    load = [o for o in ops if o.phase == "load"]
    bad_reads = invalid_reads(ops)
    losses, unverified = lost_writes(ops)
    rwin = unavailability(ops, "get", slow_s=slow_s)
    wwin = unavailability(ops, "put")
    zombies = zombie_writes(ops)
    unserved = unserved_probes(ops)
    stale = stale_reads(ops)
    ttc = time_to_converge(converge_samples, healed_at) if healed_at is not None and converge_samples else None
    v: list[str] = []
    if check_lost and losses:
        v.append(f"{len(losses)} acknowledged write(s) lost, e.g. {losses[0].key} ({losses[0].why})")
    if bad_reads:
        v.append(f"{len(bad_reads)} read(s) returned bytes never written for the key, e.g. {bad_reads[0].key}")
    slow = [w for w in rwin if w.length > read_bound_s or not w.recovered]
    if slow:
        w = max(slow, key=lambda w: w.length)
        v.append(f"reads unavailable for {w.length:.1f}s (bound {read_bound_s:.1f}s)"
                 + ("" if w.recovered else ", never recovered"))
    if zombies:
        v.append(f"{len(zombies)} write(s) acknowledged by a fenced (zombie) node")
    if unserved:
        v.append(f"{len(unserved)} probe read(s) of acknowledged durable values not served, e.g. "
                 f"{unserved[0].key} ({unserved[0].result} {unserved[0].error})".rstrip())
    if converge_samples and ttc is None:
        v.append("the cluster did not converge after the fault healed")
    elif ttc is not None and converge_bound_s is not None and ttc > converge_bound_s:
        v.append(f"convergence took {ttc:.1f}s (bound {converge_bound_s:.1f}s)")
    metrics = {
        "ops_attempted": len(load),
        "ops_acknowledged": sum(o.acked for o in load),
        "writes_attempted": sum(o.op == "put" for o in load),
        "writes_acknowledged": sum(o.op == "put" and o.acked for o in load),
        "reads_attempted": sum(o.op == "get" for o in load),
        "reads_acknowledged": sum(o.op == "get" and o.acked for o in load),
        "acked_writes_lost": len(losses),
        "lost_examples": [loss.__dict__ for loss in losses[:5]],
        "keys_unverified": unverified,
        "final_reads": sum(o.phase == "final" for o in ops),
        "invalid_reads": len(bad_reads),
        "stale_reads": len(stale),
        "zombie_writes": len(zombies),
        "unserved_probes": len(unserved),
        "probes": sum(o.phase == "probe" for o in ops),
        "read_unavailable_s": round(longest(rwin), 3),
        "write_unavailable_s": round(longest(wwin), 3),
        "read_windows": len(rwin),
        "write_windows": len(wwin),
        "max_read_latency_s": round(max((o.t1 - o.t0 for o in load if o.op == "get" and o.acked), default=0.0), 3),
        "time_to_converge_s": None if ttc is None else round(ttc, 3),
        "faults": [e.what for e in history.faults()],
    }
    return Verdict(not v, v, metrics)
