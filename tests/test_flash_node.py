"""The durable flash tier, through real node processes and real segment files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from memkv.client import Client, SyncClient
from memkv.errors import DiskFull
from memkv.flash import record as r

DURABLE = """
[namespaces.ctx]
durability = "durable"
overwrite = true
[namespaces.blocks]
durability = "durable"
"""


def _segments(node) -> list[Path]:
    return sorted((node.data_dir / "flash").glob("seg-*.log"))


def _records(path: Path) -> list[r.Record]:
    return [x for x in r.scan(path.read_bytes()) if isinstance(x, r.Record)]


def _flash(c: SyncClient) -> dict:
    return c.stats()["flash"]


def _wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_durable_values_survive_kill_and_restart(start_node):
    node = start_node(config=DURABLE)
    vals = {f"k{i}".encode(): os.urandom(1000 + i * 37) for i in range(200)}
    with SyncClient.connect(node.url) as c:
        for k, v in vals.items():
            c.put(k, v, namespace="ctx")
        c.put_many(list(vals.items())[:50], namespace="blocks")
        assert c.delete(b"k7", namespace="ctx")
        c.put(b"k8", b"overwritten", namespace="ctx")
        c.put(b"mem", b"memory value")  # the "shared" namespace is not durable
    node.kill()
    node.start()
    with SyncClient.connect(node.url) as c:
        st = _flash(c)
        assert st["recovered"]["replayed"] >= 252 and st["recovered"]["snapshot_entries"] == 0
        assert c.get(b"k7", namespace="ctx") is None
        assert c.get(b"k8", namespace="ctx") == b"overwritten"
        for k, v in vals.items():
            if k not in (b"k7", b"k8"):
                assert c.get(k, namespace="ctx") == v
        assert c.get_many(list(vals)[:50], namespace="blocks") == list(vals.values())[:50]
        assert c.get(b"mem") is None
    node.restart()  # graceful: the index snapshot is written at shutdown
    with SyncClient.connect(node.url) as c:
        st = _flash(c)
        assert st["recovered"]["snapshot_entries"] == 249 and st["recovered"]["replayed"] == 0
        assert c.get(b"k199", namespace="ctx") == vals[b"k199"]
        assert c.get(b"k7", namespace="ctx") is None


def test_memory_namespaces_never_touch_disk(start_node):
    node = start_node()
    with SyncClient.connect(node.url) as c:
        c.put(b"a", b"x" * 10000)
        c.put(b"s", b"y", namespace="session")
        assert "flash" not in c.stats()
    assert not (node.data_dir / "flash").exists()
    node2 = start_node(config=DURABLE)
    with SyncClient.connect(node2.url) as c:
        for i in range(20):
            c.put(f"m{i}".encode(), b"z" * 5000)
        assert _flash(c)["records"] == 0 and _flash(c)["used"] == 0
    assert _segments(node2) == []


def test_durable_namespace_needs_a_data_dir(tmp_path):
    cfg = tmp_path / "memkv.toml"
    cfg.write_text(DURABLE)
    p = subprocess.run([sys.executable, "-m", "memkv.cli", "serve", "--listen", "127.0.0.1:0", "--memory", "8MiB",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "durable" in p.stderr and "--data-dir" in p.stderr


def test_eviction_keeps_values_on_flash_and_reads_promote(start_node):
    node = start_node("--memory", "8MiB", config=DURABLE)
    vals = {f"v{i}".encode(): os.urandom(200_000) for i in range(120)}  # 24 MB through an 8 MiB region
    with SyncClient.connect(node.url) as c:
        for k, v in vals.items():
            c.put(k, v, namespace="blocks")
        st = c.stats()
        assert st["evictions"] > 0
        assert st["namespaces"]["blocks"]["entries"] == 120
        for k, v in vals.items():
            assert c.get(k, namespace="blocks") == v
        keys = list(vals)[:30]
        assert c.get_many(keys, namespace="blocks") == [vals[k] for k in keys]
        assert _flash(c)["promotions"] > 0
        assert c.exists_many(keys, namespace="blocks") == [True] * 30


def test_group_commit_batches_concurrent_puts(start_node):
    node = start_node(config=DURABLE)

    async def main() -> None:
        async with await Client.connect(node.url) as c:
            async with trio.open_nursery() as n:
                for w in range(8):
                    async def worker(w: int = w) -> None:
                        for i in range(40):
                            await c.put(f"w{w}-{i}".encode(), os.urandom(4096), namespace="ctx")
                    n.start_soon(worker)

    trio.run(main)
    with SyncClient.connect(node.url) as c:
        st = _flash(c)
        assert st["records"] == 320
        assert st["fsyncs"] < 320, st  # several puts share one fsync


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize("where", ["value", "header"])
def test_flipped_bytes_cost_one_record(start_node, where):
    node = start_node(config=DURABLE)
    vals = {f"c{i}".encode(): os.urandom(3000) for i in range(40)}
    with SyncClient.connect(node.url) as c:
        for k, v in vals.items():
            c.put(k, v, namespace="blocks")
    if where == "value":
        node.stop()  # with a snapshot: the damage is found when the value is read
    else:
        node.kill()  # no snapshot: the damage is found by the log replay
    seg = _segments(node)[0]
    recs = _records(seg)
    victim = recs[17]
    _flip(seg, victim.value_off + 100 if where == "value" else victim.offset + 30)
    node.start()
    with SyncClient.connect(node.url) as c:
        for k, v in vals.items():
            got = c.get(k, namespace="blocks")
            if k == victim.key:
                assert got is None
            else:
                assert got == v, k
        st = _flash(c)
        assert st["corrupt"] == 1
        if where == "header":
            assert st["recovered"]["damaged"] == 1
    assert "damaged" in node.output()


def test_disk_full_is_typed_reads_keep_working_and_it_recovers(start_node):
    node = start_node("--disk", "2MiB", "--segment-size", "256KiB", "--compaction-rate", "0", config=DURABLE)
    v = os.urandom(60_000)
    stored = []
    with SyncClient.connect(node.url) as c:
        with pytest.raises(DiskFull):
            for i in range(200):
                c.put(f"f{i}".encode(), v, namespace="ctx")
                stored.append(f"f{i}".encode())
        assert 20 <= len(stored) < 40
        with pytest.raises(DiskFull):
            c.put(b"again", v, namespace="ctx")
        assert _flash(c)["disk_full"] >= 2
        # reads and memory namespaces keep working
        assert all(c.get(k, namespace="ctx") == v for k in stored)
        c.put(b"mem", v)
        # delete most, compaction frees whole segments, writes work again
        for k in stored[:-3]:
            assert c.delete(k, namespace="ctx")
        _wait_for(lambda: _flash(c)["compactions"] > 0 and _flash(c)["used"] < 1 << 20, what="compaction")
        for i in range(10):
            c.put(f"g{i}".encode(), v, namespace="ctx")
        assert all(c.get(k, namespace="ctx") == v for k in stored[-3:])
    node.kill()
    node.start()
    with SyncClient.connect(node.url) as c:
        assert all(c.get(k, namespace="ctx") == v for k in stored[-3:])
        assert all(c.get(k, namespace="ctx") is None for k in stored[:-3])
        assert all(c.get(f"g{i}".encode(), namespace="ctx") == v for i in range(10))


def test_compaction_reclaims_overwritten_deleted_and_expired(start_node):
    node = start_node("--segment-size", "256KiB", "--compaction-rate", "8MiB", config=DURABLE)
    final = {}
    with SyncClient.connect(node.url) as c:
        for _rnd in range(12):
            for i in range(20):
                k = f"o{i}".encode()
                final[k] = os.urandom(8000)
                c.put(k, final[k], namespace="ctx")
            # reads and writes keep being served while compaction runs
            assert c.get(b"o3", namespace="ctx") == final[b"o3"]
        for i in range(10):
            c.put(f"t{i}".encode(), os.urandom(8000), namespace="ctx", ttl=0.5)
        for i in range(10):
            c.put(f"d{i}".encode(), os.urandom(8000), namespace="ctx")
            c.delete(f"d{i}".encode(), namespace="ctx")
        written = _flash(c)["bytes_written"]
        _wait_for(lambda: _flash(c)["used"] < written / 3 and _flash(c)["compactions"] >= 3, what="compaction")
        st = _flash(c)
        assert st["reclaimed"] > 0
        assert all(c.get(k, namespace="ctx") == v for k, v in final.items())
    node.kill()
    node.start()
    with SyncClient.connect(node.url) as c:
        assert all(c.get(k, namespace="ctx") == v for k, v in final.items())
        assert all(c.get(f"t{i}".encode(), namespace="ctx") is None for i in range(10))
        assert all(c.get(f"d{i}".encode(), namespace="ctx") is None for i in range(10))


def test_write_versions_survive_a_restart(start_node):
    """A node restarted from disk must still know how old its values are: replicas compare
    versions to pick the newest (memkv/protocol/versions.py); with versions lost, an older
    value could win over a newer one after a rolling restart."""
    from memkv.client.core.calls import GetManyCall

    node = start_node(config=DURABLE)
    keys = [f"v{i}".encode() for i in range(20)]

    def versions(c: SyncClient) -> list[int]:
        call = GetManyCall(keys, namespace="ctx")
        assert all(v is not None for v in c.pool.call(c.router.node, call))
        return call.versions

    with SyncClient.connect(node.url) as c:
        for k in keys:
            c.put(k, b"first " + k, namespace="ctx")
        for k in keys[:10]:
            c.put(k, b"second " + k, namespace="ctx")
        before = versions(c)
        assert min(before) > 0 and min(before[:10]) > max(before[10:])
    node.kill()  # recovery replays the log records
    node.start()
    with SyncClient.connect(node.url) as c:
        assert versions(c) == before
    node.stop()  # a clean stop writes the index snapshot: recovery loads it
    node.start()
    with SyncClient.connect(node.url) as c:
        assert versions(c) == before
        assert _flash(c)["recovered"]["snapshot_entries"] == len(keys)


def test_delete_tombstones_survive_a_restart(start_node):
    """A versioned delete's tombstone is in the flash log (and the index snapshot): after a kill
    (log replay) and after a clean stop (snapshot) the node still refuses a write older than the
    delete -- a read repair or slot copy from a replica that missed the delete."""
    from memkv.client.core.calls import GetManyCall, PutManyCall

    node = start_node(config=DURABLE)
    keys = [f"d{i}".encode() for i in range(10)]
    with SyncClient.connect(node.url) as c:
        for k in keys:
            c.put(k, b"old " + k, namespace="ctx")
        call = GetManyCall(keys, namespace="ctx")
        c.pool.call(c.router.node, call)
        old = call.versions
        assert min(old) > 0
        for k in keys:
            assert c.delete(k, namespace="ctx")

    def resend_and_check(c: SyncClient) -> None:
        # the older values again, with their versions, as a repair from a stale replica sends them
        c.pool.call(c.router.node, PutManyCall(keys, [b"old " + k for k in keys], namespace="ctx", ttl=None,
                                               pin=False, extra={"vers": old}))
        assert c.get_many(keys, namespace="ctx") == [None] * len(keys)

    node.kill()
    node.start()
    with SyncClient.connect(node.url) as c:
        assert _flash(c)["recovered"]["tombstones"] == len(keys)
        resend_and_check(c)
    node.stop()  # a clean stop writes the index snapshot, tombstones included
    node.start()
    with SyncClient.connect(node.url) as c:
        assert _flash(c)["recovered"]["tombstones"] == len(keys)
        resend_and_check(c)
        assert c.stats()["tombstones"]["held"] == len(keys)
