"""The ownership rule a cluster node applies to every routed request (pure; no I/O).

A request stamped with the client's slot-map epoch (``ep``) is served only if the node owns
every key's slot in its own map; a write is refused when the client's map is older than the
node's (the slot may have moved since: the client refreshes and retries), and accepted when it
is newer (the client's map names this node: it is the authority). ``ClusterMember.check`` runs
this on the node's request path; the control-plane simulator's nodes run it on theirs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memkv.client.cluster_map import SlotMap, key_slot
from memkv.errors import Moved


def route_check(sm: SlotMap | None, me: str, ep: Any, keys: Iterable[bytes], write: bool) -> None:
    """Raise ``Moved`` (with the node's epoch) unless node ``me`` may serve ``keys`` for a client at ``ep``."""
    if sm is None:
        raise Moved(f"node {me} has no slot map yet (epoch 0)", 0)
    if not isinstance(ep, int):
        return
    if ep > sm.epoch:
        return  # the client has a newer map than ours (which names us): it is the authority
    if write and ep < sm.epoch:
        raise Moved(f"slot map changed: node {me} is at epoch {sm.epoch}", sm.epoch)
    table, slots = sm.table, sm.slots
    for k in keys:
        s = key_slot(k, slots)
        if me not in table[s]:
            raise Moved(f"slot {s} is not on node {me} at epoch {sm.epoch}", sm.epoch)
