"""Shared fixtures: real memkv node processes on free loopback ports.

``start_node(*args, config=None)`` (factory) starts ``python -m memkv.cli serve
--listen 127.0.0.1:<free port> --memory 64MiB --data-dir <tmp>`` plus ``args``
(and ``--config FILE`` written from the TOML text ``config``), waits until the
port accepts TCP (15 s; fails with the node's stderr if it dies or hangs) and
returns a :class:`NodeProc`. Every node a test started is killed at teardown.

``memkv_node`` is one such node; extra args by indirect parametrization::

    @pytest.mark.parametrize("memkv_node", [["--memory", "8MiB"]], indirect=True)
    def test_small(memkv_node): ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memkv.errors import NodeUnavailable
from memkv.tools import localproc
from memkv.tools.children import popen_tied
from memkv.tools.localproc import free_port as free_port  # tests import it from here

# Cluster fixtures (a real etcd, clusters of node processes): tests/conftest_etcd.py
pytest_plugins = ["conftest_etcd"]

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def rdma_skip_reason() -> str | None:
    """Why RDMA cannot run here (None: it can). It runs for real in the Soft-RoCE VM (``make test-rdma``)."""
    from memkv.transport import pyverbs_available, rdma_devices

    if not pyverbs_available():
        return "pyverbs not importable (Debian python3-pyverbs); RDMA runs for real in `make test-rdma`"
    if not rdma_devices():
        return "no RDMA device (no NIC, no rdma_rxe); RDMA runs for real in `make test-rdma`"
    return None


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until ``host:port`` accepts a TCP connection (``memkv.tools.localproc.wait_for_port``).

    Raises ``NodeUnavailable`` if ``alive()`` turns false, and after ``timeout`` s.
    """
    localproc.wait_for_port(port, timeout=timeout, host=host, alive=alive)


def poll(cond: Callable[[], Any], timeout: float, what: str = "") -> Any:
    """Call ``cond`` every 0.1 s until it returns something true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.1)


class NodeProc:
    """A memkv node subprocess started by the ``start_node`` fixture."""

    def __init__(self, args: list[str], workdir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.args = list(args)
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"memkv://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "memkv.cli", "serve", "--listen", self.address]
        if "--memory" not in self.args:
            cmd += ["--memory", "64MiB"]
        if "--data-dir" not in self.args:
            cmd += ["--data-dir", str(self.data_dir)]
        return cmd + self.args

    # -- life cycle --------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> NodeProc:
        """Start (or start again, same port and data dir) and wait until it accepts."""
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # closed in _reap
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.proc = popen_tied(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._log = log
        try:
            wait_for_port(self.host, self.port, timeout, alive=lambda: self.running)
            if "--resp-port" in self.args:  # the RESP listener starts in its own task
                resp_port = int(self.args[self.args.index("--resp-port") + 1])
                wait_for_port(self.host, resp_port, timeout, alive=lambda: self.running)
            return self
        except NodeUnavailable as exc:
            why = str(exc)
        self.kill()
        pytest.fail(
            f"memkv node {' '.join(self.command())} failed to start: {why}\n--- node output ---\n{self.output()}",
            pytrace=False,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def output(self) -> str:
        """Everything the node wrote to stdout/stderr so far (all its runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    stderr = output

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, as far as the node can tell)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self._reap()

    def pause(self) -> None:
        """SIGSTOP: the node hangs without closing its sockets."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT_S) -> NodeProc:
        """Graceful stop, then start again with the same port, args and data dir."""
        self.stop()
        return self.start(timeout)

    def _reap(self) -> int | None:
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[attr-defined]
            self._log = None
        return self.proc.returncode if self.proc is not None else None

    def __repr__(self) -> str:
        return f"<NodeProc {self.url} pid={self.pid} running={self.running}>"


StartNode = Callable[..., NodeProc]


@pytest.fixture
def start_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartNode]:
    """Factory: ``start_node(*args, config: str | None = None) -> NodeProc``."""
    nodes: list[NodeProc] = []

    def _start(*args: str, config: str | None = None) -> NodeProc:
        workdir = tmp_path_factory.mktemp("node")
        extra = [str(a) for a in args]
        if config is not None:
            cfg = workdir / "memkv.toml"
            cfg.write_text(config)
            extra = ["--config", str(cfg), *extra]
        node = NodeProc(extra, workdir)
        nodes.append(node)
        return node.start()

    yield _start
    for node in nodes:
        with contextlib.suppress(Exception):
            if node.running:
                node.resume()
        node.kill()


@pytest.fixture
def memkv_node(request: pytest.FixtureRequest, start_node: StartNode) -> NodeProc:
    """One standalone node; extra CLI args via indirect parametrization (list of str)."""
    args = getattr(request, "param", None) or []
    if isinstance(args, str):
        args = args.split()
    return start_node(*args)
