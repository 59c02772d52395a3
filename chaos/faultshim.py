"""The fault shim (chaos/shim/faultshim.c): clock skew and slow fsync for one process.

:func:`build` compiles it once per run (``cc``, from Debian's build-essential) into the
run's directory; :func:`env` gives a process the environment that preloads it with its own
control file, and :class:`FaultFile` writes that file (the shim re-reads it within 100 ms,
so faults start and heal while the process runs). See the C file for why this and not
libfaketime or dm-delay.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "shim" / "faultshim.c"


class ShimUnavailable(Exception):
    """The shim could not be built here (the reason says why)."""


def build(dest_dir: Path) -> Path:
    """Compile the shim into ``dest_dir``; returns the .so path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ShimUnavailable("no C compiler (apt-get install build-essential)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / "faultshim.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SOURCE), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ShimUnavailable(f"cc faultshim.c failed: {r.stderr.strip()[-500:]}")
    return out


def env(shim: Path, control: Path) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim), "MEMKV_FAULTS_FILE": str(control)}


class FaultFile:
    """One process's control file: ``clock_offset_ms`` and ``fsync_delay_ms``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock_offset_ms = 0
        self.fsync_delay_ms = 0
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"clock_offset_ms={int(self.clock_offset_ms)}\nfsync_delay_ms={int(self.fsync_delay_ms)}\n")
        tmp.replace(self.path)  # the shim never reads half a file

    def skew(self, seconds: float) -> None:
        self.clock_offset_ms = int(seconds * 1000)
        self.write()

    def slow_fsync(self, ms: float) -> None:
        self.fsync_delay_ms = int(ms)
        self.write()
