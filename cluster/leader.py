"""The in-node rebalancer candidate (docs/cluster.md).

Every cluster node campaigns for ``/memkv/<cluster>/rebalancer/leader`` with
its own registration lease (so leadership ends when the node dies or is
fenced); the winner runs :class:`memkv.cluster.rebalancer.Rebalancer` (driven on real I/O by
``memkv.cluster.rebalancer_run``), which
creates the first slot map and then migrates slots on join, leave, drain and
node loss. The rebalancer is blocking code (etcd and node calls) and runs in a
worker thread, never on the node's event loop.

``[cluster]`` settings: ``rebalancer = false`` (this node never leads: run
``memkv rebalancer URL`` instead), ``rebalance_mbps = 200`` (copy throttle,
MB/s; 0 = unthrottled; ``/memkv/<cluster>/rebalancer/throttle`` in etcd
overrides it at run time), ``orphan_grace = 30`` (seconds a slot whose owners
are all gone keeps them, unavailable, waiting for one to come back with its
durable values, before it is given to live nodes empty).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from memkv.cluster.node_member import ClusterMember

log = logging.getLogger("memkv.cluster")


async def run_leader(member: ClusterMember) -> None:
    from memkv.cluster.rebalancer import DEFAULT_MBPS, ORPHAN_GRACE_S, Rebalancer
    from memkv.cluster.rebalancer_run import RebalancerIO, run

    await member.registered.wait()
    assert member.etcd is not None and member.view is not None
    opts = dict(member.node.config.extra.get("cluster", {}))
    if str(opts.get("rebalancer", True)).lower() in ("false", "0", "no", "off"):
        log.info("node %s does not run a rebalancer candidate ([cluster] rebalancer = false)", member.node_id)
        return
    rb = Rebalancer(member.view, member.cluster, member.node_id,
                    lease=lambda: member.lease_id, alive=lambda: not member.fenced(),
                    mbps=float(opts.get("rebalance_mbps", DEFAULT_MBPS)), slots=member.slots,
                    replicas=member.replicas, orphan_grace_s=float(opts.get("orphan_grace", ORPHAN_GRACE_S)))
    member.rebalancer = rb  # type: ignore[attr-defined]
    stop = threading.Event()
    io = RebalancerIO(member.etcd, member.view, credentials=member.credentials, stop=stop)
    try:
        await trio.to_thread.run_sync(run, rb, io, abandon_on_cancel=True, thread_name="memkv-rebalancer")
    finally:
        stop.set()
