"""The distribution is laid out as pyproject.toml says (three source folders) and installs its CLI."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# import prefix -> source folder (pyproject [tool.setuptools.package-dir])
FOLDERS = {"memkv": "memkv", "memkv.cluster": "cluster", "memkv.client": "client"}


@pytest.mark.parametrize("name", ["memkv", "memkv.client", "memkv.cluster"])
def test_imports(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__file__ is not None
    folder = ROOT / FOLDERS[name]
    assert Path(mod.__file__).resolve().parent == folder, f"{name} imported from {mod.__file__}"


def test_imports_from_elsewhere(tmp_path: Path) -> None:
    """Works from outside the checkout too (the editable install, not the CWD, finds it)."""
    code = "import memkv, memkv.client, memkv.cluster; print(memkv.client.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == ROOT / "client"


def test_every_package_is_listed_in_pyproject() -> None:
    """setuptools' package list is explicit; a new subpackage must be added to it."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    assert conf["package-dir"] == FOLDERS
    on_disk = set()
    for prefix, folder in FOLDERS.items():
        base = ROOT / folder
        # any folder with Python files: one without __init__.py imports from a checkout
        # (namespace package) but is left out of a wheel unless listed
        for module in base.rglob("*.py"):
            rel = module.parent.relative_to(base)
            if any(p.startswith(".") or p == "__pycache__" or p == "tests" for p in rel.parts):
                continue
            on_disk.add(".".join([prefix, *rel.parts]))
    missing = sorted(on_disk - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - on_disk)
    assert not stale, f"listed in pyproject.toml but not on disk: {stale}"


def _memkv_script() -> str | None:
    return shutil.which("memkv", path=str(Path(sys.executable).parent))


def test_console_script_installed() -> None:
    assert _memkv_script() is not None, f"no memkv script next to {sys.executable}; run make install"


def test_console_script_help() -> None:
    script = _memkv_script()
    assert script is not None
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "serve" in out.stdout
