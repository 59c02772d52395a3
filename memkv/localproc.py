"""Starting local node processes (for ``memkv demo``, ``memkv up`` and tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from memkv.errors import NodeUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise NodeUnavailable(f"process exited with {proc.returncode} before listening:\n{err[-3000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise NodeUnavailable(f"nothing listens on {host}:{port} after {timeout}s")


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
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.PIPE if quiet else None)
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

    Started through the CLI (not imported) so that the ``memkv`` package keeps
    its one-way dependency on ``memkv.cluster``.
    """

    proc: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(cls, nodes: int, *, directory: str, memory: str = "256MiB", timeout: float = 90.0) -> LocalCluster:
        import select

        proc = subprocess.Popen([sys.executable, "-m", "memkv.cli", "up", "--nodes", str(nodes), "--dir", directory,
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
