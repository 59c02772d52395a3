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
6. **No resurrected delete** -- no read returns a value whose acknowledged put completed
   before an acknowledged delete of the key that completed before the read began
   (:func:`resurrected_deletes`; the load deletes ``LoadConfig.deletes`` of its writes, 10 %
   by default).
7. **No stale read where promised** -- in a soak's quiet windows (no fault active, the
   cluster converged) a read returns the last acknowledged value or a concurrent one.
8. **Served probes** -- probe reads marked ``expect="served"`` (a node asked, after a crash,
   for durable values it had acknowledged) returned an acknowledged value of the key.

Everything here takes plain data (lists of ops, tuples) and returns plain data, so it
is unit-tested with hand-made histories (tests/test_chaos.py), including failing ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.history import History, Op


def _puts_by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.op == "put":
            out[o.key].append(o)
    return out


def _mutations_by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    """Puts and deletes, per key."""
    out: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.op in ("put", "delete"):
            out[o.key].append(o)
    return out


def outcome(o: Op) -> int | None:
    """What a read after ``o`` (a put or a delete) returns: its checksum, None for a delete."""
    return o.crc if o.op == "put" else None


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


def last_acked(muts: Sequence[Op]) -> Op | None:
    acked = [p for p in muts if p.acked]
    return max(acked, key=lambda p: (p.t0, p.t1)) if acked else None


def allowed_final(muts: Sequence[Op]) -> set[int | None]:
    """Outcomes (checksums; None = no value) a read after all puts and deletes of a key ended
    may return without losing an acknowledged one: the last acknowledged one's, and those of
    any that was never acknowledged (it may have happened) or overlapped it."""
    w = last_acked(muts)
    if w is None:
        return {outcome(p) for p in muts} | {None}
    ok = {outcome(w)}
    for p in muts:
        if not p.acked or p.t1 >= w.t0:
            ok.add(outcome(p))
    return ok


@dataclass
class Loss:
    key: str
    why: str  # "miss" | "error" | "stale"
    expected_crc: int | None
    got_crc: int | None
    t0: float = 0.0  # the lost write: issued ...
    t1: float = 0.0  # ... and acknowledged


def losses_with_impaired_replica(losses: Sequence[Loss], impaired: dict[str, Sequence[tuple[float, float]]],
                                 replicas_at: Callable[[str, float, float], set[str]]) -> list[Loss]:
    """Losses of writes made while a replica of their slot was impaired (down, paused, cut off,
    slow, fenced: ``impaired[node]`` windows). Before ``acks = "all"`` memkv acknowledged a
    durable write once the replicas that answered had it, skipping one that timed out, was
    unreachable or fenced; such a write lived on fewer than R copies, and when its one copy's node
    left the slot map before anything copied it, the write was gone (docs/chaos.md finding 2;
    ``lost_single_copy``). Kept to classify losses of ``acks = "one"`` namespaces and older runs
    (a soak with ``known_single_copy``). ``replicas_at(key, t0, t1)``: the nodes that held the key's
    slot around the write."""
    out = []
    for x in losses:
        nodes = replicas_at(x.key, x.t0, x.t1)
        if any(a <= x.t1 and x.t0 <= b for n in nodes for a, b in impaired.get(n, ())):
            out.append(x)
    return out


def lost_writes(ops: Sequence[Op]) -> tuple[list[Loss], int]:
    """(losses, keys not verified): judged from each key's last ``final``-phase read. A key whose
    last acknowledged mutation is a delete is judged by :func:`resurrected_deletes` instead."""
    muts = _mutations_by_key(o for o in ops if o.phase != "probe")
    finals: dict[str, Op] = {}
    for o in ops:
        if o.op == "get" and o.phase == "final":
            if o.key not in finals or o.t0 >= finals[o.key].t0:
                finals[o.key] = o
    losses: list[Loss] = []
    unverified = 0
    for key, ms in muts.items():
        w = last_acked(ms)
        if w is None:
            continue
        f = finals.get(key)
        if f is None:
            unverified += 1
            continue
        allowed = allowed_final(ms)
        if f.result == "miss":
            if None not in allowed:
                losses.append(Loss(key, "miss", w.crc, None, w.t0, w.t1))
        elif f.result != "ok":
            losses.append(Loss(key, "error", w.crc, None, w.t0, w.t1))
        elif f.crc not in allowed and w.op == "put":
            losses.append(Loss(key, "stale", w.crc, f.crc, w.t0, w.t1))
    return losses, unverified


def resurrected_deletes(ops: Sequence[Op]) -> list[Op]:
    """Reads (any phase) that returned a value whose acknowledged put had completed before an
    acknowledged delete of the key began, the delete having completed before the read began:
    an acknowledged delete undone. (Every value is unique, so the checksum names its put.)"""
    put_of = {(o.key, o.crc): o for o in ops if o.op == "put" and o.acked}
    deletes: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.op == "delete" and o.acked:
            deletes[o.key].append(o)
    out = []
    for r in ops:
        if r.op != "get" or not r.acked or r.result != "ok" or r.key not in deletes:
            continue
        p = put_of.get((r.key, r.crc))
        if p is not None and any(p.t1 < d.t0 and d.t1 < r.t0 for d in deletes[r.key]):
            out.append(r)
    return out


def stale_reads(ops: Sequence[Op], windows: Sequence[tuple[float, float]] | None = None) -> list[Op]:
    """Load-phase reads that missed, or returned a superseded value, although an acknowledged
    put (or delete) of that key had completed before the read began. Informational over a whole
    run (memkv promises no read-your-writes across a failover); with ``windows``, only reads
    issued inside one of them (the quiet periods of a soak, where it is promised)."""
    muts = _mutations_by_key(ops)
    out = []
    for o in ops:
        if o.op != "get" or o.phase != "load" or o.result not in ("ok", "miss"):
            continue
        if windows is not None and not any(a <= o.t0 and o.t1 <= b for a, b in windows):
            continue
        ms = muts.get(o.key, ())
        before = [m for m in ms if m.acked and m.t1 < o.t0]
        if not before:
            continue
        w = max(before, key=lambda m: (m.t0, m.t1))
        allowed = {outcome(w)} | {outcome(m) for m in ms if m.t1 >= w.t0 or not m.acked}
        if (None if o.result == "miss" else o.crc) not in allowed:
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


def first_deletes(ops: Iterable[Op]) -> dict[str, float]:
    """When the first delete of each key (acknowledged or not: it may have happened) began."""
    out: dict[str, float] = {}
    for o in ops:
        if o.op == "delete" and o.t0 < out.get(o.key, float("inf")):
            out[o.key] = o.t0
    return out


def deleted_meanwhile(read: Op, first_delete: dict[str, float]) -> bool:
    """A miss of a key that the load had begun to delete before the read ended: no loss."""
    return read.result == "miss" and first_delete.get(read.key, float("inf")) < read.t1


def unserved_probes(ops: Sequence[Op]) -> list[Op]:
    """Probe reads marked ``expect="served"`` that did not return an acknowledged value of the key
    (e.g. a node asked, after a crash, for the durable values it had acknowledged), unless the load
    had begun to delete the key and the probe missed."""
    acked = {(o.key, o.crc) for o in ops if o.op == "put" and o.acked}
    gone = first_deletes(ops)
    return [o for o in ops if o.phase == "probe" and o.expect == "served" and o.op == "get"
            and not (o.acked and o.result == "ok" and (o.key, o.crc) in acked) and not deleted_meanwhile(o, gone)]


@dataclass
class Verdict:
    passed: bool
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def check(history: History, *, read_bound_s: float, check_lost: bool = True,
          converge_samples: Sequence[tuple[float, bool]] = (), healed_at: float | None = None,
          converge_bound_s: float | None = None, slow_s: float | None = None,
          quiet: Sequence[tuple[float, float]] | None = None,
          known_losses: Callable[[list[Loss]], list[Loss]] | None = None) -> Verdict:
    """All invariants over one run; ``metrics`` feeds the report. ``quiet``: windows with no
    fault active and the cluster converged (a soak's), where stale reads are violations.
    ``known_losses`` picks the losses that a known gap explains (a soak passes
    :func:`losses_with_impaired_replica`): they are reported apart and are no violation --
    nor are the stale reads of those keys."""
    ops = history.ops
    load = [o for o in ops if o.phase == "load"]
    bad_reads = invalid_reads(ops)
    losses, unverified = lost_writes(ops)
    known = known_losses(losses) if known_losses is not None else []
    known_keys = {x.key for x in known}
    losses = [x for x in losses if x.key not in known_keys]
    rwin = unavailability(ops, "get", slow_s=slow_s)
    wwin = unavailability(ops, "put")
    zombies = zombie_writes(ops)
    unserved = unserved_probes(ops)
    stale = stale_reads(ops)
    resurrected = resurrected_deletes(ops)
    stale_quiet = [o for o in stale_reads(ops, quiet) if o.key not in known_keys] if quiet is not None else []
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
    if resurrected:
        v.append(f"{len(resurrected)} read(s) returned a value deleted by an acknowledged delete, e.g. "
                 f"{resurrected[0].key}")
    if stale_quiet:
        v.append(f"{len(stale_quiet)} stale read(s) with no fault active, e.g. {stale_quiet[0].key}")
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
        "acked_writes_lost_known": None if known_losses is None else len(known),
        "lost_known_examples": [loss.__dict__ for loss in known[:5]],
        "keys_unverified": unverified,
        "final_reads": sum(o.phase == "final" for o in ops),
        "invalid_reads": len(bad_reads),
        "stale_reads": len(stale),
        "stale_reads_quiet": None if quiet is None else len(stale_quiet),
        "deletes_attempted": sum(o.op == "delete" for o in load),
        "deletes_acknowledged": sum(o.op == "delete" and o.acked for o in load),
        "resurrected_deletes": len(resurrected),
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
