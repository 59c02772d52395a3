"""An earlier commit of memkv, installed next to the working tree, for ``bench.run --baseline REV``.

A change that claims "no loss" (a refactor of the request path, say) is measured against the
commit before it *in the same run*: both nodes on this machine at the same moment, repeats
interleaved, so noise hurts both alike. The old tree is ``git archive``d and installed (no
dependencies: the current venv has them) into ``~/.cache/memkv/bench-rev/<sha>/lib``, a plain
folder put first on ``sys.path`` of the old node process and of the client processes that
talk to it -- old node *and* old client, so the comparison covers both halves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memkv" / "bench-rev"


def resolve(rev: str, repo: Path) -> str:
    """The full commit id of ``rev`` in ``repo``."""
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def install_revision(rev: str, repo: Path | None = None) -> tuple[str, Path]:
    """(short id, folder to put first on ``sys.path``) for ``rev``; installed once, then cached."""
    repo = repo or Path(__file__).resolve().parent.parent
    sha = resolve(rev, repo)
    lib = CACHE / sha / "lib"
    if not (lib / "memkv" / "__init__.py").exists():
        with tempfile.TemporaryDirectory(prefix="memkv-rev-") as tmp:
            archive = Path(tmp) / "src.tar"
            subprocess.run(["git", "-C", str(repo), "archive", "-o", str(archive), sha], check=True)
            src = Path(tmp) / "src"
            with tarfile.open(archive) as tf:
                tf.extractall(src, filter="data")
            staging = CACHE / sha / "lib.partial"
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
                            str(src)], check=True)  # fmt: skip
            staging.rename(lib)  # only a complete install is ever used
    return sha[:7], lib
