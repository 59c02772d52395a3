"""Fuzzing recovery: random damage to the flash segments and the index snapshot that a real
node wrote, then a real node started on them (issue 19 item 5).

Once per module a node writes durable values across several small segments (new keys,
overwrites, deletes) and stops gracefully, so its data dir holds segments and an index
snapshot; the newest record of every key is read back from the pristine segment files with
``memkv.flash.record.scan``. Each example copies that data dir (with or without its
snapshot), damages it -- bytes flipped, ranges zeroed, a segment truncated, garbage appended, a
segment removed, the snapshot flipped or truncated -- and starts a node on it. Then:

- the node starts (it listens within the start timeout; a node that exits or hangs fails);
- every key whose newest record is intact is served with exactly that value (or, for a
  delete, not served);
- no read returns bytes that were never written for the key (a key whose newest record was
  damaged is served an older intact version or nothing);
- a key whose newest record was damaged and is not served is reported: damaged or torn
  records at recovery, a value found corrupt at read time, or the snapshot ignored. A whole
  segment file removed, or cut exactly at a record boundary (found by this fuzz, unreported
  once) is reported from the segment manifest (memkv/flash/manifest.py), with or without the
  index snapshot: ``test_missing_segment_is_reported``.

Bounded and deterministic: hypothesis ``derandomize=True``, ``MEMKV_FUZZ_RECOVERY_EXAMPLES``
examples (12 by default; ``make fuzz`` runs more).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkv.client import SyncClient
from memkv.flash import record as rec
from memkv.flash.snapshot import NAME as SNAPSHOT

NS = "d"
CONFIG = f"""
[namespaces.{NS}]
durability = "durable"
overwrite = true

[flash]
segment_size = "256KiB"
"""
SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


@dataclass
class Newest:
    """The newest record of a key in the pristine files."""

    seg: str          # segment file name
    start: int        # record bytes [start, end)
    end: int
    value: bytes | None  # None: a delete


@dataclass
class Pristine:
    data_dir: Path
    config: Path
    written: dict[bytes, set[bytes]]  # every value ever written per key
    newest: dict[bytes, Newest]


def _scan_newest(flash: Path) -> dict[bytes, Newest]:
    best: dict[bytes, tuple[int, Newest]] = {}
    for seg in sorted(flash.glob("seg-*.log")):
        buf = seg.read_bytes()
        for item in rec.scan(buf):
            assert isinstance(item, rec.Record), f"the pristine {seg.name} is damaged: {item}"
            if item.namespace != NS:
                continue
            value = bytes(buf[item.value_off:item.end]) if item.kind == rec.PUT else None
            if item.key not in best or item.lsn > best[item.key][0]:
                best[item.key] = (item.lsn, Newest(seg.name, item.offset, item.end, value))
    return {k: v for k, (_, v) in best.items()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    work = tmp_path_factory.mktemp("recovery-src")
    cfg = work / "memkv.toml"
    cfg.write_text(CONFIG)
    node = NodeProc(["--config", str(cfg), "--memory", "32MiB"], work)
    node.start()
    rnd = random.Random(19)
    written: dict[bytes, set[bytes]] = {}
    current: dict[bytes, bytes | None] = {}
    try:
        with SyncClient.connect(node.url, timeout=30) as c:
            keys = [f"rk/{i:04d}".encode() for i in range(400)]
            for k in keys:
                v = rnd.randbytes(rnd.choice([64, 700, 3000, 9000]))
                c.put(k, v, namespace=NS)
                written.setdefault(k, set()).add(v)
                current[k] = v
            for k in rnd.sample(keys, 60):  # overwrites
                v = rnd.randbytes(rnd.choice([100, 2000]))
                c.put(k, v, namespace=NS)
                written[k].add(v)
                current[k] = v
            for k in rnd.sample(keys, 40):  # deletes
                c.delete(k, namespace=NS)
                current[k] = None
    finally:
        assert node.stop() == 0, node.output()[-3000:]  # graceful: the index snapshot is written
    flash = node.data_dir / "flash"
    assert (flash / SNAPSHOT).exists() and len(list(flash.glob("seg-*.log"))) >= 3, sorted(os.listdir(flash))
    newest = _scan_newest(flash)
    assert {k: n.value for k, n in newest.items()} == current  # the files say what the client did
    return Pristine(node.data_dir, cfg, written, newest)


# -- damage
FILES = st.sampled_from(["seg0", "seg1", "seg-last", "snapshot"])
DAMAGE = st.one_of(
    st.tuples(st.just("flip"), FILES, st.floats(0, 1), st.integers(1, 16)),
    st.tuples(st.just("zero"), FILES, st.floats(0, 1), st.integers(1, 5000)),
    st.tuples(st.just("truncate"), FILES, st.floats(0, 1), st.just(0)),
    st.tuples(st.just("append"), st.sampled_from(["seg0", "seg-last"]), st.just(0.0), st.integers(1, 3000)),
    st.tuples(st.just("remove"), st.sampled_from(["seg1", "snapshot"]), st.just(0.0), st.just(0)),
)


def _file(flash: Path, which: str) -> Path | None:
    segs = sorted(flash.glob("seg-*.log"))
    if which == "snapshot":
        p = flash / SNAPSHOT
        return p if p.exists() else None
    if not segs:
        return None
    return {"seg0": segs[0], "seg1": segs[min(1, len(segs) - 1)], "seg-last": segs[-1]}[which]


def damage(flash: Path, plan: list[tuple[str, str, float, int]], rnd: random.Random) -> list[str]:
    done = []
    for what, which, where, n in plan:
        path = _file(flash, which)
        if path is None:
            continue
        size = path.stat().st_size
        off = int(where * max(0, size - 1))
        if what == "remove":
            path.unlink()
        elif what == "truncate":
            os.truncate(path, off)
        elif what == "append":
            with open(path, "ab") as f:
                f.write(rnd.randbytes(n))
        elif size:
            with open(path, "r+b") as f:
                if what == "zero":
                    f.seek(off)
                    f.write(b"\0" * min(n, size - off))
                else:  # flip n bytes around off
                    for _ in range(n):
                        o = min(size - 1, off + rnd.randrange(0, 256))
                        f.seek(o)
                        b = f.read(1)
                        f.seek(o)
                        f.write(bytes([b[0] ^ (1 + rnd.randrange(255))]))
        done.append(f"{what} {path.name}@{off}" + (f"+{n}" if n else ""))
    return done


def _copy(pristine: Pristine, work: Path, keep_snapshot: bool) -> Path:
    """The pristine data dir copied to ``work/data`` (without its snapshot unless kept); its flash dir."""
    shutil.copytree(pristine.data_dir, work / "data", ignore=shutil.ignore_patterns("LOCK"))
    flash = work / "data" / "flash"
    if not keep_snapshot:
        (flash / SNAPSHOT).unlink()
    return flash


def intact(n: Newest, src: Path, dst: Path) -> bool:
    """Whether the record's bytes are all there, unchanged, in the damaged copy."""
    a, b = src / n.seg, dst / n.seg
    if not b.exists():
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(n.start)
        fb.seek(n.start)
        want = fa.read(n.end - n.start)
        return fb.read(n.end - n.start) == want


def test_damaged_data_dir_recovers_every_intact_record(pristine: Pristine, tmp_path_factory) -> None:
    examples = int(os.environ.get("MEMKV_FUZZ_RECOVERY_EXAMPLES", "12"))
    tally: dict[str, int] = {"examples": 0, "keys_damaged": 0, "older_served": 0, "reported": 0}

    @settings(SETTINGS, max_examples=examples)
    @given(st.booleans(), st.lists(DAMAGE, min_size=1, max_size=4), st.integers(0, 1 << 30))
    def run(keep_snapshot: bool, plan: list[Any], seed: int) -> None:
        work = tmp_path_factory.mktemp("recovery")
        flash = _copy(pristine, work, keep_snapshot)
        done = damage(flash, plan, random.Random(seed))
        src = pristine.data_dir / "flash"
        snapshot_damaged = keep_snapshot and not intact_file(src / SNAPSHOT, flash / SNAPSHOT)
        node = NodeProc(["--config", str(pristine.config), "--memory", "32MiB"], work)
        node.start()  # fails the test (with the node's output) if it exits or does not listen
        try:
            keys = sorted(pristine.newest)
            with SyncClient.connect(node.url, timeout=30) as c:
                got = dict(zip(keys, c.get_many(keys, namespace=NS), strict=True))
                flash_stats = c.stats()["flash"]
            log = node.output()
        finally:
            node.kill()
        assert "Traceback" not in log, (done, log[-3000:])
        damaged_unserved = []
        for k in keys:
            n = pristine.newest[k]
            v = got[k]
            assert v is None or v in pristine.written[k], f"{k!r}: bytes never written for it ({done})"
            if intact(n, src, flash):
                assert v == n.value, f"{k!r}: intact newest record not served as written ({done})"
                continue
            tally["keys_damaged"] += 1
            if v is not None and v != n.value:
                tally["older_served"] += 1
            if v != n.value:
                damaged_unserved.append(k)
        rcv = flash_stats["recovered"]
        reported = (rcv["damaged"] + rcv["torn"] + flash_stats["corrupt"] > 0 or snapshot_damaged
                    or "ignoring the index snapshot" in log)
        if damaged_unserved:
            tally["reported"] += 1
            assert reported, f"{len(damaged_unserved)} keys lost to damage and nothing reported ({done}): {flash_stats}"
        tally["examples"] += 1

    run()
    print(f"recovery fuzz: {tally}")


def intact_file(a: Path, b: Path) -> bool:
    return b.exists() and a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(("keep_snapshot", "how"), [
    (True, "removed"),  # the snapshot's rows into the missing file: reported at recovery
    (False, "removed"),  # the segment manifest lists it: reported at recovery (found by this fuzz)
    (False, "emptied"),  # the manifest says how many of its bytes were durable
    (True, "emptied"),
])
def test_missing_segment_is_reported(pristine: Pristine, tmp_path_factory, keep_snapshot: bool, how: str) -> None:
    work = tmp_path_factory.mktemp("missing-segment")
    flash = _copy(pristine, work, keep_snapshot)
    gone = sorted(flash.glob("seg-*.log"))[1]
    lost = [k for k, n in pristine.newest.items() if n.seg == gone.name and n.value is not None]
    if how == "removed":
        gone.unlink()
    else:
        os.truncate(gone, 0)
    node = NodeProc(["--config", str(pristine.config), "--memory", "32MiB"], work)
    node.start()
    try:
        with SyncClient.connect(node.url, timeout=30) as c:
            assert c.get_many(lost, namespace=NS) == [None] * len(lost)  # gone, as expected
            fs = c.stats()["flash"]
    finally:
        node.kill()
    assert fs["recovered"]["damaged"] + fs["corrupt"] > 0, f"{len(lost)} values lost with {gone.name}, unreported: {fs}"
