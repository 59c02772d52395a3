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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.load import NODE_CONFIG
from memkv.client.cluster_view import ClusterState, ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.tools.localproc import EtcdProcess, stop_process


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
        # A name of its own per run: a node left over from an earlier run (its runner was killed) keeps
        # retrying its etcd address, and a later run's etcd may get that port: with a shared name it
        # would join the new cluster (and, holding another secret, fail every migration to it).
        self.cluster = f"chaos-{secrets.token_hex(3)}"
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
            stop_process(n.proc, timeout)  # type: ignore[arg-type]

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
        self.etcd_endpoint = f"127.0.0.1:{os.environ.get('MEMKV_ETCD_HOST_PORT', '2379')}"
        self.replicas = int(kw.get("replicas", 2))
        self.lease_ttl = int(kw.get("lease_ttl", 5))
        self.initial = ["n1", "n2", "n3"]
        self.nodes = {}  # type: ignore[assignment]
        self.node_args: dict[str, list[str]] = {}
        self.node_env: dict[str, str] = {}
        self._paused: set[str] = set()
        self._rules = []
        self._disconnected: set[str] = set()
        if ComposeTarget.deployment is None:
            ComposeTarget.deployment = ComposeDeployment()
        self.dep = ComposeTarget.deployment

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
        self.docker("stop", "memkv-etcd")

    def etcd_up(self) -> None:
        self.docker("start", "memkv-etcd")
        self.wait(lambda st: True, 60, "etcd back")

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
