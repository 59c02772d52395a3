"""The etcd adapter: every etcd access of memkv (nodes, leader, clients, tools) goes through here.

It wraps ``pyetcd`` (etcd-sdk-python, a maintained fork of python-etcd3; see
docs/cluster.md). pyetcd is synchronous: call these methods from a thread
(``trio.to_thread.run_sync`` in trio code). Every failure (etcd down, timeout,
gRPC error) surfaces as :class:`EtcdUnavailable`, nothing else.

It lives in ``memkv.client`` rather than ``memkv.cluster`` because clients
watch etcd too and dependencies point one way (cluster -> client -> memkv).

Three pyetcd traps are handled here:
- ``Endpoint(time_retry=0.5)``: with the default (300 s) one etcd blip marks
  the endpoint failed for five minutes;
- gRPC's reconnect backoff grows to two minutes by default; it is capped at
  one second so that a restarted etcd is found again quickly;
- pyetcd has one timeout for every RPC; here a call that may be sent again
  gives each attempt a share of the call's timeout (``client/etcd_attempts.py``), so
  that a member which holds a request without answering leaves time to ask
  another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memkv.errors import NodeUnavailable

_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


# A call that may be sent again tries each member for at most this share of its timeout, but
# never less than ATTEMPT_MIN_S (a healthy member answers in milliseconds; a loaded one's fsync may
# stall for hundreds): with the default 3 s, three tries of 1 s; with 1 s or less, one try.
ATTEMPT_SHARE = 1 / 3
ATTEMPT_MIN_S = 1.0


class EtcdUnavailable(NodeUnavailable):
    """etcd could not be reached or did not answer in time."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    key: str
    value: bytes | None  # None: deleted
    mod_revision: int


def parse_endpoints(text: str | list[tuple[str, int]] | tuple[Any, ...]) -> list[tuple[str, int]]:
    """``"h1:2379,h2:2379"`` -> ``[("h1", 2379), ("h2", 2379)]`` (also accepts addresses)."""
    if not isinstance(text, str):
        return [(getattr(e, "host", None) or e[0], int(getattr(e, "port", None) or e[1])) for e in text]
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host:
            host, port = part, "2379"
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError(f"no etcd endpoint in {text!r}")
    return out


class Etcd:
    """A blocking etcd v3 client (thread-safe; one per process part is plenty)."""

    def __init__(self, endpoints: str | list[tuple[str, int]] | tuple[Any, ...], *, timeout: float = 3.0) -> None:
        import pyetcd

        from memkv.client.etcd_attempts import AttemptClient

        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        eps = [pyetcd.Endpoint(h, p, secure=False, time_retry=0.5, opts=_GRPC_OPTIONS) for h, p in self.endpoints]
        self._client = AttemptClient(endpoints=eps, timeout=timeout, failover=True)
        self._tx = self._client.transactions
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "Etcd(" + ",".join(f"{h}:{p}" for h, p in self.endpoints) + ")"

    def _do(self, fn: Callable[..., Any], *args: Any, again: bool = False, **kwargs: Any) -> Any:
        """Call pyetcd; every failure becomes EtcdUnavailable.

        With several endpoints pyetcd marks one that fails and moves to another for the *next*
        call; it never retries (MultiEndpointEtcd3Client's contract). So a call that may safely
        run twice (``again``: reads, put, delete, lease grant/keepalive/revoke) is sent again to
        the next endpoint when its endpoint refused it or timed out (a member that is down
        refuses; one killed under an open connection times out; the survivors refuse writes
        while they elect a new leader), until the client's timeout has passed -- one dead member
        of a 3-member etcd then costs no caller an error (tests/test_etcd_members.py).

        Each attempt of such a call has ``ATTEMPT_SHARE`` of the timeout (at least
        ``ATTEMPT_MIN_S``; the last what is left): a follower that still takes a killed
        leader for alive holds a put until etcd's own request timeout (seconds), and an
        attempt given the whole budget left none to ask again once a leader was elected. A transaction
        (compare-and-set) is not sent again: it may have applied before the connection
        broke; its one attempt has the whole timeout."""
        import grpc
        import pyetcd
        from pyetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError, NoServerAvailableError

        now = time.monotonic()
        deadline = now + self.timeout
        share = max(ATTEMPT_MIN_S, self.timeout * ATTEMPT_SHARE) if again and len(self.endpoints) > 1 \
            else self.timeout
        tries = 0
        while True:
            if self._closed:
                raise EtcdUnavailable("etcd client is closed")
            tries += 1
            # every endpoint once (even past the deadline: a refusal is quick), then until the timeout
            attempt = max(min(share, deadline - now), min(ATTEMPT_MIN_S, self.timeout))
            try:
                with self._client.attempt(attempt):
                    return fn(*args, **kwargs)
            except (pyetcd.Etcd3Exception, grpc.RpcError, ValueError) as exc:
                # ValueError: pyetcd's "Trying to use a failed node" inside the retry window;
                # NoServerAvailableError: every endpoint failed within it.
                now = time.monotonic()
                left = deadline - now
                if again and (tries < len(self.endpoints) or left > 0) and isinstance(
                        exc, (ConnectionFailedError, ConnectionTimeoutError, NoServerAvailableError, ValueError)):
                    time.sleep(min(0.1, max(0.0, left)))  # an election after a leader died takes a moment
                    now = time.monotonic()
                    continue
                raise EtcdUnavailable(f"etcd {self!r}: {type(exc).__name__}: {exc}") from None

    # -- keys
    def get(self, key: str) -> tuple[KV | None, int]:
        """(the key or None, the store revision)."""
        resp = self._do(self._client.get_response, key, again=True)
        kv = resp.kvs[0] if resp.count else None
        return (KV(kv.key.decode(), kv.value, kv.mod_revision) if kv is not None else None), resp.header.revision

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        resp = self._do(self._client.get_prefix_response, prefix, again=True)
        return [KV(kv.key.decode(), kv.value, kv.mod_revision) for kv in resp.kvs], resp.header.revision

    def put(self, key: str, value: bytes | str, *, lease: int | None = None) -> None:
        self._do(self._client.put, key, value, lease=lease, again=True)

    def delete(self, key: str) -> bool:
        return bool(self._do(self._client.delete, key, again=True))

    def create(self, key: str, value: bytes | str, *, lease: int | None = None) -> bool:
        """Put ``key`` only if it does not exist; True when this call created it."""
        ok, _ = self._do(self._client.transaction,
                         compare=[self._tx.create(key) == 0],
                         success=[self._tx.put(key, value, lease)], failure=[])
        return bool(ok)

    def put_if(self, key: str, value: bytes | str, *, mod_revision: int | None,
               guard: tuple[str, bytes | str] | None = None) -> bool:
        """Put ``key`` only if it was last modified at ``mod_revision`` (0: absent; None: any)
        and, when given, the key ``guard[0]`` holds the value ``guard[1]``."""
        compare = [self._tx.mod(key) == mod_revision] if mod_revision is not None else []
        if guard is not None:
            compare.append(self._tx.value(guard[0]) == guard[1])
        ok, _ = self._do(self._client.transaction, compare=compare, success=[self._tx.put(key, value)], failure=[])
        return bool(ok)

    def delete_if(self, key: str, value: bytes | str) -> bool:
        """Delete ``key`` only if it holds ``value`` (give up a leadership we hold)."""
        ok, _ = self._do(self._client.transaction, compare=[self._tx.value(key) == value],
                         success=[self._tx.delete(key)], failure=[])
        return bool(ok)

    # -- leases
    def grant(self, ttl: int) -> int:
        return int(self._do(self._client.lease, int(ttl), again=True).id)

    def keepalive(self, lease_id: int) -> int:
        """Renew a lease; returns its TTL, 0 when the lease no longer exists."""
        responses = self._do(lambda: list(self._client.refresh_lease(lease_id)), again=True)
        return int(responses[0].TTL) if responses else 0

    def revoke(self, lease_id: int) -> None:
        self._do(self._client.revoke_lease, lease_id, again=True)

    # -- watches
    def watch_prefix(self, prefix: str, start_revision: int,
                     callback: Callable[[list[WatchEvent] | int | Exception], None]) -> int:
        """Watch ``prefix`` from ``start_revision``; returns the watch id.

        ``callback`` runs on pyetcd's watch thread with a list of events (an
        empty list is a progress notification), or with an exception when the
        watch broke: then the caller re-lists and watches again.
        """
        from pyetcd.events import DeleteEvent

        def on_response(resp: Any) -> None:
            if isinstance(resp, Exception):
                callback(resp)
                return
            events = [WatchEvent(ev.key.decode(), None if isinstance(ev, DeleteEvent) else ev.value,
                                 ev.mod_revision) for ev in resp.events]
            callback(events)

        return int(self._do(self._client.add_watch_prefix_callback, prefix, on_response,
                            start_revision=start_revision))

    def cancel_watch(self, watch_id: int) -> None:
        try:
            self._do(self._client.cancel_watch, watch_id)
        except EtcdUnavailable:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
