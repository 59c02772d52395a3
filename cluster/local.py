"""A local etcd process (Debian's ``etcd`` binary) for ``memkv up`` and tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from memkv.errors import NodeUnavailable
from memkv.localproc import stop_process

ETCD_CANDIDATES = ("/usr/bin/etcd", "/usr/local/bin/etcd")


def find_etcd() -> str | None:
    for path in (os.environ.get("MEMKV_ETCD_BIN"), *ETCD_CANDIDATES, shutil.which("etcd")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """One etcd member on loopback ports with its own data dir; ``restart`` keeps both."""

    def __init__(self, data_dir: str | Path, *, client_port: int | None = None, peer_port: int | None = None,
                 log_path: str | Path | None = None) -> None:
        binary = find_etcd()
        if binary is None:
            raise NodeUnavailable("etcd binary not found (apt-get install etcd-server, or set MEMKV_ETCD_BIN)")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.client_port = client_port or _free_port()
        self.peer_port = peer_port or _free_port()
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
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        from memkv.client.etcd import Etcd, EtcdUnavailable

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
