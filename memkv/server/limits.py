"""Resource limits of a node: no single client may exhaust its memory or file descriptors.

The node makes one :class:`Hardening` (``node.hardening``); the binary connections
(``connection.py``, ``tls.py``) and the RESP front end (``resp.py``) use it, and the
pipeline's in-flight stage (``stages.InFlight``) reserves a tenant's bytes with it.
Configuration: TOML ``[limits]`` (``memkv.config.LimitsConfig``).

* **Connections** (``max_connections``, binary + RESP together, clamped below the
  process's ``RLIMIT_NOFILE``): a connection beyond it gets one typed error frame
  (``TooManyConnections``; RESP: ``-ERR max number of clients reached``) and is closed.
* **In flight per connection** (``max_inflight_bytes``): queued reply bytes plus the
  reserved-but-unfilled payload of the PUT being received. Replies are flushed (and the
  socket is not read meanwhile) before a request would take the connection over the
  limit, so a client that pipelines without reading is throttled by TCP back-pressure,
  never buffered without bound. A PUT payload larger than the limit is refused
  (``ResourceLimit``; payload discarded, connection kept). RESP: an incomplete command
  holding more than the limit in the parser is refused and the connection closed.
* **In flight per tenant** (``tenant_inflight_bytes``): PUT reservations being filled,
  summed over the tenant's connections; beyond it -> ``ResourceLimit``.
* **Timeouts** (slowloris): between requests a connection may idle ``idle_timeout``
  seconds (0 = forever); a started frame must be complete (header + meta) within
  ``frame_timeout``; a PUT payload of N bytes must arrive within ``frame_timeout +
  N / min_payload_rate``; a reply that makes no progress for ``write_timeout`` (a client
  that stopped reading) closes the connection.

Timeouts cost the request path nothing but two attribute writes per wait: a
connection stores the deadline of the wait it is parked in (``deadline``), and one
reaper task cancels the connections whose deadline has passed.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections import Counter
from typing import Any

import trio

from memkv.config import LimitsConfig
from memkv.errors import ResourceLimit

log = logging.getLogger("memkv.limits")

INF = math.inf
FD_RESERVE = 64  # descriptors kept for data files, listeners, etcd, ...
MAX_REFUSING = 64  # refused connections being closed gracefully at once (beyond: closed at once)


class Watched:
    """Mixin for a connection: deadline-aware waits on its socket (``self.sock``).

    The owner sets the *phase* (``_phase_idle`` / ``_phase_frame`` / ``_phase_payload``);
    ``_wait_readable`` / ``_wait_writable`` publish the matching deadline in
    ``self.deadline`` while parked, for the reaper.
    """

    sock: Any
    hard: Hardening | None = None
    deadline: float = INF
    wait_kind: str = ""
    timed_out: str = ""
    scope: trio.CancelScope | None = None
    _phase_kind: str = "idle"
    _phase_deadline: float | None = None
    _frame_t0: float | None = None

    def _phase_idle(self) -> None:
        self._phase_kind = "idle"
        self._phase_deadline = None
        self._frame_t0 = None

    def _phase_frame(self) -> None:
        """Part of a frame is buffered: it must be complete ``frame_timeout`` after its first byte."""
        h = self.hard
        if h is None:
            return
        if self._frame_t0 is None:
            self._frame_t0 = time.monotonic()
        self._phase_kind = "frame"
        self._phase_deadline = self._frame_t0 + h.frame_timeout

    def _phase_payload(self, nbytes: int) -> None:
        h = self.hard
        if h is None:
            return
        self._phase_kind = "payload"
        self._phase_deadline = time.monotonic() + h.frame_timeout + (nbytes / h.min_payload_rate
                                                                     if h.min_payload_rate else INF)

    async def _wait_readable(self) -> None:
        h = self.hard
        if h is not None:
            d = self._phase_deadline
            self.deadline = time.monotonic() + h.idle_timeout if d is None else d
            self.wait_kind = self._phase_kind
        try:
            await trio.lowlevel.wait_readable(self.sock)
        finally:
            self.deadline = INF

    async def _wait_writable(self) -> None:
        h = self.hard
        if h is not None:
            self.deadline = time.monotonic() + h.write_timeout
            self.wait_kind = "write"
        try:
            await trio.lowlevel.wait_writable(self.sock)
        finally:
            self.deadline = INF


def _fd_limit() -> int:
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1 << 30
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


class Hardening:
    def __init__(self, cfg: LimitsConfig | None = None) -> None:
        self.cfg = cfg = cfg or LimitsConfig()
        fds = _fd_limit()
        self.max_connections = min(cfg.max_connections, max(8, fds - FD_RESERVE - MAX_REFUSING))
        if self.max_connections < cfg.max_connections:
            log.warning("[limits] max_connections %d lowered to %d (RLIMIT_NOFILE is %d)",
                        cfg.max_connections, self.max_connections, fds)
        self.max_inflight = cfg.max_inflight_bytes
        self.tenant_limit = cfg.tenant_inflight_bytes
        self.idle_timeout = cfg.idle_timeout or INF
        self.frame_timeout = cfg.frame_timeout or INF
        self.min_payload_rate = cfg.min_payload_rate
        self.write_timeout = cfg.write_timeout or INF
        self.conns: set[Watched] = set()
        self.open = 0  # admitted connections (counted from accept, before their task runs)
        self.tenant_inflight: Counter[str] = Counter()
        self.refusing = 0
        self.counters: Counter[str] = Counter()
        self.tenant_refusals: Counter[str] = Counter()  # tenant_inflight_refusals per tenant
        timeouts = [t for t in (self.idle_timeout, self.frame_timeout, self.write_timeout) if t != INF]
        self.tick = max(0.05, min([1.0, *(t / 4 for t in timeouts)]))

    # -- connections
    def admit(self) -> bool:
        """Count a new connection in, or say it must be refused (then call ``refuse``)."""
        if self.open < self.max_connections:
            self.open += 1
            return True
        self.counters["refused_connections"] += 1
        return False

    def closed(self) -> None:
        """An admitted connection is gone."""
        self.open -= 1

    def register(self, conn: Watched, scope: trio.CancelScope) -> None:
        conn.scope = scope
        conn.hard = self
        self.conns.add(conn)

    def unregister(self, conn: Watched) -> None:
        self.conns.discard(conn)

    async def refuse(self, sock: Any, notice: bytes) -> None:
        """Send ``notice``, stop writing, drain the peer's bytes briefly, close (so the notice is
        read rather than lost to a reset)."""
        with sock:
            try:
                sock.send(notice)
                sock.shutdown(2 if self.refusing >= MAX_REFUSING else 1)
            except OSError:
                return
            if self.refusing >= MAX_REFUSING:
                return
            self.refusing += 1
            try:
                with trio.move_on_after(1.0):
                    while True:
                        await trio.lowlevel.wait_readable(sock)
                        try:
                            if not sock.recv(65536):
                                return
                        except BlockingIOError:
                            continue
                        except OSError:
                            return
            finally:
                self.refusing -= 1

    async def reap(self) -> None:
        """Cancel the connections parked past their deadline."""
        while True:
            await trio.sleep(self.tick)
            now = time.monotonic()
            for conn in list(self.conns):
                if conn.deadline < now and conn.scope is not None and not conn.timed_out:
                    conn.timed_out = conn.wait_kind or "idle"
                    self.counters[f"timeouts_{conn.timed_out}"] += 1
                    conn.scope.cancel()

    # -- in-flight bytes per tenant
    def reserve_tenant(self, tenant: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        have = self.tenant_inflight[tenant]
        if have + nbytes > self.tenant_limit:
            self.counters["tenant_inflight_refusals"] += 1
            self.tenant_refusals[tenant] += 1
            raise ResourceLimit(f"tenant {tenant or '(anonymous)'!r} has {have} bytes of writes in flight; "
                                f"{nbytes} more would exceed its limit of {self.tenant_limit}")
        self.tenant_inflight[tenant] = have + nbytes

    def release_tenant(self, tenant: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        left = self.tenant_inflight[tenant] - nbytes
        if left > 0:
            self.tenant_inflight[tenant] = left
        else:
            del self.tenant_inflight[tenant]

    def check_put(self, nbytes: int) -> None:
        """A PUT's payload must fit the per-connection in-flight limit."""
        if nbytes > self.max_inflight:
            self.counters["inflight_refusals"] += 1
            raise ResourceLimit(f"a write of {nbytes} bytes exceeds the per-connection in-flight limit of "
                                f"{self.max_inflight} bytes ([limits] max_inflight_bytes)")

    def stats(self) -> dict[str, Any]:
        return {"connections": self.open, "max_connections": self.max_connections,
                "tenant_inflight": dict(self.tenant_inflight), **dict(self.counters)}

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """What one tenant may see of the limits: its own bytes in flight and refusals."""
        have = self.tenant_inflight.get(tenant, 0)
        return {"tenant_inflight": {tenant: have} if have else {},
                "tenant_inflight_refusals": self.tenant_refusals[tenant]}
