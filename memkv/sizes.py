"""Parsing of human-written sizes (``512MiB``) and durations (``24h``)."""

from __future__ import annotations

import re

from memkv.errors import InvalidArgument

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}
_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296. Integers pass through."""
    if isinstance(text, int):
        return text
    m = _NUM_UNIT.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise InvalidArgument(f"bad size {text!r} (write it like 512MiB or 4GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str | float | int | None) -> float | None:
    """``"24h"`` -> 86400.0 seconds; ``None``/``"none"``/0 mean no limit."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if text > 0 else None
    if text.strip().lower() in ("", "none", "0"):
        return None
    m = _NUM_UNIT.match(text)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise InvalidArgument(f"bad duration {text!r} (write it like 30s, 15m or 24h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
