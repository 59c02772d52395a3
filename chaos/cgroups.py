"""Control groups for the local chaos target: one per process (each node, etcd), made under
the runner's own cgroup, in every hierarchy that is usable here.

Two uses:
- **classification** (cgroup v2 hierarchy, any controllers): iptables' ``-m cgroup --path``
  matches the cgroup of the socket that sent a packet, so :mod:`chaos.netfault` can tell
  node n1's packets from n2's and from the clients' although all of them use 127.0.0.1;
- **memory limits** (the memory controller, v2 ``memory.max`` or v1
  ``memory.limit_in_bytes``, whichever hierarchy has it): the OOM scenario limits one
  node's group and lets the kernel's OOM killer pick its victim there.

A process joins its group before it runs anything: :meth:`ProcessGroups.wrap` prefixes the
command with a shell that writes its own pid into each group's ``cgroup.procs`` and then
execs the command, so every socket the process ever opens belongs to the group.

A runner killed with SIGKILL cannot remove its groups (its processes die with it,
memkv/tools/children.py, but the empty directories stay). So every runner holds an flock on
``/tmp/memkv-chaos-cgroups/<tag>.lock`` while its groups exist, and at start removes the
``memkv-chaos-*`` groups whose lock file is there and free: their runner is gone. A group
without a lock file (made by older code, or by a runner whose /tmp is not ours) or whose lock
is held (a live runner: its groups may be empty, e.g. while it restarts a killed node) is left
alone; the kernel refuses to remove a group that still has processes.

On this machine (Debian 12 guest, kernel 6.18): a hybrid layout -- cgroup v2 mounted at
/sys/fs/cgroup/unified with no controllers, memory on v1 at /sys/fs/cgroup/memory.
On a pure v2 host both live in /sys/fs/cgroup. The v1 memory path is what ran here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "memkv-chaos-"
# <tag>.lock, held while its runner lives. Not under $TMPDIR: cgroups are the machine's, so must be
# the locks that say whose they are (a test runs a runner with a TMPDIR of its own).
LOCKS = Path("/tmp/memkv-chaos-cgroups")
_TAG = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Hierarchy:
    mount: Path   # where the hierarchy is mounted
    own: str      # this process's cgroup inside it ("/..."), from /proc/self/cgroup
    version: int  # 1 or 2

    @property
    def base(self) -> Path:
        return self.mount / self.own.lstrip("/")


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[1], parts[2], parts[3]))
    return out


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def unified() -> Hierarchy | None:
    """The cgroup v2 hierarchy (for ``iptables -m cgroup --path``), if mounted and writable."""
    own = _own_paths().get("")
    for mount, kind, _ in _mounts():
        if kind == "cgroup2" and own is not None and os.access(mount, os.W_OK):
            return Hierarchy(Path(mount), own, 2)
    return None


def memory() -> Hierarchy | None:
    """The hierarchy that has the memory controller (v2 when it is enabled there, else v1)."""
    own = _own_paths()
    v2 = unified()
    if v2 is not None:
        ctrls = (v2.base / "cgroup.subtree_control")
        with contextlib.suppress(OSError):
            if "memory" in ctrls.read_text().split():
                return v2
    for mount, kind, opts in _mounts():
        if kind == "cgroup" and "memory" in opts.split(",") and "memory" in own and os.access(mount, os.W_OK):
            return Hierarchy(Path(mount), own["memory"], 1)
    return None


class ProcessGroups:
    """Per-member cgroups under ``<own cgroup>/memkv-chaos-<tag>`` in the usable hierarchies."""

    def __init__(self, tag: str) -> None:
        if not _TAG.fullmatch(tag):
            raise ValueError(f"cgroup tag {tag!r}: letters, digits, '-' and '_' only")
        self.tag = tag
        self.net = unified()
        self.mem = memory()
        self.members: set[str] = set()
        self._lock: int | None = None
        if self.net is not None or self.mem is not None:
            try:
                self._lock = _hold(LOCKS / f"{tag}.lock")
            except OSError:  # no lock: other runners leave these groups alone (and nobody removes them)
                return
            remove_stale(self.hierarchies)

    @property
    def hierarchies(self) -> list[Hierarchy]:
        return [h for h in (self.net, self.mem) if h is not None]

    def _dir(self, h: Hierarchy, member: str) -> Path:
        return h.base / f"{PREFIX}{self.tag}" / member

    def net_path(self, member: str) -> str | None:
        """The member's path as ``iptables -m cgroup --path`` wants it (relative to the v2 root)."""
        if self.net is None:
            return None
        return str(self._dir(self.net, member).relative_to(self.net.mount))

    def add(self, member: str) -> None:
        for h in (self.net, self.mem):
            if h is not None:
                self._dir(h, member).mkdir(parents=True, exist_ok=True)
        self.members.add(member)

    def wrap(self, member: str, cmd: list[str]) -> list[str]:
        """``cmd`` run as a member of ``member``'s groups from its first instruction on."""
        if member not in self.members:
            self.add(member)
        procs = [self._dir(h, member) / "cgroup.procs" for h in (self.net, self.mem) if h is not None]
        if not procs:
            return cmd
        joins = " && ".join(f"echo $$ > {shlex.quote(str(p))}" for p in procs)
        return ["sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]

    # -- memory
    def _mem_file(self, member: str, v1: str, v2: str) -> Path:
        if self.mem is None:
            raise OSError("no usable memory cgroup hierarchy")
        return self._dir(self.mem, member) / (v1 if self.mem.version == 1 else v2)

    def memory_usage(self, member: str) -> int:
        return int(self._mem_file(member, "memory.usage_in_bytes", "memory.current").read_text())

    def set_memory_limit(self, member: str, limit: int | None) -> None:
        """Limit (bytes) the member's memory; None lifts the limit."""
        if self.mem is not None and self.mem.version == 1:
            # memsw (memory + swap) must stay >= memory: lower memory first, lift memsw first
            mem = self._mem_file(member, "memory.limit_in_bytes", "")
            memsw = self._mem_file(member, "memory.memsw.limit_in_bytes", "")
            value = "-1" if limit is None else str(limit)
            for f in ((memsw, mem) if limit is None else (mem, memsw)):
                if f is memsw and not f.exists():  # no swap accounting on this kernel
                    continue
                f.write_text(value)
        else:
            self._mem_file(member, "", "memory.max").write_text("max" if limit is None else str(limit))
            with contextlib.suppress(OSError):
                self._mem_file(member, "", "memory.swap.max").write_text("max" if limit is None else "0")

    def oom_kills(self, member: str) -> int:
        """How many processes the kernel's OOM killer killed in the member's group."""
        path = self._mem_file(member, "memory.oom_control", "memory.events")
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def close(self) -> None:
        """Remove the groups (they must be empty: call after every member process exited), then
        the lock file -- kept if a group is still there, so that the next runner removes it."""
        gone = True
        for h in self.hierarchies:
            for member in self.members:
                # a killed process leaves its group a moment later
                _rmdir(h.base / f"{PREFIX}{self.tag}" / member, tries=50)
            gone = _rmdir(h.base / f"{PREFIX}{self.tag}") and gone
        if self._lock is not None:
            if gone:
                with contextlib.suppress(OSError):
                    (LOCKS / f"{self.tag}.lock").unlink()
            os.close(self._lock)
            self._lock = None


def _rmdir(d: Path, tries: int = 1) -> bool:
    """Remove the (empty) cgroup ``d``; True when it is gone."""
    for i in range(tries):
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if i + 1 < tries:
                time.sleep(0.1)
    return False


def _hold(path: Path) -> int:
    """An fd holding the flock on ``path`` (created). A lock file another runner unlinked between
    our open and our lock (``remove_stale``) is not the one at ``path``: open it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def remove_stale(hierarchies: list[Hierarchy]) -> list[Path]:
    """Remove the ``memkv-chaos-<tag>`` groups of runners that are gone (see the module's
    docstring: the lock file exists and nobody holds it) and that are empty; the groups removed."""
    removed: list[Path] = []
    tags: set[str] = set()
    for h in hierarchies:
        with contextlib.suppress(OSError):
            tags |= {d.name.removeprefix(PREFIX) for d in h.base.iterdir() if d.name.startswith(PREFIX)}
    for tag in sorted(t for t in tags if _TAG.fullmatch(t)):
        path = LOCKS / f"{tag}.lock"
        try:
            fd = os.open(path, os.O_RDWR)  # no lock file: not a group this scheme manages
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its runner is alive
            gone = True
            for h in hierarchies:
                top = h.base / f"{PREFIX}{tag}"
                if not top.exists():
                    continue
                with contextlib.suppress(OSError):
                    for member in [d for d in top.iterdir() if d.is_dir()]:
                        _rmdir(member)  # the kernel keeps a group that has processes
                if _rmdir(top):
                    removed.append(top)
                else:
                    gone = False
            if gone:
                with contextlib.suppress(OSError):
                    path.unlink()  # while locked: a runner that opened it meanwhile sees it gone (_hold)
        finally:
            os.close(fd)
    return removed
