"""What the numbers were measured on: CPU, memory, kernel, versions, git commit."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return None


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    root = Path(__file__).resolve().parent.parent
    return {
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _run("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in ("memkv", "numpy", "redis", "hiredis", "trio", "msgpack", "xxhash")},
        "redis_server": _run("redis-server", "--version"),
        "git_commit": _run("git", "-C", str(root), "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_run("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")),
    }
