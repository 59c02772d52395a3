"""Child processes that die with the process that started them.

A node, an etcd or a worker started by a runner (``memkv serve --workers``, ``memkv up``, the
chaos runner, the tests) must not outlive it: a runner killed with SIGKILL, or whose session
ended, otherwise leaves processes that hold ports, keep a cluster's etcd alive and keep
writing to disk. Signal handlers cannot help against SIGKILL; the kernel can: each child is
started with ``PR_SET_PDEATHSIG`` = SIGKILL (Linux; elsewhere a no-op). It survives ``exec``,
so a wrapper that execs the real program (``sh -c '... && exec "$@"'``) passes it on.

The "parent" whose death sends the signal is the *thread* that forked the child, not the
process: a node restarted from a short-lived thread (a chaos fault, a test fixture starting
etcd members at once) would be killed when that thread ends. So every child is forked by one
thread that lives as long as the process (``_Spawner``), whichever thread asks.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1

try:  # looked up here, not in the child between fork and exec (a lock another thread held there stays held)
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


_parent = os.getpid()  # the process that forks (set again in a forked copy of it)


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the forking thread's process dies. Exits at once
    if the parent died before the request was in place (the signal would never come)."""
    if _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent:
        os._exit(1)


class _Spawner:
    """The one thread that forks every tied child (see the module's docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[subprocess.Popen[Any]]]] = \
            queue.SimpleQueue()
        threading.Thread(target=self._run, name="memkv-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            args, kwargs, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(args, preexec_fn=die_with_parent, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done.set_exception(exc)

    def popen(self, args: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        done: Future[subprocess.Popen[Any]] = Future()
        self._jobs.put((args, kwargs, done))
        return done.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def popen_tied(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)`` whose child gets SIGKILL when this process dies."""
    global _spawner, _parent
    with _spawner_lock:
        if _spawner is None or _parent != os.getpid():  # (a forked copy of this process has no spawner thread)
            _parent = os.getpid()
            _spawner = _Spawner()
    return _spawner.popen(args, kwargs)
