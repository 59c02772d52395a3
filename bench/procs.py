"""Helpers for the server processes a benchmark starts: free ports, readiness, shutdown."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any, Self

from memkv.errors import NodeUnavailable
from memkv.tools.children import popen_tied as popen_tied  # every server a benchmark starts dies with it
from memkv.tools.localproc import free_port as free_port  # benchmarks import it from here
from memkv.tools.localproc import stop_process, wait_for_port


def wait_for_tcp(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Wait until ``host:port`` accepts; raise with the log's tail if ``proc`` dies or it times out
    (then it is stopped)."""
    try:
        wait_for_port(port, proc, timeout, host)
    except NodeUnavailable as exc:
        stop_process(proc)
        raise RuntimeError(f"{proc.args!r}: {exc}\n{tail(log)}") from exc


def gather(procs: list[Any], out: Any, timeout: float, what: str) -> list[tuple[Any, ...]]:
    """Start the client processes ``procs``, take one result each from the queue ``out`` (a tuple whose
    last field is an error message or None), join them; raise with the first error."""
    for p in procs:
        p.start()
    res = [out.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r[-1] for r in res if r[-1]]
    if errors:
        raise RuntimeError(f"{what}: {errors[0]}")
    return res


def tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


class PeerServers:
    """The server processes of one benchmark peer, started in order, each waited for on its port,
    stopped in reverse order. A peer's ``start`` builds its command lines and calls :meth:`spawn`."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)  # the port the benchmark's clients connect to
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], port: int, log: Path, timeout: float, **popen: Any) -> None:
        with open(log, "ab") as out:
            proc = popen_tied(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **popen)
        self.procs.append(proc)
        wait_for_tcp(self.host, port, proc, timeout, log)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The first process started (a one-process peer's server), or None before ``start``."""
        return self.procs[0] if self.procs else None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
