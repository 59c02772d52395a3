"""Sending one call to the nodes of a key: failover reads, replicated writes, and restarts after MOVED.

The policy of the client in one place (docs/cluster.md):

- a **read** goes to the key's first replica; a replica that is dead
  (``FAILOVER_ERRORS``: refused, lost, timed out) is skipped for the next,
  within one timeout each — never a hang;
- a **write** in a cluster goes to every live replica in parallel (every owner
  whose etcd lease is live, then the destinations of a slot being moved). Where
  the replies say ``all`` (the namespace's ``acks``, default for a durable
  namespace: memkv/config.py) it is acknowledged only once *every* live owner
  stored it: an owner the client could not reach (refused, timed out) or that
  was fenced gets it **relayed** by an owner that did store it (``RELAY``,
  memkv/cluster/relay.py: the node-to-node path often survives what cut the
  client off), and if that fails too the write fails with ``NotEnoughReplicas``
  -- so an acknowledged write survives the loss of any one node. An owner the
  map still names but whose lease lapsed (paused, cut off from etcd) cannot
  take it either: the write fails (``NotEnoughReplicas``) until the owner
  registers again or the rebalancer takes it out of the map -- acknowledged
  without it, the write would have one copy once the owner is back as an
  owner (found by the control-plane simulator, docs/control-plane.md).
  Otherwise (``acks = "one"``) such owners are skipped and one stored copy suffices. A
  destination of a slot being moved is never skipped (it owns the slot once the
  move flips), any other error is the caller's (``KeyExists``...), and ``MOVED``
  from any replica wins;
- after ``MOVED(epoch)`` the slot map changed under the operation: the
  router waits for a map at least that new and the **whole operation runs
  again** (``restarting``), so a batch is re-split under the new map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memkv.client.core.calls import Call, RelayCall
from memkv.client.core.requests import Blocking, NodeCall, Op, Parallel
from memkv.client.core.routing import Router
from memkv.client.url import NodeAddress
from memkv.errors import (
    ConnectionLost,
    Fenced,
    MemKVError,
    Moved,
    NodeUnavailable,
    NotEnoughReplicas,
    TimeoutError,
)

# Errors after which the same request may be retried on another replica.
FAILOVER_ERRORS = (ConnectionLost, NodeUnavailable, TimeoutError)
# A write's outcomes on an owner that did not store it but may be skipped (acks "one") or relayed to ("all").
MISSED = (*FAILOVER_ERRORS, Fenced)
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
    Owners it missed get it relayed where no owner may be skipped: its replies say every live owner
    must have it (``call.every_owner``: acks "all"), or ``every(reply)`` says so (``replicated_outcome``)."""
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
    outcomes = with_absent(nodes, replies)
    if call.every_owner or strict(outcomes, every):
        outcomes = yield from relay_missed(router, call, nodes[:len(nodes) - pending], outcomes)
    return replicated_outcome(outcomes, pending, every, every_owner=call.every_owner)


def with_absent(nodes: Sequence[object | None], replies: list[Any]) -> list[Any]:
    """The outcomes of a write in ``nodes``' order: ``replies`` of the nodes it was sent to (those
    not None), and ``NodeUnavailable`` for each owner it could not be sent to (not registered):
    down as far as the client can tell, so ``replicated_outcome`` skips it where a dead owner may
    be skipped and fails the write where none may."""
    it = iter(replies)
    return [next(it) if n is not None else NodeUnavailable("an owner of this key's slot is not registered (its "
                                                           "lease lapsed)") for n in nodes]


def strict(outcomes: list[Any], every: Callable[[Any], bool] | None) -> bool:
    """Whether a reply that came back says no owner may be skipped (``every``)."""
    return every is not None and any(every(r) for r in outcomes if not isinstance(r, MemKVError))


def relay_missed(router: Router, call: Call, owners: Sequence[NodeAddress | None], outcomes: list[Any]) -> Op:
    """``outcomes`` with those of the registered owners the write missed (``MISSED``) replaced by the
    outcome of a relay through an owner that stored it (the first that relays it;
    ``NotEnoughReplicas`` when none could). An owner that is not registered (None: its lease is gone,
    it is leaving the map) is not relayed to. Unchanged when another error decides the write anyway
    (``MOVED``, ``KeyExists``...)."""
    missed = [i for i, r in enumerate(outcomes[:len(owners)]) if isinstance(r, MISSED) and owners[i] is not None]
    if not missed or any(isinstance(r, MemKVError) and not isinstance(r, MISSED) for r in outcomes):
        return outcomes
    to = [str(owners[i]) for i in missed]
    out = list(outcomes)
    failed: MemKVError | None = None  # the last relay's error, if one was tried
    for i, r in enumerate(outcomes[:len(owners)]):
        node = owners[i]
        if isinstance(r, MemKVError) or node is None:
            continue
        relay = RelayCall.of(call, r, to)
        if relay is None:
            return outcomes  # no key was stored there: the per-key errors are the caller's
        try:
            yield from call_node(router, node, relay)
        except Moved:
            raise
        except MemKVError as exc:
            failed = exc if isinstance(exc, NotEnoughReplicas) else NotEnoughReplicas(
                f"relay through {node} to {', '.join(to)} failed: {type(exc).__name__}: {exc.message}")
            continue
        for j in missed:
            out[j] = r
        return out
    if failed is None:
        failed = NotEnoughReplicas(f"no owner that stored the write could relay it to {', '.join(to)}")
    for j in missed:
        out[j] = failed
    return out


def replicated_outcome(outcomes: list[Any], pending: int = 0, every: Callable[[Any], bool] | None = None, *,
                       every_owner: bool = False) -> Any:
    """Combine the outcomes of one write sent to every replica (primary first; the last
    ``pending`` are destinations of a slot being moved, ``ClusterRouter.write_replicas``).

    MOVED from any replica wins (the operation is run again on a fresh map). An owner that missed
    the write (``MISSED``: dead, unreachable, fenced, not registered) is skipped, but at least one
    owner must have stored it (a write only a destination has is lost if the move is abandoned).
    A destination may not be skipped: it owns the slot once the move flips, so a write it lacks
    would be lost when the old owners free the slot (both found by the control-plane simulator,
    docs/control-plane.md). Nor may any owner when a reply that came back satisfies ``every`` (a
    delete in a write-once namespace: its reads trust one replica, so a replica that missed the
    delete would serve the value). ``NotEnoughReplicas`` (a registered owner of an acks "all"
    write that not even a relay reached: ``relay_missed``) is raised, and so is any other error
    (e.g. KeyExists). Nor may an owner be skipped by an acks "all" write (``every_owner``: the
    replies said so): the registered ones it missed were relayed to (``relay_missed``), and one the
    map names that is not registered (its lease lapsed) fails it -- acknowledged without that
    owner, the write would have one copy fewer once the owner registers again and serves the slot
    (the control-plane simulator's *acks* and *exposed*). Otherwise the first storing owner's
    result is returned."""
    errors = [r for r in outcomes if isinstance(r, MemKVError)]
    moved = [e for e in errors if isinstance(e, Moved)]
    if moved:
        raise max(moved, key=lambda e: e.epoch)
    for e in errors:
        if not isinstance(e, MISSED) or isinstance(e, NotEnoughReplicas):
            raise e
    owners = len(outcomes) - pending
    for r in outcomes[:owners] if every_owner else ():
        if isinstance(r, MemKVError):
            raise NotEnoughReplicas(f"acks = all: an owner of this key's slot cannot take the write ({r.message}); "
                                    f"it waits for the owner to register again or to leave the slot map")
    for r in outcomes if strict(outcomes, every) else outcomes[owners:]:
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
