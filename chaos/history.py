"""The recorded history: one :class:`Op` per load-generator operation, plus fault events.

Times are seconds on the runner's monotonic clock, relative to the run's start
(``t0`` when the op was issued, ``t1`` when its outcome was known). ``crc`` is the
crc32 of the value written (put) or returned (get); ``acked`` is true when the
cluster acknowledged the write or answered the read; ``result`` is ``ok``,
``miss`` (a read that found nothing) or ``error`` (``error`` holds the class name).
``phase`` is ``load`` for the load generator, ``final`` for the verification reads
after the fault healed, ``probe`` for targeted requests a scenario makes (e.g. a
write sent to a zombie; ``expect`` says what must happen).
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def crc(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data)


@dataclass
class Op:
    op: str  # "put" | "get" | "delete"
    key: str
    t0: float
    t1: float
    acked: bool
    result: str  # "ok" | "miss" | "error"
    crc: int | None = None
    ns: str = ""
    error: str = ""
    phase: str = "load"
    worker: int = 0
    expect: str = ""  # probes: "refused" = must not be acknowledged

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in ("", None) or k in ("crc",)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Event:
    t: float
    kind: str  # "fault" | "heal" | "info"
    what: str

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "t": self.t, "what": self.what}


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def faults(self) -> list[Event]:
        return [e for e in self.events if e.kind == "fault"]

    def last_heal(self) -> float | None:
        heals = [e.t for e in self.events if e.kind == "heal"]
        return max(heals) if heals else None

    def dump(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for e in self.events:
                f.write(json.dumps(e.to_json()) + "\n")
            for o in self.ops:
                f.write(json.dumps(o.to_json(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> History:
        h = cls()
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            if "event" in d:
                h.events.append(Event(d["t"], d["event"], d["what"]))
            else:
                h.ops.append(Op.from_json(d))
        return h


class Recorder:
    """Thread-safe: load workers, probes and the fault injector all append here.

    ``start`` is the run's time origin on the monotonic clock (shared by every process of the
    machine, and never skewed by the fault shim, which moves wall clocks only), so a load
    worker in another process (:mod:`chaos.worker`) records on the same time line; ``sink``
    also receives every op (that worker streams them to the runner)."""

    def __init__(self, start: float | None = None, sink: Callable[[Op], None] | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.history = History()
        self.sink = sink
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.start

    def add(self, op: Op) -> None:
        with self._lock:
            self.history.ops.append(op)
            if self.sink is not None:
                self.sink(op)

    def event(self, kind: str, what: str, t: float | None = None) -> float:
        """Record an event at ``t`` (default: now; a fault whose injection took a while is
        recorded at the moment its injection began)."""
        t = self.now() if t is None else t
        with self._lock:
            self.history.events.append(Event(t, kind, what))
        return t
