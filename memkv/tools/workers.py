"""``memkv serve --workers N``: one supervisor, N worker processes, so that a node uses N cores.

A memkv node is one Python process and so one core. Rather than make the node
multi-threaded (the GIL would serialise it anyway), a host runs N independent
nodes -- *workers* -- each with its own share of the region (``--memory`` / N,
or ``--worker-memory``: one size for each, or one per worker), its own flash
directory (``DATA_DIR/worker-I``), its own port (``--listen HOST:PORT`` is
worker 0, the others follow: PORT+1, ... or ``--worker-ports``) and its own
metrics and RESP ports (likewise +I). Each worker is an ordinary
``memkv serve`` process: the node code knows nothing of the supervisor (it only
reports its host and the layout it was given, ``host_id`` / ``worker_addrs``,
so that a client or ``memkv status`` can find its siblings).

In a cluster every worker registers as its own node (``<base>-w<I>``, base =
``--node-id``, else the host id) with the host id of the machine (``--host-id``,
default the hostname): placement then keeps the replicas of a slot on distinct
hosts (memkv/cluster/slotmap.py), so one machine going down loses no slot.

The supervisor (this file) only runs processes:

- it starts the workers and restarts one that exits without being asked to
  (a crash): at once the first time, then with a back-off that doubles up to
  ``MAX_BACKOFF_S`` while it keeps crashing within ``STABLE_S`` of its start;
  a restarted worker recovers its durable values from its flash directory;
- SIGINT and SIGTERM are forwarded to every worker (each shuts down cleanly: a
  cluster member revokes its lease) and end the supervisor once they have exited
  (SIGKILL for any still running after ``STOP_TIMEOUT_S``);
- the workers die with it: each is started with ``PR_SET_PDEATHSIG`` = SIGKILL
  (``memkv/tools/children.py``),
  so a supervisor killed outright (the host "dies") takes its workers along
  instead of leaving orphans that hold the ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from memkv.config import NodeConfig
from memkv.errors import InvalidArgument
from memkv.tools.children import popen_tied

log = logging.getLogger("memkv.workers")

STABLE_S = 10.0  # a worker that ran this long before crashing is restarted at once
MAX_BACKOFF_S = 8.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def worker_count(value: str | int) -> int:
    """``--workers`` / ``[node] workers``: a positive count, or ``auto`` = the cores this process may use."""
    if str(value).strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        raise InvalidArgument(f"--workers must be a number or 'auto', not {value!r}") from None
    if n < 1:
        raise InvalidArgument(f"--workers must be at least 1, not {n}")
    return n


def host_id(cfg: NodeConfig) -> str:
    return cfg.host_id or socket.gethostname()


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker gets: the flags that make it itself (appended to the shared ones)."""

    index: int
    listen: str
    node_id: str
    flags: tuple[str, ...]


def plan_workers(cfg: NodeConfig, n: int, ports: list[int] | None = None) -> list[WorkerPlan]:
    """The N workers' shares of ``cfg``: ports (``ports``, else the listen port + I), flash
    directories, region and flash budgets (split evenly), node ids, metrics and RESP ports."""
    host, _, port_s = cfg.listen.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidArgument(f"--listen must be HOST:PORT, not {cfg.listen!r}") from None
    if ports is None:
        if port == 0:
            raise InvalidArgument("--workers N with --listen HOST:0: give the ports with --worker-ports")
        ports = [port + i for i in range(n)]
    if len(ports) != n or len(set(ports)) != n:
        raise InvalidArgument(f"--worker-ports: {n} distinct ports are needed, got {ports}")
    memory = memory_shares(cfg, n)
    hid = host_id(cfg)
    base = cfg.node_id or hid
    addrs = [f"{host}:{p}" for p in ports]
    plans = []
    for i, addr in enumerate(addrs):
        flags = ["--listen", addr, "--node-id", f"{base}-w{i}", "--host-id", hid,
                 "--memory", str(memory[i]), "--disk", str(cfg.disk // n),
                 "--worker-addrs", ",".join(addrs)]
        if cfg.data_dir:
            flags += ["--data-dir", str(Path(cfg.data_dir) / f"worker-{i}")]
        if cfg.metrics_port is not None:
            flags += ["--metrics-port", str(cfg.metrics_port + i)]
        if cfg.resp_port is not None:
            flags += ["--resp-port", str(cfg.resp_port + i)]
        plans.append(WorkerPlan(i, addr, f"{base}-w{i}", tuple(flags)))
    return plans


def memory_shares(cfg: NodeConfig, n: int) -> list[int]:
    """Each worker's region size: ``--worker-memory`` / ``[node] worker_memory`` when given (one size
    for all, or one per worker), else ``--memory`` split evenly."""
    given = cfg.worker_memory
    if not given:
        shares = [cfg.memory // n] * n
        what = f"--memory {cfg.memory} split {n} ways"
    elif len(given) in (1, n):
        shares = given * n if len(given) == 1 else list(given)
        what = f"--worker-memory {','.join(map(str, given))}"
    else:
        raise InvalidArgument(f"--worker-memory: one size or {n} (one per worker), not {len(given)}")
    if min(shares) < 1 << 20:
        raise InvalidArgument(f"{what} leaves under 1 MiB for a worker")
    return shares


@dataclass
class Worker:
    plan: WorkerPlan
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    due: float = 0.0  # when a crashed worker is started again


@dataclass
class Supervisor:
    """Runs the workers until SIGINT/SIGTERM (``run``). ``shared`` are the flags every worker gets
    (config, etcd, cluster, zone, TLS, ...); each plan adds its own."""

    plans: list[WorkerPlan]
    shared: list[str]
    workers: list[Worker] = field(default_factory=list)
    stop_signal: int = 0  # the signal that asked us to stop (forwarded to the workers), 0 = none yet

    def command(self, plan: WorkerPlan) -> list[str]:
        return [sys.executable, "-m", "memkv.cli", "serve", *self.shared, "--workers", "1", *plan.flags]

    def _start(self, w: Worker) -> None:
        w.proc = popen_tied(self.command(w.plan), stdin=subprocess.DEVNULL)
        w.started = time.monotonic()
        log.info("worker %d (%s, %s) started: pid %d", w.plan.index, w.plan.node_id, w.plan.listen, w.proc.pid)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = self.stop_signal or signum  # the loop sees it within POLL_S

    def run(self) -> int:
        """Start every worker, restart crashed ones; on SIGINT/SIGTERM forward it to them all and
        return 0 once they have exited."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        self.workers = [Worker(p) for p in self.plans]
        try:
            for w in self.workers:
                self._start(w)
            log.info("supervisor %d: %d workers on %s", os.getpid(), len(self.workers),
                     ", ".join(w.plan.listen for w in self.workers))
            while not self.stop_signal:
                self._tend(time.monotonic())
                time.sleep(POLL_S)
        finally:
            self._stop_all()
        return 0

    def _tend(self, now: float) -> None:
        """One look at every worker: restart the ones that exited (after their back-off)."""
        for w in self.workers:
            if w.proc is None:
                if now >= w.due:
                    self._start(w)
                continue
            code = w.proc.poll()
            if code is None:
                continue
            ran = now - w.started
            w.backoff = 0.0 if ran >= STABLE_S else min(MAX_BACKOFF_S, max(0.25, w.backoff * 2))
            w.restarts += 1
            w.proc, w.due = None, now + w.backoff
            log.warning("worker %d (%s) exited with %s after %.1fs; restart %d in %.2fs", w.plan.index,
                        w.plan.node_id, code, ran, w.restarts, w.backoff)

    def _stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(self.stop_signal or signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0fs: SIGKILL", p.pid, STOP_TIMEOUT_S)
                p.kill()
                p.wait()
        log.info("supervisor %d: all workers stopped", os.getpid())


def run_workers(cfg: NodeConfig, n: int, shared: list[str], ports: list[int] | None = None) -> int:
    """``memkv serve --workers N`` (N > 1): plan the workers of ``cfg`` and supervise them."""
    return Supervisor(plan_workers(cfg, n, ports), shared).run()
