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

A child that starts processes of its own (vLLM) runs as a ``TiedGroup``: they die with it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
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


# Reads until EOF, then SIGKILLs the process group "$1". Its stdin's write end is held by this
# process alone (pipes are close-on-exec), so EOF comes when this process dies, however it dies.
_REAPER = 'cat > /dev/null; kill -s KILL -- "-$1" 2>/dev/null'


class TiedGroup:
    """A child in a process group of its own that dies, with every process it started, when this
    process dies.

    ``popen_tied`` reaches the child only: a program that starts processes of its own leaves them
    running when it is killed (seen: vLLM's engine core and worker outlived a SIGKILL'd test's
    ``vllm serve``, holding gigabytes and blocked on a socket forever). So the child leads a new
    session, and a reaper -- a shell in a session of its own, not tied, since it must outlive this
    process and a signal to this process's group must not end it first -- SIGKILLs the group when
    this process is gone."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.proc: subprocess.Popen[Any] = popen_tied(args, start_new_session=True, **kwargs)
        self._reaper = subprocess.Popen(["sh", "-c", _REAPER, "sh", str(self.proc.pid)], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the group; SIGKILL to whatever is left of it once the leader exited or after
        ``timeout`` seconds."""
        # The reaper goes first: once the group is gone its id may be given to another one.
        self._reaper.kill()
        self._reaper.wait()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # (members that outlived their leader)
        self.proc.wait(10)
