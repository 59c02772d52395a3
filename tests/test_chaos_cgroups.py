"""A chaos runner killed with SIGKILL leaves its ``memkv-chaos-<tag>`` cgroups behind (empty: its
processes die with it); the next runner removes them, and never a live runner's groups, even
empty ones, nor groups it cannot tell are stale (chaos/cgroups.py). Real cgroups, a real runner
process killed with SIGKILL; skipped where no cgroup hierarchy is writable (the chaos target
then runs without groups).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chaos.cgroups import LOCKS, PREFIX, ProcessGroups, memory, unified

ROOT = Path(__file__).resolve().parents[1]

# A runner: its node (here `sleep`) in group n1, started as the chaos target starts nodes.
RUNNER = """
import subprocess, sys, time
from chaos.cgroups import ProcessGroups
from memkv.tools.children import popen_tied

g = ProcessGroups(sys.argv[1])
p = popen_tied(g.wrap("n1", ["sleep", "600"]), stdin=subprocess.DEVNULL)
print(p.pid, flush=True)
time.sleep(600)
"""


def _procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_the_next_runner_removes_a_killed_runners_groups_only(tmp_path: Path) -> None:
    hierarchies = [h for h in (unified(), memory()) if h is not None]
    if not hierarchies:
        pytest.skip("no writable cgroup hierarchy here")
    tag = f"t{os.getpid()}"
    killed, live, legacy, nxt = f"{tag}-killed", f"{tag}-live", f"{tag}-legacy", f"{tag}-next"
    groups: list[ProcessGroups] = []
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, killed], cwd=ROOT, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert runner.stdout is not None
        line = runner.stdout.readline()
        assert line, f"the runner ended early: {runner.wait()}"
        node = int(line)
        left = [h.base / f"{PREFIX}{killed}" for h in hierarchies]
        _until(lambda: all(node in _procs(d / "n1") for d in left), 10, "the node in its groups")
        runner.kill()
        runner.wait()
        # the runner's node dies with it; its groups stay, empty, with the lock file nobody holds
        _until(lambda: not any(_procs(d / "n1") for d in left), 10, "the node gone from its groups")
        assert all((d / "n1").is_dir() for d in left) and (LOCKS / f"{killed}.lock").exists()

        # a live runner between a node's kill and its restart: an empty group, its lock held
        groups.append(ProcessGroups(live))
        groups[-1].add("n1")
        # a group made without a lock file (older code, or a runner with another /tmp)
        for h in hierarchies:
            (h.base / f"{PREFIX}{legacy}" / "n1").mkdir(parents=True)

        groups.append(ProcessGroups(nxt))  # the next run
        assert not any(d.exists() for d in left), "the killed runner's groups are still there"
        assert not (LOCKS / f"{killed}.lock").exists()
        for h in hierarchies:
            assert (h.base / f"{PREFIX}{live}" / "n1").is_dir(), "a live runner's group was removed"
            assert (h.base / f"{PREFIX}{legacy}" / "n1").is_dir(), "a group without a lock file was removed"

        # normal exit: a runner removes its own groups and its lock file
        groups.pop(0).close()
        assert not any((h.base / f"{PREFIX}{live}").exists() for h in hierarchies)
        assert not (LOCKS / f"{live}.lock").exists()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for g in groups:
            g.close()
        for h in hierarchies:
            for d in (h.base / f"{PREFIX}{legacy}" / "n1", h.base / f"{PREFIX}{legacy}"):
                if d.is_dir():
                    d.rmdir()
