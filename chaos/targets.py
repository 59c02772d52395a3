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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import faultshim
from chaos.cgroups import ProcessGroups
from chaos.load import NODE_CONFIG
from chaos.netfault import ETCD, NetFaults, NetUnavailable
from memkv.client.cluster_view import ClusterState, ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.tools.children import popen_tied
from memkv.tools.localproc import EtcdProcess, free_port, stop_process


class Unsupported(Exception):
    """This target cannot inject that fault (the scenario is skipped with the reason)."""


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


class EtcdMember(EtcdProcess):
    """One member of the run's etcd cluster (1 or 3 members), listening on its main client port
    plus one extra port per node (each node talks to etcd only through its own ports, so a
    partition can cut exactly one node from etcd), started inside its cgroup when there is one."""

    def __init__(self, data_dir: Path, *, name: str, extra_ports: list[int], wrap: Any = None, **kw: Any) -> None:
        super().__init__(data_dir, **kw)
        self.name = name
        self.extra_ports = extra_ports
        self.initial_cluster = f"{name}=http://127.0.0.1:{self.peer_port}"
        self.wrap = wrap

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--listen-client-urls")
        cmd[i + 1] = ",".join(f"http://127.0.0.1:{p}" for p in [self.client_port, *self.extra_ports])
        cmd[cmd.index("--name") + 1] = self.name
        cmd[cmd.index("--initial-cluster") + 1] = self.initial_cluster
        return self.wrap(cmd) if self.wrap is not None else cmd


def etcd_leader(endpoints: list[str]) -> str | None:
    """The name of the etcd member that is the raft leader, asking the members at ``endpoints``
    (HOST:PORT) in turn; None if none answers. (etcd's maintenance Status call: the memkv etcd
    adapter has no use for it, so pyetcd direct.)"""
    import pyetcd

    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        c = pyetcd.client(host=host, port=int(port), timeout=2)
        try:
            leader = c.status().leader
            return None if leader is None else str(leader.name)
        except Exception:  # noqa: BLE001 - that member is down: ask the next one
            continue
        finally:
            with contextlib.suppress(Exception):
                c.close()
    return None


@dataclass
class LocalNode:
    node_id: str
    zone: str
    port: int
    etcd_ports: list[int]
    workdir: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    faults: faultshim.FaultFile | None = None

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
    """etcd (1 or 3 members) + node processes on loopback, started here.

    Besides the primitives every target has, the local target can (when it runs as root in its
    private network namespace, with cgroups and a C compiler): impair links between processes
    (``net_impair``: :mod:`chaos.netfault`), skew a node's wall clock and slow its fsyncs
    (``clock_skew`` / ``slow_fsync``: the fault shim, :mod:`chaos.faultshim`, preloaded into
    every node), limit a node's memory and press on it (``memory_limit`` / ``memory_hog``:
    :mod:`chaos.cgroups`), and kill single etcd members (``etcd_member_kill``).
    """

    name = "local"

    def __init__(self, workdir: Path, *, nodes: int = 3, replicas: int = 2, lease_ttl: int = 2, zones: int = 1,
                 memory: str = "64MiB", node_args: dict[str, list[str]] | None = None, spare: int = 2,
                 etcd_members: int = 1, seed: int = 0, anti_entropy_interval: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A name of its own per run: a node left over from an earlier run (its runner was killed) keeps
        # retrying its etcd address, and a later run's etcd may get that port: with a shared name it
        # would join the new cluster (and, holding another secret, fail every migration to it).
        self.cluster = f"chaos-{secrets.token_hex(3)}"
        self.replicas = replicas
        self.lease_ttl = lease_ttl
        self.memory = memory
        self.zones = zones
        self.seed = seed
        self.node_args = node_args or {}
        self.config_path = self.workdir / "memkv.toml"
        self.config_path.write_text(NODE_CONFIG.format(replicas=replicas, lease_ttl=lease_ttl,
                                                       anti_entropy_interval=anti_entropy_interval))
        self.groups = ProcessGroups(self.cluster.removeprefix("chaos-"))
        # per member: its main client port, then one extra port per node slot
        self._node_slots = nodes + spare
        self.etcd_members: list[EtcdMember] = []
        for m in range(etcd_members):
            extra = [free_port() for _ in range(self._node_slots)]
            self.etcd_members.append(EtcdMember(self.workdir / "etcd" / f"e{m}", name=f"e{m}", extra_ports=extra,
                                                log_path=self.workdir / f"etcd-e{m}.log",
                                                wrap=lambda cmd: self.groups.wrap(ETCD, cmd)))
        initial = ",".join(m.initial_cluster for m in self.etcd_members)
        for m in self.etcd_members:
            m.initial_cluster = initial
        self.nodes: dict[str, LocalNode] = {}
        self._rules: list[list[str]] = []
        self.initial = [f"n{i + 1}" for i in range(nodes)]
        self.net: NetFaults | None = None
        self.net_unavailable = ""
        self.shim: Path | None = None
        self.shim_unavailable = ""
        self.hogs: list[subprocess.Popen[bytes]] = []

    @property
    def etcd(self) -> EtcdMember:
        """The first etcd member (the one the runner's own etcd client prefers)."""
        return self.etcd_members[0]

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.etcd_members)

    # -- set-up / tear-down
    @property
    def url(self) -> str:
        return f"etcd://{self.etcd_endpoints}/{self.cluster}"

    @property
    def can_partition(self) -> bool:
        return in_private_netns() and shutil.which("iptables") is not None

    def unsupported(self, need: str) -> str | None:
        """Why this target cannot inject faults of kind ``need`` here (None: it can), known before
        the cluster is brought up."""
        if need in ("partition", "net") and not self.can_partition:
            return ("partitions and network faults need `python -m chaos` as root in its private network "
                    "namespace, with iptables (apt-get install iptables)")
        if need == "net":
            from chaos import cgroups

            if cgroups.unified() is None:
                return "network faults need a writable cgroup v2 hierarchy (to tell the processes' packets apart)"
        if need == "shim" and shutil.which("cc") is None and shutil.which("gcc") is None:
            return "clock and fsync faults need a C compiler for the fault shim (apt-get install build-essential)"
        if need == "memory":
            from chaos import cgroups

            if cgroups.memory() is None:
                return "memory faults need a writable memory cgroup (v2 memory controller or the v1 hierarchy)"
        return None

    def _start_faults(self) -> None:
        """The fault machinery that must exist before the first process: the shim (built here),
        the process groups and the network classification. What cannot work here is recorded
        (``*_unavailable``) and raised as Unsupported by the scenarios that need it."""
        try:
            self.shim = faultshim.build(self.workdir / "shim")
        except faultshim.ShimUnavailable as exc:
            self.shim_unavailable = str(exc)
        if not self.can_partition:
            self.net_unavailable = ("network faults need `python -m chaos` as root in its private network "
                                    "namespace, with iptables")
            return
        net = NetFaults(self.groups, seed=self.seed, log_path=self.workdir / "nfqueue.log")
        net.member(ETCD, [p for m in self.etcd_members for p in [m.client_port, m.peer_port, *m.extra_ports]])
        try:
            net.start()
            self.net = net
        except NetUnavailable as exc:
            net.close()
            self.net_unavailable = str(exc)

    def up(self, timeout: float = 60.0) -> None:
        self._start_faults()
        self.etcd_start_all()
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
        for h in self.hogs:
            with contextlib.suppress(OSError):
                h.kill()
                h.wait()
        for n in self.nodes.values():
            if n.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                n.proc.kill()  # type: ignore[union-attr]
                n.proc.wait()  # type: ignore[union-attr]
        for m in self.etcd_members:
            m.kill()
        if self.net is not None:
            self.net_stats = self.net.close()
        self.groups.close()

    # -- nodes
    def add_node(self, node_id: str, *, zone: str | None = None, wait: bool = True,
                 extra: list[str] | None = None) -> LocalNode:
        i = len(self.nodes)
        if i >= self._node_slots:
            raise Unsupported("no spare etcd port for another node")
        node = LocalNode(node_id, zone or f"z{i % max(1, self.zones)}", free_port(),
                         [m.extra_ports[i] for m in self.etcd_members], self.workdir / node_id,
                         list(extra if extra is not None else self.node_args.get(node_id, [])))
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.faults = faultshim.FaultFile(node.workdir / "faults")
        self.nodes[node_id] = node
        if self.net is not None:
            self.net.member(node_id, [node.port])
        self.start(node_id)
        if wait:
            self.wait(lambda st: node_id in st.nodes, 30, f"{node_id} registered")
        return node

    def command(self, n: LocalNode) -> list[str]:
        etcd = ",".join(f"127.0.0.1:{p}" for p in n.etcd_ports)
        cmd = [sys.executable, "-m", "memkv.cli", "serve", "--listen", f"127.0.0.1:{n.port}",
               "--memory", self.memory, "--data-dir", str(n.data_dir), "--config", str(self.config_path),
               "--etcd", etcd, "--cluster", self.cluster, "--node-id", n.node_id,
               "--zone", n.zone, *n.extra]
        return self.groups.wrap(n.node_id, cmd)

    def node_env(self, n: LocalNode) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.shim is not None and n.faults is not None:
            env.update(faultshim.env(self.shim, n.faults.path))
        return env

    def start(self, node_id: str, *, extra: list[str] | None = None, timeout: float = 20.0) -> None:
        n = self.nodes[node_id]
        assert not n.running, f"{node_id} already running"
        if extra is not None:
            n.extra = list(extra)
        n.data_dir.mkdir(parents=True, exist_ok=True)
        with open(n.workdir / "node.log", "ab") as log:
            n.proc = popen_tied(self.command(n), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=self.node_env(n), start_new_session=True)
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
            stop_process(n.proc, timeout)  # type: ignore[arg-type]

    def pause(self, node_id: str) -> None:
        n = self.nodes[node_id]
        os.kill(n.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        n.paused = True

    def resume(self, node_id: str) -> None:
        n = self.nodes[node_id]
        os.kill(n.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        n.paused = False

    def running(self, node_id: str) -> bool:
        return self.nodes[node_id].running

    def alive(self) -> set[str]:
        return {i for i, n in self.nodes.items() if n.running and not n.paused}

    def address(self, node_id: str) -> tuple[str, int]:
        return "127.0.0.1", self.nodes[node_id].port

    # -- partitions (private netns only)
    def _iptables(self, action: str, rule: list[str], check: bool = True) -> None:
        r = subprocess.run(["iptables", "-w", action, *rule], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"iptables {action} {' '.join(rule)}: {r.stderr.strip()}")

    def _drop_ports(self, ports: list[int]) -> list[list[str]]:
        if not self.can_partition:
            raise Unsupported("partitions need the private network namespace (run through `python -m chaos`, "
                              "as root, with unshare and iptables)")
        rules = []
        for port in ports:
            rules += [["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
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
        return self._drop_ports(self.nodes[node_id].etcd_ports)

    def partition_clients(self, node_id: str) -> Any:
        return self._drop_ports([self.nodes[node_id].port])

    def heal(self, handle: Any) -> None:
        self._undrop(handle)

    def heal_all_links(self) -> None:
        """Every partition and every impaired link healed."""
        self._undrop(list(self._rules))
        if self.net is not None:
            for f in list(self.net.faults.values()):
                self.net.heal(f)

    # -- network quality (delay, jitter, loss, reordering)
    def net_impair(self, pairs: list[tuple[str, str]], **params: float) -> Any:
        """Impair the directed links ``pairs`` ("clients", "etcd", node ids) until ``net_heal``."""
        if self.net is None:
            raise Unsupported(self.net_unavailable or "network faults not started")
        return self.net.impair(pairs, **params)

    def net_heal(self, handle: Any) -> None:
        if self.net is not None:
            self.net.heal(handle)

    # -- clocks and disks (the fault shim)
    def _shim(self, node_id: str) -> faultshim.FaultFile:
        if self.shim is None:
            raise Unsupported(f"the fault shim is not available: {self.shim_unavailable}")
        return self.nodes[node_id].faults  # type: ignore[return-value]

    def clock_skew(self, node_id: str, seconds: float) -> None:
        """The node's wall clock runs ``seconds`` ahead (negative: behind); 0 heals."""
        self._shim(node_id).skew(seconds)

    def client_faults(self, name: str) -> tuple[dict[str, str], faultshim.FaultFile]:
        """Environment that preloads the fault shim into a client process (:mod:`chaos.worker`),
        and its control file. Clients run on this machine for every target."""
        if self.shim is None:
            try:
                self.shim = faultshim.build(self.workdir / "shim")
            except faultshim.ShimUnavailable as exc:
                raise Unsupported(f"the fault shim is not available: {exc}") from None
        d = self.workdir / "clients"
        d.mkdir(parents=True, exist_ok=True)
        f = faultshim.FaultFile(d / f"{name}.faults")
        return faultshim.env(self.shim, f.path), f

    def slow_fsync(self, node_id: str, ms: float) -> None:
        """Every fsync/fdatasync of the node takes ``ms`` longer; 0 heals."""
        self._shim(node_id).slow_fsync(ms)

    # -- memory
    def _mem(self) -> ProcessGroups:
        if self.groups.mem is None:
            raise Unsupported("no usable memory cgroup (v2 memory controller or v1 memory hierarchy)")
        return self.groups

    def memory_usage(self, node_id: str) -> int:
        return self._mem().memory_usage(node_id)

    def memory_limit(self, node_id: str, limit: int | None) -> None:
        self._mem().set_memory_limit(node_id, limit)

    def oom_kills(self, node_id: str) -> int:
        return self._mem().oom_kills(node_id)

    def memory_hog(self, node_id: str, mib: int, step_mib: int = 2, pace_s: float = 0.05) -> subprocess.Popen[bytes]:
        """A process in the node's memory cgroup that touches ``mib`` MiB, ``step_mib`` at a time,
        then holds it: memory pressure inside the node's limit. Its oom_score_adj is -1000, so when
        the group runs out the kernel's OOM killer picks the node, as it would pick the biggest
        process of a container."""
        self._mem()
        code = ("import os, sys, time\n"
                "open('/proc/self/oom_score_adj', 'w').write('-1000')\n"
                "blocks = []\n"
                f"for _ in range({int(mib) // max(1, step_mib)}):\n"
                f"    b = bytearray({step_mib} << 20)\n"
                "    for i in range(0, len(b), 4096): b[i] = 1\n"
                "    blocks.append(b)\n"
                f"    time.sleep({pace_s})\n"
                "sys.stdin.read()\n")
        cmd = self.groups.wrap(node_id, [sys.executable, "-c", code])
        h = popen_tied(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hogs.append(h)
        return h

    def end_hog(self, hog: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            hog.kill()
        hog.wait()
        with contextlib.suppress(ValueError):
            self.hogs.remove(hog)

    # -- etcd
    def etcd_start_all(self) -> None:
        """Start every etcd member at once (a new 3-member cluster is ready only with a quorum)."""
        errors: list[BaseException] = []

        def start(m: EtcdMember) -> None:
            try:
                m.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(m,)) for m in self.etcd_members if not m.running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def etcd_down(self) -> None:
        for m in self.etcd_members:
            m.stop()

    def etcd_up(self) -> None:
        self.etcd_start_all()

    def etcd_leader(self) -> int | None:
        """Index (in ``etcd_members``) of the raft leader, None if no member answers."""
        name = etcd_leader([m.endpoint for m in self.etcd_members])
        return next((i for i, m in enumerate(self.etcd_members) if m.name == name), None)

    def etcd_member_name(self, i: int) -> str:
        return self.etcd_members[i].name

    def etcd_member_kill(self, i: int) -> None:
        self.etcd_members[i].kill()

    def etcd_member_start(self, i: int) -> None:
        self.etcd_members[i].start()

    # -- disk
    def wipe(self, node_id: str) -> None:
        """The node's disk is gone (a replaced machine): its data directory removed; the node must be down."""
        n = self.nodes[node_id]
        assert not n.running, f"{node_id} is running"
        shutil.rmtree(n.data_dir, ignore_errors=True)

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
    def _etcd_client(self) -> Etcd:
        return Etcd(self.etcd_endpoints, timeout=2.0)

    def state(self) -> ClusterState:
        etcd = self._etcd_client()
        try:
            return ClusterView(etcd, self.cluster).load()
        finally:
            etcd.close()

    def etcd_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        etcd = self._etcd_client()
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


COMPOSE_DIR = Path(__file__).resolve().parents[1] / "compose"
# node flags the compose deployment can take per node, as MEMKV_<NODE>_<VAR> (compose/docker-compose.yml)
COMPOSE_NODE_FLAGS = {"--disk": "DISK", "--segment-size": "SEGMENT_SIZE"}


def compose_command(*args: str) -> list[str]:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1 / v2 binary), as picked by
    compose/compose.sh, for project memkv and compose/docker-compose.yml, with ``args``."""
    return ["bash", "-c", f'source "{COMPOSE_DIR}/compose.sh" && exec "${{COMPOSE[@]}}" "$@"', "compose", *args]


class ComposeDeployment:
    """The compose/ deployment a chaos run drives (one per run, shared by its scenarios).

    ``prepare`` builds the images once per run (compose/build-offline.sh: starts dockerd
    when needed, reuses the cached base image and the docker build cache) so the image is
    the code under test. Every scenario then gets a fresh deployment: ``reset`` removes the
    containers and volumes of the previous one and runs compose/up.sh with
    MEMKV_RESTART_POLICY=no (a killed container stays down until the runner starts it) plus
    the scenario's per-node environment. ``teardown`` removes it at the end of the run
    unless ``keep`` (then the last scenario's deployment stays up).
    """

    def __init__(self, *, build: bool = True, keep: bool = False, log: Any = None) -> None:
        self.build = build
        self.keep = keep
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.prepared = False
        self.used = False
        self.build_s: float | None = None  # compose/build-offline.sh, once per run
        self.up_s: list[float] = []        # down + compose/up.sh, per scenario

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return dict(os.environ, MEMKV_RESTART_POLICY="no", MEMKV_COMPOSE_SKIP_BUILD="1", **(extra or {}))

    def _run(self, cmd: list[str], what: str, *, env: dict[str, str] | None = None, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(cmd, cwd=COMPOSE_DIR.parent, env=env or self.env(), capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{what} exited {r.returncode}:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
        return r

    def compose(self, *args: str, env_extra: dict[str, str] | None = None, timeout: float = 300) -> str:
        return self._run(compose_command(*args), f"compose {' '.join(args)}", env=self.env(env_extra),
                         timeout=timeout).stdout

    def prepare(self) -> None:
        if self.prepared:
            return
        t0 = time.monotonic()
        if self.build:
            self.log("[compose] building the images (compose/build-offline.sh)")
            self._run(["bash", "compose/build-offline.sh"], "compose/build-offline.sh", timeout=1800)
        else:
            if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
                raise RuntimeError("--no-build: docker is not running (compose/build-offline.sh starts it)")
        self.build_s = round(time.monotonic() - t0, 1)
        running = subprocess.run(["docker", "ps", "-q", "--filter", "name=^memkv-"], capture_output=True,
                                 text=True).stdout.split()
        if running:
            self.log(f"[compose] a deployment is up ({len(running)} containers): every scenario replaces it "
                     "with a fresh one (volumes dropped)")
        self.prepared = True

    def reset(self, node_env: dict[str, str]) -> None:
        """A fresh deployment (empty volumes) with ``node_env`` (MEMKV_<NODE>_DISK, ...)."""
        self.prepare()
        t0 = time.monotonic()
        self.compose("--profile", "join", "down", "-v", "--remove-orphans", timeout=300)
        self._run(["bash", "compose/up.sh"], "compose/up.sh", env=self.env(node_env), timeout=600)
        self.used = True
        self.up_s.append(round(time.monotonic() - t0, 1))

    def teardown(self) -> None:
        if not self.used:
            return
        if self.keep:
            self.log("[compose] deployment kept (--keep-deployment): make compose-down COMPOSE_DOWN_ARGS=-v stops it")
            return
        self.log("[compose] tearing the deployment down (containers + volumes)")
        self.compose("--profile", "join", "down", "-v", "--remove-orphans", timeout=300)
        self.used = False


class ComposeTarget(LocalTarget):
    """The compose/ deployment (container names from compose/docker-compose.yml), brought
    up fresh for each scenario by :class:`ComposeDeployment`.

    Clients run on the docker host and reach the nodes at their advertised bridge addresses,
    etcd at 127.0.0.1:MEMKV_ETCD_HOST_PORT. Per-node flags (``node_args`` / ``start(extra=)``)
    become MEMKV_<NODE>_DISK / _SEGMENT_SIZE (the only ones the compose file takes); anything
    else raises :class:`Unsupported`.
    """

    name = "compose"
    deployment: ComposeDeployment | None = None  # set by `python -m chaos`; made on first use otherwise

    def __init__(self, workdir: Path, *, project_dir: Path = COMPOSE_DIR, **kw: Any) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.project_dir = project_dir
        self.cluster = os.environ.get("MEMKV_CLUSTER_NAME", "memkv")
        # the three etcd members' published ports (compose/docker-compose.yml)
        self.etcd_members = ["etcd1", "etcd2", "etcd3"]
        self.etcd_host_ports = [os.environ.get("MEMKV_ETCD_HOST_PORT", "2379"),
                                os.environ.get("MEMKV_ETCD2_HOST_PORT", "22379"),
                                os.environ.get("MEMKV_ETCD3_HOST_PORT", "32379")]
        self.replicas = int(kw.get("replicas", 2))
        self.lease_ttl = int(kw.get("lease_ttl", 5))
        self.initial = ["n1", "n2", "n3"]
        self.nodes = {}  # type: ignore[assignment]
        self.node_args: dict[str, list[str]] = {}
        self.node_env: dict[str, str] = {}
        self._paused: set[str] = set()
        self._rules = []
        self._disconnected: set[str] = set()
        self.net = None
        self.net_unavailable = "network quality faults are injected on the local target only"
        self.shim = None
        self.shim_unavailable = "the node images do not preload the fault shim (local target only)"
        if ComposeTarget.deployment is None:
            ComposeTarget.deployment = ComposeDeployment()
        self.dep = ComposeTarget.deployment

    @staticmethod
    def container(node_id: str) -> str:
        return f"memkv-{node_id}"

    def unsupported(self, need: str) -> str | None:
        if need == "partition" and not self.can_partition:
            return "partitions need nsenter and iptables on the docker host"
        return {"local": "runs on the local target only (per-node region sizes, or a reproducer kept out of "
                         "the compose run to spare CI time)",
                "net": "network quality faults (NFQUEUE delayer) are injected on the local target only",
                "shim": "clock and fsync faults need the fault shim preloaded into the node, which the images "
                        "do not do (local target only)",
                "memory": "the OOM scenario limits a cgroup the local target made (local target only)"}.get(need)

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.etcd_host_ports)

    @property
    def url(self) -> str:
        return f"etcd://{self.etcd_endpoints}/{self.cluster}"

    @property
    def can_partition(self) -> bool:
        return shutil.which("nsenter") is not None and shutil.which("iptables") is not None

    @staticmethod
    def _env_for(node_id: str, flags: list[str]) -> dict[str, str]:
        env = {}
        it = iter(flags)
        for flag in it:
            name, eq, value = flag.partition("=")
            if not eq:
                value = next(it, "")
            if name not in COMPOSE_NODE_FLAGS:
                raise Unsupported(f"compose nodes take no {name} flag (only {', '.join(COMPOSE_NODE_FLAGS)} "
                                  "per node, as MEMKV_<NODE>_* environment)")
            env[f"MEMKV_{node_id.upper()}_{COMPOSE_NODE_FLAGS[name]}"] = value
        return env

    def up(self, timeout: float = 120.0) -> None:
        self.node_env = {}
        for nid, flags in self.node_args.items():
            self.node_env.update(self._env_for(nid, flags))
        self.dep.reset(self.node_env)  # type: ignore[union-attr]
        self.wait(lambda st: set(self.initial) <= set(st.nodes) and st.slotmap is not None
                  and set(self.initial) <= set(st.slotmap.members) and not st.slotmap.pending
                  and all(len(r) == self.replicas for r in st.slotmap.table), timeout, "compose cluster formed")

    def close(self) -> None:
        for rule in reversed(self._rules):
            with contextlib.suppress(Exception):
                self._nsenter(rule[0], ["iptables", "-D", *rule[1]], check=False)
        self._rules.clear()
        for nid in list(self._disconnected):
            with contextlib.suppress(Exception):
                self.heal(("net", nid))
        for nid in list(self._paused):
            self.docker("unpause", self.container(nid), check=False)
        self._paused.clear()

    def _recreate(self, service: str, env_extra: dict[str, str]) -> None:
        profile = ["--profile", "join"] if service == "n4" else []
        self.dep.compose(*profile, "up", "-d", "--no-deps", "--force-recreate", service,  # type: ignore[union-attr]
                         env_extra=env_extra)

    def add_node(self, node_id: str, *, zone: str | None = None, wait: bool = True,
                 extra: list[str] | None = None) -> Any:
        if node_id != "n4":
            raise Unsupported("compose has one extra node (n4, profile join)")
        if zone is not None:
            raise Unsupported("compose n4's zone is fixed (zone-a)")
        self.node_env.update(self._env_for(node_id, list(extra or [])))
        self.dep.compose("--profile", "join", "up", "-d", "--no-deps", "n4",  # type: ignore[union-attr]
                         env_extra=self.node_env)
        if wait:
            self.wait(lambda st: node_id in st.nodes, 60, f"{node_id} registered")
        return node_id

    def start(self, node_id: str, *, extra: list[str] | None = None, timeout: float = 60.0) -> None:
        if extra is not None and node_id.startswith("n"):
            # new flags: recreate the container (same named volume) with its MEMKV_<NODE>_* environment
            pre = f"MEMKV_{node_id.upper()}_"
            self.node_env = {k: v for k, v in self.node_env.items() if not k.startswith(pre)}
            self.node_env.update(self._env_for(node_id, extra))
            self._recreate(node_id, self.node_env)
        else:
            self.docker("start", self.container(node_id))
        self._paused.discard(node_id)

    def kill(self, node_id: str) -> None:
        self.docker("kill", "-s", "KILL", self.container(node_id), check=False)

    def stop(self, node_id: str, timeout: float = 15.0) -> None:
        self.docker("stop", "-t", str(int(timeout)), self.container(node_id), timeout=timeout + 60)

    def pause(self, node_id: str) -> None:
        self.docker("pause", self.container(node_id))
        self._paused.add(node_id)

    def resume(self, node_id: str) -> None:
        self.docker("unpause", self.container(node_id))
        self._paused.discard(node_id)

    def _states(self) -> dict[str, str]:
        out = self.docker("ps", "-a", "--filter", "name=^memkv-n[0-9]+$", "--format", "{{.Names}} {{.State}}",
                          check=False)
        return {name.removeprefix("memkv-"): state for name, _, state in
                (line.partition(" ") for line in out.splitlines() if line.strip())}

    def running(self, node_id: str) -> bool:
        return self._states().get(node_id) == "running"

    def alive(self) -> set[str]:
        return {i for i, s in self._states().items() if s == "running" and i not in self._paused}

    def address(self, node_id: str) -> tuple[str, int]:
        # from docker, not from etcd: a node cut from etcd (or fenced) has no registration to read
        ip = self.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                         self.container(node_id)).split()
        if not ip:
            raise RuntimeError(f"{node_id}: no address on memkv-net")
        return ip[0], 7400

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
        self._disconnected.add(node_id)
        return ("net", node_id)

    def heal(self, handle: Any) -> None:
        if isinstance(handle, tuple) and handle[0] == "net":
            self.docker("network", "connect", "--alias", handle[1], "memkv-net", self.container(handle[1]))
            self._disconnected.discard(handle[1])
            return
        for node_id, r in handle:
            self._nsenter(node_id, ["iptables", "-D", *r], check=False)
            with contextlib.suppress(ValueError):
                self._rules.remove((node_id, r))

    def etcd_down(self) -> None:
        self.docker("stop", *[self.container(m) for m in self.etcd_members])

    def etcd_up(self) -> None:
        self.docker("start", *[self.container(m) for m in self.etcd_members])
        self.wait(lambda st: True, 60, "etcd back")

    def etcd_start_all(self) -> None:
        self.etcd_up()

    def etcd_leader(self) -> int | None:
        name = etcd_leader(self.etcd_endpoints.split(","))
        return self.etcd_members.index(name) if name in self.etcd_members else None

    def etcd_member_name(self, i: int) -> str:
        return self.etcd_members[i]

    def etcd_member_kill(self, i: int) -> None:
        self.docker("kill", "-s", "KILL", self.container(self.etcd_members[i]), check=False)

    def etcd_member_start(self, i: int) -> None:
        self.docker("start", self.container(self.etcd_members[i]))

    def corrupt_segment(self, node_id: str, flips: int, rnd: random.Random) -> str:
        c = self.container(node_id)
        image = os.environ.get("MEMKV_IMAGE", "memkv:latest")
        listing = self.docker("run", "--rm", "--volumes-from", c, "--entrypoint", "sh", image, "-c",
                              "cd /data/flash 2>/dev/null && for f in seg-*.log; do [ -f \"$f\" ] && "
                              "echo \"$f $(wc -c < \"$f\")\"; done; true")
        segs = [(n, int(s)) for n, s in (line.split() for line in listing.splitlines() if line.strip())]
        segs = [n for n, size in sorted(segs) if size > 8192]
        if not segs:
            raise Unsupported(f"{node_id} has no segment file with data")
        local = self.workdir / segs[-1]
        self.docker("cp", f"{c}:/data/flash/{segs[-1]}", str(local))
        offs = corrupt_file(local, flips, rnd)
        self.docker("cp", str(local), f"{c}:/data/flash/{segs[-1]}")
        return f"{segs[-1]}: {len(offs)} byte(s) flipped"

    def disk_args(self, disk: str, segment: str) -> list[str]:
        return ["--disk", disk, "--segment-size", segment]  # -> MEMKV_<NODE>_DISK / _SEGMENT_SIZE

    def node_logs(self) -> dict[str, str]:
        out = {}
        for i in [*self.initial, "n4", "rebalancer-1", "rebalancer-2"]:
            r = subprocess.run(["docker", "logs", "--tail", "60", self.container(i)], capture_output=True,
                               text=True, timeout=60)
            if r.returncode == 0:
                out[i] = r.stdout + r.stderr
        return out

    def state(self) -> ClusterState:
        etcd = Etcd(self.etcd_endpoints, timeout=2.0)
        try:
            return ClusterView(etcd, self.cluster).load()
        finally:
            etcd.close()

    def etcd_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        etcd = Etcd(self.etcd_endpoints, timeout=2.0)
        try:
            kvs, _ = etcd.get_prefix(prefix)
            return [(kv.key.decode() if isinstance(kv.key, bytes) else kv.key, kv.value) for kv in kvs]
        finally:
            etcd.close()
