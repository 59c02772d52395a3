"""Leader election and slot-map publication ("flip immediately").

One node at a time holds ``/memkv/<cluster>/rebalancer/leader`` (created with
its own registration lease, so leadership ends when the node dies or is
fenced). The leader creates the slot map when the cluster is first formed and,
whenever membership changes (and stays unchanged for ``SETTLE_S``), computes
the next map (``memkv.cluster.slotmap``) and publishes it with an etcd
transaction on the previous map's revision (and on still being the leader):
epoch + 1.

Ownership flips at once: data is not migrated yet. The rebalancer (DESIGN.md
§7) replaces :func:`publish_next_map` with "migrate slot by slot, then flip".
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from memkv.client.cluster_map import SlotMap, leader_key, slotmap_key
from memkv.client.cluster_view import ClusterState
from memkv.client.etcd import EtcdUnavailable
from memkv.cluster.slotmap import compute_slot_map

if TYPE_CHECKING:
    from memkv.cluster.node_member import ClusterMember

log = logging.getLogger("memkv.cluster")

POLL_S = 0.2
SETTLE_S = 0.5


def wanted_members(st: ClusterState) -> dict[str, str]:
    return {n: info.zone for n, info in st.nodes.items()}


def needs_new_map(st: ClusterState) -> bool:
    members = wanted_members(st)
    if not members:
        return False
    sm = st.slotmap
    return sm is None or sm.members != members


def publish_next_map(member: ClusterMember, st: ClusterState) -> SlotMap | None:
    """Compute and publish the next map (blocking; run in a thread). None when we lost the race."""
    assert member.etcd is not None
    prev = st.slotmap
    sm = compute_slot_map(wanted_members(st), slots=prev.slots if prev else member.slots,
                          replicas=prev.replicas if prev else member.replicas, prev=prev)
    ok = member.etcd.put_if(slotmap_key(member.cluster), sm.encode(), mod_revision=st.slotmap_revision,
                            guard=(leader_key(member.cluster), member.node_id))
    if not ok:
        return None
    log.info("cluster %s: slot map epoch %d published (%d nodes, %d slots, R=%d)", member.cluster, sm.epoch,
             len(sm.members), sm.slots, sm.replicas)
    return sm


async def run_leader(member: ClusterMember) -> None:
    await member.registered.wait()
    assert member.etcd is not None and member.view is not None
    etcd = member.etcd
    key = leader_key(member.cluster)
    while True:
        lease = member.lease_id
        if lease is None or member.fenced():
            await trio.sleep(POLL_S)
            continue
        try:
            mine = await trio.to_thread.run_sync(
                lambda lease=lease: etcd.create(key, member.node_id, lease=lease))
            if not mine:
                current, _ = await trio.to_thread.run_sync(etcd.get, key)
                mine = current is not None and current.value.decode() == member.node_id
        except EtcdUnavailable:
            await trio.sleep(0.5)
            continue
        if not mine:
            await trio.sleep(POLL_S * 2)
            continue
        log.info("node %s is the rebalancer leader of cluster %s", member.node_id, member.cluster)
        await _lead(member, lease)


async def _lead(member: ClusterMember, lease: int) -> None:
    """Publish maps while we hold leadership (same lease, not fenced)."""
    view = member.view
    assert view is not None
    pending_since: float | None = None
    seen: dict[str, str] | None = None
    while member.lease_id == lease and not member.fenced():
        st = view.state
        if st.leader is not None and st.leader != member.node_id:
            return
        if needs_new_map(st):
            members = wanted_members(st)
            now = trio.current_time()
            if members != seen:
                seen, pending_since = members, now
            elif pending_since is not None and now - pending_since >= SETTLE_S or st.slotmap is None:
                try:
                    sm = await trio.to_thread.run_sync(publish_next_map, member, st)
                except EtcdUnavailable as exc:
                    log.warning("publishing the slot map failed: %s", exc.message)
                    sm = None
                if sm is not None:
                    # wait until our own view has it, so we do not publish twice
                    with trio.move_on_after(2.0):
                        while view.state.epoch < sm.epoch:
                            await trio.sleep(0.02)
                pending_since, seen = None, None
        else:
            pending_since, seen = None, None
        await trio.sleep(POLL_S)
