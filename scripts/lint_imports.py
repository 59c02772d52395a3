"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

import-linter (through grimp) finds a package's modules by walking its folder, but
``memkv.cluster`` and ``memkv.client`` live in ``cluster/`` and ``client/`` (pyproject's
``[tool.setuptools.package-dir]``), outside ``memkv/``: walked as is, they would be
invisible, and so would every import of them. This builds the package as it is
installed -- a folder ``memkv/`` whose entries link to ``memkv/*``, ``cluster/`` and
``client/`` -- under ``build/import-view`` and runs ``lint-imports`` on it with the
repository's contracts. Exit status: lint-imports' (0: every contract is kept).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_view(dest: Path) -> Path:
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(dest, ignore_errors=True)
    top = dest / "memkv"
    top.mkdir(parents=True)
    for entry in (ROOT / dirs["memkv"]).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in dirs.items():
        if name != "memkv":
            (top / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return dest


def main() -> int:
    view = build_view(ROOT / "build" / "import-view")
    lint = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(view))
    # run from the view: import-linter puts the working directory first on sys.path
    return subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=view,
                          env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
