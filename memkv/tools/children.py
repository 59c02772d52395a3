"""Child processes that die with the process that started them.

A node, an etcd or a worker started by a runner (``memkv serve --workers``, ``memkv up``, the
chaos runner, the tests) must not outlive it: a runner killed with SIGKILL, or whose session
ended, otherwise leaves processes that hold ports, keep a cluster's etcd alive and keep
writing to disk. Signal handlers cannot help against SIGKILL; the kernel can: each child is
started with ``PR_SET_PDEATHSIG`` = SIGKILL (``setpriv --pdeathsig KILL``, which then execs
it; Linux). It survives ``exec``, so a wrapper that execs the real program (``sh -c '... && exec
"$@"'``) passes it on.

The "parent" whose death sends the signal is the *thread* that forked the child, not the
process: a node restarted from a short-lived thread (a chaos fault, a test fixture starting
etcd members at once) would be killed when that thread ends. So every child is forked by one
thread that lives as long as the process (``_Spawner``), whichever thread asks.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
from concurrent.futures import Future
from typing import Any

# ``setpriv`` (util-linux) sets the signal, then execs the command. Not a ``preexec_fn``: with
# one, subprocess must fork() instead of vfork(), which runs gRPC's fork handlers -- and in a
# process with etcd channels the handler and the GIL deadlock (seen: a test's etcd restart hung).
SETPRIV = shutil.which("setpriv")


def tied(args: list[str]) -> list[str]:
    """``args`` run so that SIGKILL reaches them when the forking thread's process dies
    (as they are where ``setpriv`` is missing: not on Linux)."""
    return [SETPRIV, "--pdeathsig", "KILL", "--", *args] if SETPRIV else list(args)


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
                done.set_result(subprocess.Popen(tied(args), **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done.set_exception(exc)

    def popen(self, args: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        done: Future[subprocess.Popen[Any]] = Future()
        self._jobs.put((args, kwargs, done))
        return done.result()


_spawner: _Spawner | None = None
_spawner_pid = 0  # the process it belongs to (a forked copy of this process has no spawner thread)
_spawner_lock = threading.Lock()


def popen_tied(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)`` whose child gets SIGKILL when this process dies."""
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid():
            _spawner_pid = os.getpid()
            _spawner = _Spawner()
    return _spawner.popen(args, kwargs)
