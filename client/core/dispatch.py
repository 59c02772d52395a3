"""Sending one call to the nodes of a key: failover reads, replicated writes, and restarts after MOVED.

The policy of the client in one place (docs/cluster.md):

- a **read** goes to the key's first replica; a replica that is dead
  (``FAILOVER_ERRORS``: refused, lost, timed out) is skipped for the next,
  within one timeout each — never a hang;
- a **write** in a cluster goes to every live replica in parallel and is
  acknowledged when every replica that is alive stored it: dead or fenced
  owners are skipped (at least one must succeed), a destination of a slot
  being moved is not (it owns the slot once the move flips), any other error
  is the caller's (``KeyExists``...), and ``MOVED`` from any replica wins;
- after ``MOVED(epoch)`` the slot map changed under the operation: the
  router waits for a map at least that new and the **whole operation runs
  again** (``restarting``), so a batch is re-split under the new map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memkv.client.core.calls import Call
from memkv.client.core.requests import Blocking, NodeCall, Op, Parallel
from memkv.client.core.routing import Router
from memkv.client.url import NodeAddress
from memkv.errors import ConnectionLost, Fenced, MemKVError, Moved, NodeUnavailable, TimeoutError

# Errors after which the same request may be retried on another replica.
FAILOVER_ERRORS = (ConnectionLost, NodeUnavailable, TimeoutError)
# Cluster: how often one operation is run again after MOVED (slot map changed) before giving up.
MOVED_RETRIES = 5


def call_node(router: Router, node: NodeAddress, call: Call) -> Op:
    """``call`` on ``node`` itself (stamped with the slot-map epoch): no failover."""
    router.stamp(call.meta)
    return (yield NodeCall(node, call))


def read(router: Router, call: Call, key: bytes) -> Op:
    """``call`` on the first of ``key``'s replicas that answers: ``(result, the node that answered)``."""
    last: MemKVError | None = None
    for node in router.replicas(key):
        router.stamp(call.meta)
        try:
            return (yield NodeCall(node, call)), node
        except FAILOVER_ERRORS as exc:
            last = exc
    raise last if last is not None else NodeUnavailable("no replica for key")


def write(router: Router, call: Call, key: bytes, *, every: Callable[[Any], bool] | None = None) -> Op:
    """``call`` (a write) on ``key``'s node, or on every live replica of its slot in a cluster.
    ``every(reply)``: whether that reply says no owner may be skipped (``replicated_outcome``)."""
    if not router.clustered:
        nodes = router.replicas(key)
        if not nodes:
            raise NodeUnavailable("no live replica for this key's slot")
        return (yield from call_node(router, nodes[0], call))
    nodes, pending = router.write_replicas(key)
    reachable = [n for n in nodes if n is not None]
    if not reachable:
        raise NodeUnavailable("no live replica for this key's slot")
    replies = yield Parallel([call_node(router, n, call) for n in reachable])
    return replicated_outcome(with_absent(nodes, replies), pending, every)


def with_absent(nodes: Sequence[object | None], replies: list[Any]) -> list[Any]:
    """The outcomes of a write in ``nodes``' order: ``replies`` of the nodes it was sent to (those
    not None), and ``NodeUnavailable`` for each owner it could not be sent to (not registered):
    down as far as the client can tell, so ``replicated_outcome`` skips it where a dead owner may
    be skipped and fails the write where none may."""
    it = iter(replies)
    return [next(it) if n is not None else NodeUnavailable("an owner of this key's slot is not registered")
            for n in nodes]


def replicated_outcome(outcomes: list[Any], pending: int = 0, every: Callable[[Any], bool] | None = None) -> Any:
    """Combine the outcomes of one write sent to every replica (primary first; the last
    ``pending`` are destinations of a slot being moved, ``ClusterRouter.write_replicas``).

    MOVED from any replica wins (the operation is run again on a fresh map).
    Owners that are dead (failover errors) or fenced did not store it and are
    not live: they are skipped, but at least one owner must have stored it (a write only a
    destination has is lost if the move is abandoned). A destination may not be skipped: it
    owns the slot once the move flips, so a write it lacks would be lost when the old owners
    free the slot (both found by the control-plane simulator, docs/control-plane.md). Nor may
    an owner when a reply that came back satisfies ``every`` (a delete in a write-once
    namespace: its reads trust one replica, so a replica that missed the delete would serve the
    value). Any other error (e.g. KeyExists) is raised. Otherwise the first replica's result is
    returned."""
    errors = [r for r in outcomes if isinstance(r, MemKVError)]
    moved = [e for e in errors if isinstance(e, Moved)]
    if moved:
        raise max(moved, key=lambda e: e.epoch)
    for e in errors:
        if not isinstance(e, (*FAILOVER_ERRORS, Fenced)):
            raise e
    owners = len(outcomes) - pending
    strict = every is not None and any(every(r) for r in outcomes if not isinstance(r, MemKVError))
    for r in outcomes if strict else outcomes[owners:]:
        if isinstance(r, MemKVError):
            raise r
    for r in outcomes[:owners]:
        if not isinstance(r, MemKVError):
            return r
    raise errors[0] if errors else NodeUnavailable("no owner of this key's slot is live")


def gather(ops: list[Op]) -> Op:
    """Run ``ops`` concurrently (a single one in place); their results in order, or the first failure."""
    if len(ops) == 1:
        return [(yield from ops[0])]
    results = yield Parallel(ops)
    for r in results:
        if isinstance(r, MemKVError):
            raise r
    return results


def restarting(router: Router, fn: Callable[..., Op], *args: Any, **kwargs: Any) -> Op:
    """``fn(*args, **kwargs)``, run again from the start after MOVED (at most ``MOVED_RETRIES`` times).

    One-shot iterators among the arguments are turned into lists first, so a
    second run sees the same keys."""
    args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
    kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
    moved = 0
    while True:
        try:
            return (yield from fn(*args, **kwargs))
        except Moved as exc:
            moved += 1
            if moved > MOVED_RETRIES:
                raise
            yield Blocking(router.refresh, exc.epoch)
