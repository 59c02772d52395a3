"""Local processes: memkv nodes, ``memkv up`` clusters and etcd (for ``memkv demo``, ``memkv up``,
benchmarks, the chaos suite and tests)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memkv.errors import NodeUnavailable
from memkv.tools.children import popen_tied

ETCD_CANDIDATES = ("/usr/bin/etcd", "/usr/local/bin/etcd")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1", *, alive: Callable[[], bool] | None = None) -> None:
    """Return once ``host:port`` accepts a TCP connection.

    ``NodeUnavailable`` as soon as ``proc`` exits (with the tail of its stderr when that is a pipe)
    or ``alive()`` turns false, and after ``timeout`` s: a server that died is not waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise NodeUnavailable(f"process exited with {proc.returncode} before listening:\n{err[-3000:]}")
        if alive is not None and not alive():
            raise NodeUnavailable(f"process exited before it listened on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise NodeUnavailable(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (the process shuts down cleanly: snapshots, lease revoke), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class NodeProcess:
    port: int
    proc: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"memkv://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_node(*extra: str, port: int | None = None, memory: str = "256MiB", quiet: bool = True,
               timeout: float = 15.0) -> NodeProcess:
    port = port or free_port()
    args = [sys.executable, "-m", "memkv.cli", "serve", "--listen", f"127.0.0.1:{port}", "--memory", memory,
            *extra]
    proc = popen_tied(args, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE if quiet else None)
    node = NodeProcess(port, proc, args)
    try:
        wait_for_port(port, proc, timeout)
    except BaseException:
        node.kill()
        raise
    return node


@dataclass
class LocalCluster:
    """``memkv up`` as a child process: etcd and N nodes; ``url`` is its etcd:// URL.

    A child process, so that Ctrl-C and the cluster's own shutdown work as they do
    for an operator's ``memkv up``.
    """

    proc: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(cls, nodes: int, *, directory: str, memory: str = "256MiB", timeout: float = 90.0) -> LocalCluster:
        import select

        proc = popen_tied([sys.executable, "-m", "memkv.cli", "up", "--nodes", str(nodes), "--dir", directory,
                           "--memory", memory, "--zones", str(min(nodes, 2))],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if line.startswith(b"etcd://"):
                    return cls(proc, line.decode().strip())
            if proc.poll() is not None:
                break
        proc.kill()
        proc.wait()
        raise NodeUnavailable(f"memkv up did not come up within {timeout}s (logs in {directory})")

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, timeout)


# -- etcd -------------------------------------------------------------------------------------
def find_etcd() -> str | None:
    for path in (os.environ.get("MEMKV_ETCD_BIN"), *ETCD_CANDIDATES, shutil.which("etcd")):
        if path and os.access(path, os.X_OK):
            return path
    return None


class EtcdProcess:
    """One etcd member on loopback ports with its own data dir; ``restart`` keeps both."""

    def __init__(self, data_dir: str | Path, *, client_port: int | None = None, peer_port: int | None = None,
                 log_path: str | Path | None = None) -> None:
        binary = find_etcd()
        if binary is None:
            raise NodeUnavailable("etcd binary not found (apt-get install etcd-server, or set MEMKV_ETCD_BIN)")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"etcd-{self.client_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", "memkv-etcd", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"memkv-etcd={peer}", "--initial-cluster-state", "new",
                "--log-level", "warn", "--logger", "zap"]

    def start(self, timeout: float = 30.0) -> EtcdProcess:
        assert self.proc is None or self.proc.poll() is not None, "etcd already running"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = popen_tied(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        from memkv.client.etcd import Etcd, EtcdUnavailable  # tools may use the client: an etcd probe

        deadline = time.monotonic() + timeout
        etcd = Etcd(self.endpoint, timeout=1.0)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise NodeUnavailable(f"etcd exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
                try:
                    etcd.get("/memkv-ready-probe")
                    return
                except EtcdUnavailable:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise NodeUnavailable(f"etcd not ready after {timeout}s:\n{self.output()[-3000:]}") from None
                    time.sleep(0.1)
        finally:
            etcd.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 30.0) -> EtcdProcess:
        self.stop()
        return self.start(timeout)
