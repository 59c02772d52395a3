"""Where the faults go: :class:`LocalTarget` (etcd + node processes on loopback, started
here) and :class:`ComposeTarget` (the compose/ deployment, driven with ``docker``).

Both offer the same fault primitives: ``kill`` (SIGKILL / ``docker kill -s KILL``),
``start``, ``stop`` (graceful), ``pause``/``resume`` (SIGSTOP/SIGCONT / ``docker pause``),
``partition_etcd``/``heal_etcd`` and ``partition_clients``/``heal_clients``,
``etcd_down``/``etcd_up``, ``corrupt_segment``, ``add_node``.

Partitions, local target: the whole run executes in a private network namespace made
for it (``python -m chaos`` re-executes itself under ``unshare -n``; only ``lo`` exists
there). etcd listens on one extra loopback port per node and each node talks to etcd
only through its own port, so ``iptables -j DROP`` on that port (both directions) cuts
exactly that node from etcd; dropping the node's own listen port cuts it from every
client while it keeps its etcd lease. No rule ever touches the host's network.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.load import NODE_CONFIG
from memkv.client.cluster_view import ClusterState, ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.cluster.local import EtcdProcess


class Unsupported(Exception):
    """This target cannot inject that fault (the scenario is skipped with the reason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(st: ClusterState | None) -> str:
    """A one-line summary of a cluster state (for error messages)."""
    if st is None:
        return "no state (etcd unreachable?)"
    sm = st.slotmap
    if sm is None:
        return f"nodes {sorted(st.nodes)}, no slot map"
    short = sum(len(r) < sm.replicas for r in sm.table)
    return (f"nodes {sorted(st.nodes)}, epoch {sm.epoch}, members {sorted(sm.members)}, "
            f"{short} slot(s) under R={sm.replicas}, {len(getattr(sm, 'pending', {}) or {})} pending, "
            f"leader {st.leader}")


def in_private_netns() -> bool:
    return os.environ.get("MEMKV_CHAOS_NETNS") == "1"


def corrupt_file(path: Path, flips: int, rnd: random.Random, skip: int = 4096) -> list[int]:
    """Flip one byte at ``flips`` random offsets past ``skip``; returns the offsets."""
    size = path.stat().st_size
    if size <= skip + 1:
        return []
    offsets = sorted(rnd.randrange(skip, size) for _ in range(flips))
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    return offsets


class MultiPortEtcd(EtcdProcess):
    """etcd listening on its main client port plus one extra port per node."""

    def __init__(self, *args: Any, extra_ports: list[int], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.extra_ports = extra_ports

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--listen-client-urls")
        urls = [f"http://127.0.0.1:{p}" for p in [self.client_port, *self.extra_ports]]
        cmd[i + 1] = ",".join(urls)
        return cmd


@dataclass
class LocalNode:
    node_id: str
    zone: str
    port: int
    etcd_port: int
    workdir: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / "node.log").read_text(errors="replace")
        return ""


class LocalTarget:
    name = "local"

    def __init__(self, workdir: Path, *, nodes: int = 3, replicas: int = 2, lease_ttl: int = 2, zones: int = 1,
                 memory: str = "64MiB", node_args: dict[str, list[str]] | None = None, spare: int = 2) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster = "chaos"
        self.replicas = replicas
        self.lease_ttl = lease_ttl
        self.memory = memory
        self.zones = zones
        self.node_args = node_args or {}
        self.config_path = self.workdir / "memkv.toml"
        self.config_path.write_text(NODE_CONFIG.format(replicas=replicas, lease_ttl=lease_ttl))
        self._etcd_ports = [free_port() for _ in range(nodes + spare)]
        self.etcd = MultiPortEtcd(self.workdir / "etcd" / "data", extra_ports=self._etcd_ports,
                                  log_path=self.workdir / "etcd.log")
        self.nodes: dict[str, LocalNode] = {}
        self._rules: list[list[str]] = []
        self.initial = [f"n{i + 1}" for i in range(nodes)]

    # -- set-up / tear-down
    @property
    def url(self) -> str:
        return f"etcd://{self.etcd.endpoint}/{self.cluster}"

    @property
    def can_partition(self) -> bool:
        return in_private_netns() and shutil.which("iptables") is not None

    def up(self, timeout: float = 60.0) -> None:
        self.etcd.start()
        for nid in self.initial:
            self.add_node(nid, wait=False)
        self.wait(lambda st: set(st.nodes) == set(self.initial) and st.slotmap is not None
                  and set(st.slotmap.members) == set(self.initial) and not st.slotmap.pending
                  and all(len(r) == min(self.replicas, len(self.initial)) for r in st.slotmap.table),
                  timeout, "cluster formed")

    def close(self) -> None:
        for rule in reversed(self._rules):
            self._iptables("-D", rule, check=False)
        self._rules.clear()
        for n in self.nodes.values():
            if n.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                n.proc.kill()  # type: ignore[union-attr]
                n.proc.wait()  # type: ignore[union-attr]
        self.etcd.kill()

    # -- nodes
    def add_node(self, node_id: str, *, zone: str | None = None, wait: bool = True,
                 extra: list[str] | None = None) -> LocalNode:
        i = len(self.nodes)
        if i >= len(self._etcd_ports):
            raise Unsupported("no spare etcd port for another node")
        node = LocalNode(node_id, zone or f"z{i % max(1, self.zones)}", free_port(), self._etcd_ports[i],
                         self.workdir / node_id, list(extra if extra is not None else self.node_args.get(node_id, [])))
        self.nodes[node_id] = node
        self.start(node_id)
        if wait:
            self.wait(lambda st: node_id in st.nodes, 30, f"{node_id} registered")
        return node

    def command(self, n: LocalNode) -> list[str]:
        return [sys.executable, "-m", "memkv.cli", "serve", "--listen", f"127.0.0.1:{n.port}",
                "--memory", self.memory, "--data-dir", str(n.data_dir), "--config", str(self.config_path),
                "--etcd", f"127.0.0.1:{n.etcd_port}", "--cluster", self.cluster, "--node-id", n.node_id,
                "--zone", n.zone, *n.extra]

    def start(self, node_id: str, *, extra: list[str] | None = None, timeout: float = 20.0) -> None:
        n = self.nodes[node_id]
        assert not n.running, f"{node_id} already running"
        if extra is not None:
            n.extra = list(extra)
        n.data_dir.mkdir(parents=True, exist_ok=True)
        with open(n.workdir / "node.log", "ab") as log:
            n.proc = subprocess.Popen(self.command(n), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        n.paused = False
        deadline = time.monotonic() + timeout
        while True:
            if not n.running:
                raise RuntimeError(f"{node_id} exited at start:\n{n.output()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", n.port), timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node_id} did not listen within {timeout}s")
            time.sleep(0.05)

    def kill(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if n.running:
            n.proc.kill()  # type: ignore[union-attr]
            n.proc.wait()  # type: ignore[union-attr]

    def stop(self, node_id: str, timeout: float = 15.0) -> None:
        n = self.nodes[node_id]
        if n.running:
            n.proc.terminate()  # type: ignore[union-attr]
            try:
                n.proc.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                n.proc.kill()  # type: ignore[union-attr]
                n.proc.wait()  # type: ignore[union-attr]

    def pause(self, node_id: str) -> None:
        n = self.nodes[node_id]
        os.kill(n.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        n.paused = True

    def resume(self, node_id: str) -> None:
        n = self.nodes[node_id]
        os.kill(n.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        n.paused = False

    def alive(self) -> set[str]:
        return {i for i, n in self.nodes.items() if n.running and not n.paused}

    def address(self, node_id: str) -> tuple[str, int]:
        return "127.0.0.1", self.nodes[node_id].port

    # -- partitions (private netns only)
    def _iptables(self, action: str, rule: list[str], check: bool = True) -> None:
        r = subprocess.run(["iptables", action, *rule], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"iptables {action} {' '.join(rule)}: {r.stderr.strip()}")

    def _drop_port(self, port: int) -> list[list[str]]:
        if not self.can_partition:
            raise Unsupported("partitions need the private network namespace (run through `python -m chaos`, "
                              "as root, with unshare and iptables)")
        rules = [["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
                 ["OUTPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]
        for r in rules:
            self._iptables("-I", r)
            self._rules.append(r)
        return rules

    def _undrop(self, rules: list[list[str]]) -> None:
        for r in rules:
            self._iptables("-D", r, check=False)
            with contextlib.suppress(ValueError):
                self._rules.remove(r)

    def partition_etcd(self, node_id: str) -> Any:
        return self._drop_port(self.nodes[node_id].etcd_port)

    def partition_clients(self, node_id: str) -> Any:
        return self._drop_port(self.nodes[node_id].port)

    def heal(self, handle: Any) -> None:
        self._undrop(handle)

    # -- etcd
    def etcd_down(self) -> None:
        self.etcd.stop()

    def etcd_up(self) -> None:
        self.etcd.start()

    # -- disk
    def segment_files(self, node_id: str) -> list[Path]:
        return sorted((self.nodes[node_id].data_dir / "flash").glob("seg-*.log"))

    def corrupt_segment(self, node_id: str, flips: int, rnd: random.Random) -> str:
        segs = [p for p in self.segment_files(node_id) if p.stat().st_size > 8192]
        if not segs:
            raise Unsupported(f"{node_id} has no segment file with data")
        seg = segs[-1]
        offs = corrupt_file(seg, flips, rnd)
        return f"{seg.name}: {len(offs)} byte(s) flipped"

    def disk_args(self, disk: str, segment: str) -> list[str]:
        return ["--disk", disk, "--segment-size", segment]

    def node_logs(self) -> dict[str, str]:
        return {i: n.output()[-4000:] for i, n in self.nodes.items()}

    # -- cluster state
    def state(self) -> ClusterState:
        etcd = Etcd(self.etcd.endpoint, timeout=2.0)
        try:
            return ClusterView(etcd, self.cluster).load()
        finally:
            etcd.close()

    def etcd_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        etcd = Etcd(self.etcd.endpoint, timeout=2.0)
        try:
            kvs, _ = etcd.get_prefix(prefix)
            return [(kv.key.decode() if isinstance(kv.key, bytes) else kv.key, kv.value) for kv in kvs]
        finally:
            etcd.close()

    def wait(self, pred: Any, timeout: float, what: str) -> ClusterState:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            with contextlib.suppress(EtcdUnavailable):
                last = self.state()
                if pred(last):
                    return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout}s (last: {describe(last)})")
            time.sleep(0.1)

    def memkv_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memkv.cli", *args], capture_output=True, text=True,
                              timeout=timeout)


class ComposeTarget(LocalTarget):
    """The compose/ deployment (container names from compose/docker-compose.yml).

    The deployment must be up (``make compose-up``) with MEMKV_RESTART_POLICY=no so that
    a killed container stays down until the runner starts it. Clients run on the
    docker host and reach the nodes at their advertised bridge addresses.
    """

    name = "compose"

    def __init__(self, workdir: Path, *, project_dir: Path = Path("compose"), **kw: Any) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.project_dir = project_dir
        self.cluster = os.environ.get("MEMKV_CLUSTER_NAME", "memkv")
        self.etcd_endpoint = f"127.0.0.1:{os.environ.get('MEMKV_ETCD_HOST_PORT', '2379')}"
        self.replicas = int(kw.get("replicas", 2))
        self.lease_ttl = int(kw.get("lease_ttl", 5))
        self.initial = ["n1", "n2", "n3"]
        self.nodes = {}  # type: ignore[assignment]
        self._paused: set[str] = set()
        self._rules = []

    @staticmethod
    def container(node_id: str) -> str:
        return "memkv-etcd" if node_id == "etcd" else f"memkv-{node_id}"

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    @property
    def url(self) -> str:
        return f"etcd://{self.etcd_endpoint}/{self.cluster}"

    @property
    def can_partition(self) -> bool:
        return shutil.which("nsenter") is not None

    def up(self, timeout: float = 120.0) -> None:
        if shutil.which("docker") is None:
            raise Unsupported("no docker client")
        for nid in self.initial:
            if self.docker("inspect", "-f", "{{.State.Running}}", self.container(nid), check=False).strip() != "true":
                self.docker("start", self.container(nid))
        self.wait(lambda st: set(self.initial) <= set(st.nodes) and st.slotmap is not None
                  and set(self.initial) <= set(st.slotmap.members), timeout, "compose cluster healthy")

    def close(self) -> None:
        for rule in reversed(self._rules):
            self._nsenter(rule[0], ["iptables", "-D", *rule[1]], check=False)
        self._rules.clear()
        for nid in list(self._paused):
            self.docker("unpause", self.container(nid), check=False)

    def add_node(self, node_id: str, *, zone: str | None = None, wait: bool = True,
                 extra: list[str] | None = None) -> Any:
        if node_id != "n4":
            raise Unsupported("compose has one extra node (n4, profile join)")
        subprocess.run(["docker", "compose", "-f", str(self.project_dir / "docker-compose.yml"), "--profile", "join",
                        "up", "-d", "n4"], check=True, capture_output=True, timeout=300)
        if wait:
            self.wait(lambda st: node_id in st.nodes, 60, f"{node_id} registered")
        return node_id

    def start(self, node_id: str, *, extra: list[str] | None = None, timeout: float = 60.0) -> None:
        if extra:
            raise Unsupported("compose nodes take their flags from the environment")
        self.docker("start", self.container(node_id))
        self._paused.discard(node_id)

    def kill(self, node_id: str) -> None:
        self.docker("kill", "-s", "KILL", self.container(node_id), check=False)

    def stop(self, node_id: str, timeout: float = 15.0) -> None:
        self.docker("stop", "-t", str(int(timeout)), self.container(node_id))

    def pause(self, node_id: str) -> None:
        self.docker("pause", self.container(node_id))
        self._paused.add(node_id)

    def resume(self, node_id: str) -> None:
        self.docker("unpause", self.container(node_id))
        self._paused.discard(node_id)

    def running(self, node_id: str) -> bool:
        return self.docker("inspect", "-f", "{{.State.Running}}", self.container(node_id),
                           check=False).strip() == "true"

    def alive(self) -> set[str]:
        ids = set(self.initial) | ({"n4"} if self.docker("inspect", self.container("n4"), check=False) else set())
        return {i for i in ids if i not in self._paused and self.running(i)}

    def address(self, node_id: str) -> tuple[str, int]:
        st = self.state()
        host, _, port = st.nodes[node_id].addr.rpartition(":")
        return host.strip("[]"), int(port)

    def _pid(self, node_id: str) -> str:
        return self.docker("inspect", "-f", "{{.State.Pid}}", self.container(node_id)).strip()

    def _nsenter(self, node_id: str, cmd: list[str], check: bool = True) -> None:
        r = subprocess.run(["nsenter", "-n", "-t", self._pid(node_id), *cmd], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"nsenter {node_id} {' '.join(cmd)}: {r.stderr.strip()}")

    def _drop_in(self, node_id: str, rules: list[list[str]]) -> Any:
        handle = []
        for r in rules:
            self._nsenter(node_id, ["iptables", "-I", *r])
            handle.append((node_id, r))
            self._rules.append((node_id, r))
        return handle

    def partition_etcd(self, node_id: str) -> Any:
        return self._drop_in(node_id, [["OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "DROP"],
                                       ["INPUT", "-p", "tcp", "--sport", "2379", "-j", "DROP"]])

    def partition_clients(self, node_id: str) -> Any:
        return self._drop_in(node_id, [["INPUT", "-p", "tcp", "--dport", "7400", "-j", "DROP"],
                                       ["OUTPUT", "-p", "tcp", "--sport", "7400", "-j", "DROP"]])

    def network_disconnect(self, node_id: str) -> Any:
        self.docker("network", "disconnect", "memkv-net", self.container(node_id))
        return ("net", node_id)

    def heal(self, handle: Any) -> None:
        if isinstance(handle, tuple) and handle[0] == "net":
            self.docker("network", "connect", "--alias", handle[1], "memkv-net", self.container(handle[1]))
            return
        for node_id, r in handle:
            self._nsenter(node_id, ["iptables", "-D", *r], check=False)
            with contextlib.suppress(ValueError):
                self._rules.remove((node_id, r))

    def etcd_down(self) -> None:
        self.docker("stop", "memkv-etcd")

    def etcd_up(self) -> None:
        self.docker("start", "memkv-etcd")
        self.wait(lambda st: True, 60, "etcd back")

    def corrupt_segment(self, node_id: str, flips: int, rnd: random.Random) -> str:
        c = self.container(node_id)
        names = self.docker("run", "--rm", "--volumes-from", c, "--entrypoint", "sh", "memkv:latest", "-c",
                            "ls /data/flash/ 2>/dev/null | grep '^seg-' || true").split()
        if not names:
            raise Unsupported(f"{node_id} has no segment file")
        local = self.workdir / names[-1]
        self.docker("cp", f"{c}:/data/flash/{names[-1]}", str(local))
        offs = corrupt_file(local, flips, rnd)
        self.docker("cp", str(local), f"{c}:/data/flash/{names[-1]}")
        return f"{names[-1]}: {len(offs)} byte(s) flipped"

    def disk_args(self, disk: str, segment: str) -> list[str]:
        raise Unsupported("compose nodes have a fixed --disk budget (MEMKV_DISK); run disk_full with --target local")

    def node_logs(self) -> dict[str, str]:
        return {i: self.docker("logs", "--tail", "60", self.container(i), check=False) for i in self.initial}

    def state(self) -> ClusterState:
        etcd = Etcd(self.etcd_endpoint, timeout=2.0)
        try:
            return ClusterView(etcd, self.cluster).load()
        finally:
            etcd.close()

    def etcd_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        etcd = Etcd(self.etcd_endpoint, timeout=2.0)
        try:
            kvs, _ = etcd.get_prefix(prefix)
            return [(kv.key.decode() if isinstance(kv.key, bytes) else kv.key, kv.value) for kv in kvs]
        finally:
            etcd.close()
