"""Processes a runner starts die with it (memkv/tools/children.py): a chaos runner killed with
SIGKILL used to leave its nodes and etcd running (they are started in sessions of their own),
holding ports and a cluster alive. Real processes: a runner-like parent brings up the chaos
suite's local target (etcd + a node, chaos/targets.py) -- etcd started on a short-lived thread,
as ``etcd_start_all`` does, and the node restarted from another, as a fault does -- then is
killed with SIGKILL; its children must be gone within a few seconds. The same holds for a
benchmark's servers (bench/procs.py), started from a short-lived thread as well, and for what a
child started as a ``TiedGroup`` starts itself (vLLM's engine core: bench/vllm_serve.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memkv.tools.children import TiedGroup
from memkv.tools.localproc import find_etcd

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import sys, threading, time
from pathlib import Path
from chaos.targets import LocalTarget

t = LocalTarget(Path(sys.argv[1]), nodes=1, replicas=1, spare=0)
t.up(timeout=60)
th = threading.Thread(target=lambda: (t.kill("n1"), t.start("n1")))  # as a fault restarts a node
th.start()
th.join()
print(t.etcd.proc.pid, t.nodes["n1"].proc.pid, flush=True)
time.sleep(600)
"""

BENCH_RUNNER = """
import sys, threading, time
from pathlib import Path
from bench.memkv_peer import MemkvNode

nodes = []
th = threading.Thread(target=lambda: nodes.append(MemkvNode(Path(sys.argv[1]), memory="64MiB").start()))
th.start()
th.join()
print(nodes[0].proc.pid, flush=True)
time.sleep(600)
"""

# The leader starts a process of its own that nothing ties to anything (as vLLM starts its engine core).
GROUP = ["sh", "-c", "sleep 600 & exec sleep 600"]
GROUP_RUNNER = f"""
import sys, time
from pathlib import Path
from memkv.tools.children import TiedGroup

def ppid(p):
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0

g = TiedGroup({GROUP!r})
while not (kids := [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and ppid(p) == g.proc.pid]):
    time.sleep(0.05)
print(g.proc.pid, *kids, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(180)
def test_a_runners_nodes_and_etcd_die_when_it_is_killed(tmp_path: Path) -> None:
    if find_etcd() is None:
        pytest.skip("no etcd binary (apt-get install etcd-server)")
    _children_die_with_their_runner(RUNNER, tmp_path / "run")


@pytest.mark.timeout(180)
def test_a_benchmarks_servers_die_when_it_is_killed(tmp_path: Path) -> None:
    _children_die_with_their_runner(BENCH_RUNNER, tmp_path / "bench")


@pytest.mark.timeout(180)
def test_what_a_tied_groups_leader_started_dies_with_the_runner(tmp_path: Path) -> None:
    _children_die_with_their_runner(GROUP_RUNNER, tmp_path / "group")


def test_a_tied_group_stops_whole() -> None:
    g = TiedGroup(GROUP)
    kids: list[int] = []
    deadline = time.monotonic() + 10.0
    while not kids and time.monotonic() < deadline:
        kids = [pid for pid in _pids() if _ppid(pid) == g.proc.pid]
        time.sleep(0.05)
    assert kids, "the leader started nothing"
    g.stop(timeout=5.0)
    assert g.proc.returncode is not None and not [p for p in kids if _alive(p)]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _children_die_with_their_runner(script: str, workdir: Path) -> None:
    """Run ``script`` (it prints its children's pids, then sleeps), SIGKILL it, and see the
    children end within 10 s."""
    runner = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=ROOT,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    children: list[int] = []
    try:
        assert runner.stdout is not None
        line = runner.stdout.readline()
        assert line, f"the runner ended before its cluster was up: {runner.wait()}"
        children = [int(p) for p in line.split()]
        time.sleep(1.0)  # the threads that started them are gone: that alone must not end them
        assert all(_alive(p) for p in children), children
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 10.0
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if _alive(p)], "children outlived their runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for p in children:  # (only if the test failed)
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
