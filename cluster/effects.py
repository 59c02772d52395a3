"""Sans-IO programs: control-plane decisions written once, run by production and by the simulator.

A *program* is a generator that yields **effects** -- what it needs done: an etcd call, a call to
a node, a sleep, a wait on the cluster view, several programs at once -- and receives each
effect's result (or has the effect's exception thrown in at the ``yield``). The program decides;
whoever drives it does the I/O:

- production: :func:`run_blocking` in a thread (the rebalancer: the real etcd adapter, node RPCs
  over the client pool, waits on the watch cache) or :func:`run_async` on the node's trio loop
  (the source side of a slot copy, ``memkv.cluster.migration``);
- simulation (``memkv.cluster.sim``): a deterministic event loop on a simulated clock, with an
  in-memory etcd and in-memory nodes, faults injected between any two yields.

Why generators rather than injected blocking interfaces: the simulator must be able to stop a
program at every point where real I/O could be slow, fail or interleave with another process,
and it must do so deterministically (one thread, a seeded RNG). A ``yield`` is exactly such a
point, and it is visible in the code that makes the decision (the model is h11's protocol object
and FoundationDB's simulated actors).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
Program = Generator[Any, Any, T]


@dataclass(frozen=True, eq=False)
class EtcdCall:
    """Call ``method`` of the etcd adapter (``memkv.client.etcd.Etcd``); raises ``EtcdUnavailable``."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _EtcdEffects:
    """``yield ETCD.put_if(...)``: the adapter's methods, as effects (same names, same arguments)."""

    def get(self, key: str) -> EtcdCall:
        return EtcdCall("get", (key,))

    def get_prefix(self, prefix: str) -> EtcdCall:
        return EtcdCall("get_prefix", (prefix,))

    def put(self, key: str, value: bytes | str, *, lease: int | None = None) -> EtcdCall:
        return EtcdCall("put", (key, value), {"lease": lease})

    def delete(self, key: str) -> EtcdCall:
        return EtcdCall("delete", (key,))

    def create(self, key: str, value: bytes | str, *, lease: int | None = None) -> EtcdCall:
        return EtcdCall("create", (key, value), {"lease": lease})

    def put_if(self, key: str, value: bytes | str, *, mod_revision: int | None,
               guard: tuple[str, bytes | str] | None = None) -> EtcdCall:
        return EtcdCall("put_if", (key, value), {"mod_revision": mod_revision, "guard": guard})

    def delete_if(self, key: str, value: bytes | str) -> EtcdCall:
        return EtcdCall("delete_if", (key, value))

    def grant(self, ttl: int) -> EtcdCall:
        return EtcdCall("grant", (ttl,))

    def keepalive(self, lease_id: int) -> EtcdCall:
        return EtcdCall("keepalive", (lease_id,))

    def revoke(self, lease_id: int) -> EtcdCall:
        return EtcdCall("revoke", (lease_id,))


ETCD = _EtcdEffects()


@dataclass(frozen=True, eq=False)
class NodeCall:
    """A control-plane request to the node at ``addr`` (HOST:PORT): returns its reply meta,
    raises the node's typed error (``MemKVError``), ``NodeUnavailable``/``ConnectionLost`` if it
    cannot be reached."""

    addr: str
    op: int
    meta: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Sleep:
    """Wait ``seconds`` (a driver that is being stopped may end the wait early)."""

    seconds: float


@dataclass(frozen=True, eq=False)
class WaitView:
    """Wait until ``predicate(view.state)`` holds (True) or ``timeout`` seconds passed (False).

    The view is the process's own cache of the cluster (``ClusterView``), kept by a watch: waiting
    on it is waiting for etcd's news to reach this process."""

    predicate: Callable[[Any], bool]
    timeout: float


@dataclass(frozen=True, eq=False)
class Parallel:
    """Run ``programs`` concurrently; the results in order once all have ended. If some raised,
    the first such exception is raised after all have ended."""

    programs: tuple[Program[Any], ...]


def _advance(program: Program[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``program`` with a result (or an exception): (True, its return value) when it
    ended, else (False, the next effect)."""
    try:
        return False, (program.throw(error) if error is not None else program.send(value))
    except StopIteration as stop:
        return True, stop.value


def run_blocking(program: Program[T], handle: Callable[[Any], Any]) -> T:
    """Drive ``program`` on this thread: ``handle(effect)`` performs each effect (blocking)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        ended, effect = _advance(program, value, error)
        if ended:
            return effect  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = handle(effect)
        except BaseException as exc:  # noqa: BLE001 - thrown into the program: its handlers decide
            error = exc


async def run_async(program: Program[T], handle: Callable[[Any], Awaitable[Any]]) -> T:
    """Drive ``program`` in an async task: ``await handle(effect)`` performs each effect. A
    cancellation is thrown into the program too, so its cleanup (``except``/``finally``) runs."""
    value: Any = None
    error: BaseException | None = None
    while True:
        ended, effect = _advance(program, value, error)
        if ended:
            return effect  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = await handle(effect)
        except BaseException as exc:  # noqa: BLE001 - thrown into the program: its handlers decide
            error = exc
