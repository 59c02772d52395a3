"""``memkv serve --workers N`` (memkv/tools/workers.py): real supervisor and worker processes.

- a worker killed with SIGKILL is restarted by its supervisor with its durable values back,
  while the other worker keeps serving;
- SIGTERM / SIGINT to the supervisor reach every worker (each shuts down cleanly) and end it;
  a supervisor killed outright takes its workers along (no orphan holds a port);
- a cluster of 2 "hosts" x 2 workers (two supervisors with ``--host-id hA`` / ``hB`` on this
  machine, a real etcd), R = 2: no slot has both replicas on one host, and killing one host
  (its supervisor and so all its workers, with SIGKILL) loses no acknowledged durable write;
  ``memkv drain --host`` empties a whole host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProc, free_port, poll, rdma_skip_reason, wait_for_port

from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot

DURABLE = """
[namespaces.ctx]
durability = "durable"
"""


# the Soft-RoCE guest (TCG emulation, repository over 9p) starts processes slowly: its harness raises it
START_TIMEOUT_S = max(60.0, float(os.environ.get("MEMKV_NODE_START_TIMEOUT", "0")))


class Supervised(NodeProc):
    """A ``memkv serve --workers N`` process (the supervisor); ``port`` is worker 0's."""

    def __init__(self, args: list[str], workdir: Path, workers: int) -> None:
        super().__init__(args, workdir)
        self.ports = [self.port] + [free_port() for _ in range(workers - 1)]
        self.args += ["--workers", str(workers), "--worker-ports", ",".join(map(str, self.ports))]

    def addr(self, i: int) -> str:
        return f"{self.host}:{self.ports[i]}"

    def start(self, timeout: float = 60.0) -> Supervised:
        super().start(timeout)
        for p in self.ports[1:]:
            wait_for_port(self.host, p, timeout, alive=lambda: self.running)
        return self

    def workers(self) -> dict[int, int]:
        """Worker index -> pid of the supervisor's live children (from /proc: their command lines)."""
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.pid:
                    continue
                argv = (d / "cmdline").read_bytes().split(b"\0")
                node_id = argv[argv.index(b"--node-id") + 1].decode()
                out[int(node_id.rsplit("-w", 1)[1])] = int(d.name)
        return out


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def supervise(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Supervised]]:
    """Factory: ``supervise(*args, workers=2, config=None) -> Supervised`` (started); all killed at teardown."""
    procs: list[Supervised] = []

    def _start(*args: str, workers: int = 2, config: str | None = None) -> Supervised:
        workdir = tmp_path_factory.mktemp("workers")
        extra = [str(a) for a in args]
        if config is not None:
            (workdir / "memkv.toml").write_text(config)
            extra = ["--config", str(workdir / "memkv.toml"), *extra]
        sup = Supervised(extra, workdir, workers)
        procs.append(sup)
        return sup.start(START_TIMEOUT_S)

    yield _start
    for sup in procs:
        pids = sup.workers() if sup.running else {}
        sup.kill()
        for pid in pids.values():  # they die with the supervisor (PDEATHSIG); make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_crashed_worker_is_restarted_with_its_durable_values_while_the_other_serves(supervise: Any) -> None:
    sup = supervise("--host-id", "hA", config=DURABLE)
    values = {f"k{i}".encode(): os.urandom(500 + i) for i in range(100)}
    with SyncClient.connect(f"memkv://{sup.addr(1)}/direct", transport="tcp", timeout=5.0) as c:
        for k, v in values.items():
            c.put(k, v, namespace="ctx")
        st = c.stats()
    # each worker: its share of the region, its own flash directory, its own id, the layout
    assert st["node_id"] == "hA-w1" and st["host"] == "hA"
    assert st["workers"] == [sup.addr(0), sup.addr(1)]
    assert st["region"]["size"] <= 32 * 1024**2
    assert (sup.data_dir / "worker-1" / "flash").is_dir()
    before = sup.workers()
    assert set(before) == {0, 1}
    os.kill(before[1], signal.SIGKILL)
    with SyncClient.connect(f"memkv://{sup.addr(0)}/direct", transport="tcp", timeout=5.0) as other:
        other.put(b"during", b"the other worker serves", namespace="ctx")  # while worker 1 is down
        assert other.get(b"during", namespace="ctx") == b"the other worker serves"
    after = poll(lambda: (w := sup.workers()).get(1) not in (None, before[1]) and w, 30, "worker 1 restarted")
    assert after[0] == before[0]  # the other worker was left alone
    wait_for_port(sup.host, sup.ports[1], 30)
    with SyncClient.connect(f"memkv://{sup.addr(1)}/direct", transport="tcp", timeout=5.0) as c:
        assert c.get_many(list(values), namespace="ctx") == list(values.values())
    assert "worker 1 (hA-w1) exited with -9" in sup.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_every_worker_and_ends_the_supervisor(supervise: Any, signum: int) -> None:
    sup = supervise(workers=3)
    pids = sup.workers()
    assert len(pids) == 3
    assert sup.proc is not None
    sup.proc.send_signal(signum)
    assert sup.proc.wait(60) == 0
    assert not any(_alive(p) for p in pids.values())
    # each worker shut down on the forwarded signal (no restart, no SIGKILL)
    out = sup.output()
    assert out.count("signal received, shutting down") == 3 and "restart" not in out and "SIGKILL" not in out


def test_workers_die_with_a_killed_supervisor(supervise: Any) -> None:
    sup = supervise()
    pids = sup.workers()
    sup.kill()
    poll(lambda: not any(_alive(p) for p in pids.values()), 10, "workers gone with their supervisor")


@pytest.fixture(params=["tcp", "shm", "rdma"])
def transport(request: pytest.FixtureRequest) -> str:
    """rdma runs for real in the Soft-RoCE VM (``make test-rdma`` runs this file's rdma cases)."""
    if request.param == "rdma" and (why := rdma_skip_reason()):
        pytest.skip(why)
    return request.param


def _reads_served(addr: str) -> int:
    """GET-type requests a worker has served so far (asked directly over TCP)."""
    with SyncClient.connect(f"memkv://{addr}/direct", transport="tcp", timeout=30.0) as d:
        ops = d.stats()["server"]["ops"]
    return sum(ops.get(k, 0) for k in ("GET", "GET_MANY"))


def test_a_standalone_client_learns_the_workers_and_routes_each_key_to_its_slot(supervise: Any,
                                                                                 transport: str) -> None:
    """Given worker 1's address, the client learns all three from its HELLO; every operation goes
    to the worker that holds the key's slot (checked on each worker directly), batches are split
    per worker; over shared memory or RDMA every hit is a one-sided read of its worker's region:
    no worker serves a GET for it."""
    from memkv.client.core.routing import WorkersRouter

    sup = supervise(workers=3)
    keys = [f"key-{i}".encode() for i in range(300)]

    def val(k: bytes) -> bytes:
        return (k * 1000)[:8192]

    with SyncClient.connect(f"memkv://{sup.addr(1)}", transport=transport, timeout=30.0) as c:
        assert isinstance(c.router, WorkersRouter)
        assert [str(a) for a in c.router.all_nodes()] == [sup.addr(i) for i in range(3)]
        c.put_many({k: val(k) for k in keys[:200]})
        for k in keys[200:]:
            c.put(k, val(k))
        served = [_reads_served(sup.addr(i)) for i in range(3)]
        assert c.get_many(keys) == [val(k) for k in keys]
        assert all(c.get(k) == val(k) for k in keys[::10])
        bufs = [bytearray(8192) for _ in keys[:50]]
        assert c.get_many_into(keys[:50], bufs) == [len(val(k)) for k in keys[:50]]
        assert bytes(bufs[7][:len(val(keys[7]))]) == val(keys[7])
        owner = [c.router.worker_of(k) for k in keys]
        if transport != "tcp":
            # every worker's region read one-sided, through the transport asked for; no TCP read at all
            assert c.onesided is not None
            assert {c.onesided.transport_of(n) for n in c.router.all_nodes()} == {transport}
            n_reads = len(keys) + len(keys[::10]) + 50
            counters = c.onesided.counters
            assert counters["onesided"] == n_reads and counters["tcp"] == 0, counters
            assert counters["rdma_errors"] == counters["mismatch"] == counters["changed"] == 0, counters
            assert [_reads_served(sup.addr(i)) for i in range(3)] == served
            if transport == "rdma":  # each worker's own queue pair carried its keys
                assert all(c.onesided.nodes[n].transport.reads > 0 for n in c.router.all_nodes())
        assert c.delete(keys[0]) and c.get(keys[0]) is None
        assert c.exists_many(keys[:5]) == [False, True, True, True, True]
        assert c.lookup_prefix(keys[1:40], lease=5.0) == 39
    assert set(owner) == {0, 1, 2}
    for i in range(3):
        with SyncClient.connect(f"memkv://{sup.addr(i)}/direct", transport="tcp", timeout=30.0) as d:
            assert d.exists_many(keys[1:]) == [o == i for o in owner[1:]]


async def test_the_async_client_routes_to_the_workers_too(supervise: Any) -> None:
    import trio

    from memkv.client import Client
    from memkv.client.core.routing import WorkersRouter

    sup = await trio.to_thread.run_sync(lambda: supervise(workers=2))
    keys = [f"a{i}".encode() for i in range(100)]
    async with Client.connect(f"memkv://{sup.addr(0)}", transport="tcp", timeout=5.0) as c:
        assert isinstance(c.router, WorkersRouter)
        await c.put_many({k: k * 10 for k in keys})
        assert await c.get_many(keys) == [k * 10 for k in keys]
        assert len({c.router.worker_of(k) for k in keys}) == 2


def test_a_split_batch_is_sent_to_every_worker_from_the_callers_thread(supervise: Any) -> None:
    """``SyncClient``'s batch split across workers goes out on the caller's thread (no thread is
    started: client/executors/blocking_executor.py ``FanOut``); two hung workers (SIGSTOP) cost it
    one timeout together, not one each; once they resume, the connections whose calls timed out
    were dropped, so no late reply is taken for a new call's."""
    import threading
    import time

    from memkv.errors import TimeoutError as MemKVTimeout

    sup = supervise(workers=3)
    keys = [f"f{i}".encode() for i in range(60)]
    timeout = 2.0
    with SyncClient.connect(f"memkv://{sup.addr(0)}", transport="tcp", timeout=timeout) as c:
        threads = threading.active_count()
        c.put_many({k: k * 100 for k in keys})
        assert c.get_many(keys) == [k * 100 for k in keys]
        assert {c.router.worker_of(k) for k in keys} == {0, 1, 2}
        assert threading.active_count() == threads
        pids = sup.workers()
        for i in (1, 2):
            os.kill(pids[i], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(MemKVTimeout):
                c.get_many(keys)
            took = time.monotonic() - t0
        finally:
            for i in (1, 2):
                os.kill(pids[i], signal.SIGCONT)
        assert timeout <= took < 2 * timeout, took
        fresh = [b"g" + k for k in keys]
        c.put_many({k: k * 7 for k in fresh})
        assert c.get_many(keys + fresh) == [k * 100 for k in keys] + [k * 7 for k in fresh]


def test_status_shows_every_worker_by_host(supervise: Any, capsys: Any) -> None:
    import json

    from memkv.cli import main as cli_main

    sup = supervise("--host-id", "hS", workers=2)
    with SyncClient.connect(f"memkv://{sup.addr(0)}", transport="tcp") as c:
        c.put_many({f"s{i}".encode(): b"x" for i in range(50)})
    os.kill(sup.workers()[1], signal.SIGSTOP)  # one that does not answer is shown as such
    try:
        assert cli_main(["status", f"memkv://{sup.addr(0)}", "--json"]) == 0
    finally:
        os.kill(sup.workers()[1], signal.SIGCONT)
    st = json.loads(capsys.readouterr().out)["workers"]
    assert list(st) == [sup.addr(0), sup.addr(1)]
    assert st[sup.addr(0)]["host"] == "hS" and st[sup.addr(0)]["node_id"] == "hS-w0"
    assert isinstance(st[sup.addr(1)], str) and st[sup.addr(1)].startswith("unreachable")
    assert cli_main(["status", f"memkv://{sup.addr(1)}"]) == 0
    out = capsys.readouterr().out
    assert "hS-w0" in out and "hS-w1" in out


@pytest.mark.parametrize("how", ["flag", "config"])
def test_each_worker_gets_the_region_it_is_configured_with(supervise: Any, how: str) -> None:
    """``--worker-memory 8MiB,24MiB`` (one per worker) or ``[node] worker_memory = "12MiB"`` (each)
    instead of ``--memory`` split evenly; the region a worker reports is the size it was given."""
    if how == "flag":
        sup, want = supervise("--memory", "1GiB", "--worker-memory", "8MiB,24MiB"), [8, 24]
    else:
        sup, want = supervise(config='[node]\nmemory = "1GiB"\nworker_memory = "12MiB"\n'), [12, 12]
    for i, mib in enumerate(want):
        with SyncClient.connect(f"memkv://{sup.addr(i)}/direct", transport="tcp", timeout=5.0) as d:
            assert d.stats()["region"]["size"] == mib * 1024**2, (i, mib)


def test_with_one_worker_nothing_changes(start_node: Any) -> None:
    from memkv.client.core.routing import StandaloneRouter

    node = start_node("--workers", "1")
    with SyncClient.connect(node.url, transport="tcp") as c:
        assert isinstance(c.router, StandaloneRouter)
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v" and "workers" not in c.stats()


def test_bad_worker_settings_are_refused(start_node: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    for args, why in ((["--workers", "0"], "at least 1"), (["--workers", "many"], "number or 'auto'"),
                      (["--workers", "2", "--listen", "127.0.0.1:0"], "--worker-ports"),
                      (["--workers", "2", "--worker-ports", "7001"], "2 distinct ports"),
                      (["--workers", "2", "--worker-ports", "7001,x"], "comma-separated port numbers"),
                      (["--workers", "2", "--worker-memory", "8MiB,8MiB,8MiB"], "one size or 2 (one per worker)"),
                      (["--workers", "2", "--worker-memory", "8MiB,512KiB"], "under 1 MiB for a worker"),
                      (["--workers", "2", "--worker-memory", "lots"], "bad size")):
        r = subprocess.run([sys.executable, "-m", "memkv.cli", "serve", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)


# -- a cluster of 2 hosts x 2 workers ------------------------------------------------------------


def test_two_hosts_of_two_workers_keep_replicas_apart_and_survive_losing_a_host(etcd_server: Any,
                                                                                 supervise: Any) -> None:
    name = f"w{uuid.uuid4().hex[:8]}"
    config = DURABLE + "[cluster]\nreplicas = 2\nlease_ttl = 2\n"
    cluster = ["--etcd", etcd_server.endpoint, "--cluster", name]
    hosts = {h: supervise(*cluster, "--host-id", h, config=config) for h in ("hA", "hB")}
    url = f"etcd://{etcd_server.endpoint}/{name}"
    ids = {f"{h}-w{i}" for h in hosts for i in range(2)}

    def state() -> Any:
        from memkv.client.cluster_view import ClusterView
        from memkv.client.etcd import Etcd

        etcd = Etcd(etcd_server.endpoint, timeout=2.0)
        try:
            return ClusterView(etcd, name).load()
        finally:
            etcd.close()

    st = poll(lambda: (s := state()).slotmap is not None and set(s.slotmap.members) == ids and s, 90,
              "4 workers in the slot map")
    assert {n: info.host for n, info in st.nodes.items()} == {n: n.split("-")[0] for n in ids}
    host = {n: n.split("-")[0] for n in ids}
    assert all(len(row) == 2 and host[row[0]] != host[row[1]] for row in st.slotmap.table)

    from memkv.cluster.status import cluster_status

    rows = cluster_status(url)["nodes"]  # memkv status: grouped by host
    assert [(r["host"], r["node_id"]) for r in rows] == [("hA", "hA-w0"), ("hA", "hA-w1"), ("hB", "hB-w0"),
                                                         ("hB", "hB-w1")]
    keys = [f"durable-{i}".encode() for i in range(300)]
    with SyncClient.connect(url, transport="tcp", timeout=5.0) as c:
        for k in keys[:100]:
            c.put(k, b"v" + k, namespace="ctx")
        c.put_many({k: b"v" + k for k in keys[100:]}, namespace="ctx")
        # each value on its two owners, one per host (asked directly, worker by worker)
        sm = c.router.state.slotmap
        for h, sup in hosts.items():
            for i in range(2):
                with SyncClient.connect(f"memkv://{sup.addr(i)}/direct", transport="tcp", timeout=5.0) as d:
                    there = d.exists_many(keys, namespace="ctx")
                assert there == [f"{h}-w{i}" in sm.table[key_slot(k, sm.slots)] for k in keys]
        hosts["hA"].kill()  # the host dies: its supervisor, and with it both workers, SIGKILL
        assert c.get_many(keys, namespace="ctx") == [b"v" + k for k in keys]
        poll(lambda: set(state().slotmap.members) == {"hB-w0", "hB-w1"}, 60, "hA's workers leave the map")
        poll(lambda: c.router.state.slotmap is not None and set(c.router.state.slotmap.members) ==
             {"hB-w0", "hB-w1"}, 30, "the client sees the new map")
        # (a durable write needs every owner with a live lease, acks = "all": hA's until they expired)
        c.put(b"after", b"x", namespace="ctx")
        assert c.get_many(keys, namespace="ctx") == [b"v" + k for k in keys]
        assert c.get(b"after", namespace="ctx") == b"x"


def test_drain_of_a_host_moves_every_slot_off_its_workers(etcd_server: Any, supervise: Any, capsys: Any) -> None:
    from memkv.cli import main as cli_main

    name = f"d{uuid.uuid4().hex[:8]}"
    config = "[cluster]\nreplicas = 1\nlease_ttl = 5\n"
    cluster = ["--etcd", etcd_server.endpoint, "--cluster", name]
    a = supervise(*cluster, "--host-id", "hA", config=config)
    supervise(*cluster, "--host-id", "hB", config=config)
    url = f"etcd://{etcd_server.endpoint}/{name}"
    with SyncClient.connect(url, transport="tcp", timeout=5.0) as c:
        poll(lambda: c.router.state.slotmap is not None and len(c.router.state.slotmap.members) == 4, 90,
             "4 workers in the slot map")
        keys = [f"k{i}".encode() for i in range(200)]
        c.put_many({k: k for k in keys})
        assert cli_main(["drain", url, "--host", "hA", "--timeout", "150", "--quiet"]) == 0
        out = capsys.readouterr().out
        assert "hA-w0 drained" in out and "hA-w1 drained" in out
        poll(lambda: not any(n.startswith("hA") for row in c.router.state.slotmap.table for n in row), 30,
             "the client sees the map without hA")
        a.kill()  # nothing is lost: hA owns no slot and has handed its values over
        assert c.get_many(keys) == keys
