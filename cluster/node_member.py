"""A storage node as a cluster member: registration, lease, fencing, ownership checks.

A :class:`ClusterMember` is one of the extensions a node is built with (``memkv
serve --etcd ...``: memkv/tools/cli.py; memkv/server/extension.py). It gives the
node its routing (the pipeline's route stage asks ``check`` and ``owners``) and
the slot-migration operations (memkv/cluster/migration.py), anti-entropy and the
relay of writes to owners a client cannot reach (memkv/cluster/relay.py), and runs:
- registers the node (address, zone, host: ``--host-id``, default the hostname) under
  ``/memkv/<cluster>/nodes/<id>`` with a lease of
  ``lease_ttl`` seconds (config ``[cluster] lease_ttl``, default 5), renewed
  every third of it; a clean shutdown revokes the lease;
- keeps a :class:`~memkv.client.cluster_view.ClusterView` of nodes and slot map;
- **fencing**: when the lease could not be renewed for its whole TTL (etcd
  unreachable, or the lease expired), the node refuses writes with ``Fenced``
  until it has registered again;
- **ownership**: requests carrying a slot-map epoch (``ep``, stamped by cluster
  clients) are refused with ``MOVED`` (the node's epoch in the message) when
  the node does not own every key's slot in its map, and writes are refused
  when their epoch is older than the node's. Requests without ``ep``
  (``memkv://`` admin access, RESP) are not routed and only fenced;
- runs the leader election / slot-map publisher (``memkv.cluster.leader``).

Once the cluster secret is known (config or etcd) the node's tenant table accepts
the cluster identity (memkv/cluster/identity.py).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import trio

from memkv.client.cluster_map import DEFAULT_SLOTS, NodeInfo, key_slot, node_key
from memkv.client.cluster_view import ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.cluster import identity
from memkv.cluster.anti_entropy import AntiEntropy
from memkv.cluster.migration import MigrationService
from memkv.cluster.ownership import route_check
from memkv.cluster.relay import Relay
from memkv.config import NodeConfig
from memkv.errors import Fenced
from memkv.server.extension import Extension, NodeContext

log = logging.getLogger("memkv.cluster")

DEFAULT_LEASE_TTL = 5


class ClusterMember:
    def __init__(self, config: NodeConfig) -> None:
        cfg = config
        self.opts = opts = dict(cfg.extra.get("cluster", {}))
        self.config = cfg
        self.node: NodeContext | None = None  # the node this member extends (``extend``)
        self.node_id: str = cfg.node_id
        self.cluster: str = cfg.cluster or "default"
        self.zone: str = cfg.zone or "z0"
        self.host: str = cfg.host_id or socket.gethostname()
        self.endpoints: str = cfg.etcd or ""
        self.lease_ttl = max(2, int(opts.get("lease_ttl", DEFAULT_LEASE_TTL)))
        self.slots = int(opts.get("slots", DEFAULT_SLOTS))
        ns_replicas = max((ns.replicas for ns in cfg.namespaces.values()), default=1)
        self.replicas = int(opts.get("replicas", ns_replicas))
        self.etcd: Etcd | None = None
        self.view: ClusterView | None = None
        self.lease_id: int | None = None
        self.valid_until = 0.0  # monotonic time until which our lease is surely alive
        self.registered = trio.Event()
        self.info: NodeInfo | None = None
        # the cluster identity of node-to-node calls (memkv/cluster/identity.py): the secret comes from the
        # config ([cluster] secret / secret_file, MEMKV_CLUSTER_SECRET) or from etcd (``run``, before registering)
        self.secret = identity.configured_secret(opts)
        self.credentials = identity.Credentials(tls=identity.node_tls(cfg))
        self.migration: MigrationService | None = None
        self.anti_entropy: AntiEntropy | None = None
        self.relay: Relay | None = None

    def extend(self, node: NodeContext) -> Extension:
        """What the node gets from its cluster membership: routing, slot migration, the lease task."""
        self.node = node
        self.node_id = node.node_id
        if self.secret:
            self.credentials = identity.install_secret(node.tenants, self.secret, self.cluster, self.config)
        self.migration = svc = MigrationService(node.store, self)
        self.anti_entropy = ae = AntiEntropy(node.store, self, self.opts)
        self.relay = relay = Relay(node.store, self, self.opts)
        return Extension("cluster", operations=svc.operations() + ae.operations() + relay.operations(),
                         background=(self.run, ae.run),
                         stats=self.stats, metrics=self.metrics, routing=self)

    def metrics(self) -> dict[str, float]:
        """Gauges on the node's /metrics: slot migration's, anti-entropy's and relays'."""
        assert self.migration is not None and self.anti_entropy is not None and self.relay is not None
        return {**self.migration.metrics(), **self.anti_entropy.metrics(), **self.relay.metrics()}

    # -- the request-path check (sync, no I/O)
    def fenced(self) -> bool:
        return time.monotonic() >= self.valid_until

    def check(self, keys: list[bytes], write: bool, epoch: Any) -> None:
        """The pipeline's route stage (memkv/server/stages.py): ``Fenced`` / ``Moved``."""
        if write and self.fenced():
            raise Fenced(f"node {self.node_id} lost its etcd lease; it refuses writes until it registers again")
        ep = epoch
        if ep is None or self.view is None:
            return
        route_check(self.view.state.slotmap, self.node_id, ep, keys, write)

    def owners(self, key: bytes) -> tuple[str, ...] | None:
        """The nodes serving ``key`` in this node's slot map (None: no map yet)."""
        view = self.view
        sm = view.state.slotmap if view is not None else None
        if sm is None:
            return None
        return tuple(sm.table[key_slot(key, sm.slots)])

    def stats(self) -> dict[str, Any]:
        st = self.view.state if self.view is not None else None
        sm = st.slotmap if st is not None else None
        primary, other = sm.slots_of(self.node_id) if sm is not None else (0, 0)
        return {"cluster": self.cluster, "zone": self.zone, "host": self.host, "epoch": sm.epoch if sm else 0,
                "fenced": self.fenced(), "leader": st.leader if st else None,
                "slots_primary": primary, "slots_replica": other,
                "etcd_connected": bool(self.view and self.view.connected),
                "anti_entropy": self.anti_entropy.stats() if self.anti_entropy is not None else None,
                "relay": self.relay.stats() if self.relay is not None else None}

    # -- background
    def _advertised(self) -> str:
        assert self.node is not None
        host = self.config.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.node.address().rpartition(':')[2]}"

    async def run(self) -> None:
        assert self.node is not None
        await self.node.started.wait()
        try:
            from importlib.metadata import version as _dist_version

            version = _dist_version("memkv")
        except Exception:  # noqa: BLE001 - not installed as a distribution
            version = ""
        self.info = NodeInfo(self.node_id, self._advertised(), self.zone, self.config.memory, str(version),
                             services=self.node.advertised(), host=self.host)
        self.etcd = Etcd(self.endpoints, timeout=max(1.0, min(3.0, self.lease_ttl / 2)))
        self.view = ClusterView(self.etcd, self.cluster, resync_s=10.0)
        self.view.start()
        try:
            await self._load_secret()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._lease_loop)
                from memkv.cluster.leader import run_leader

                nursery.start_soon(run_leader, self)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._shutdown)

    async def _load_secret(self) -> None:
        """The cluster secret from etcd (created on first formation), before this node registers: a node
        takes slots only once it can authenticate its node-to-node calls and accept its peers'."""
        if self.secret is not None:
            return
        assert self.node is not None
        while True:
            try:
                self.secret = await trio.to_thread.run_sync(identity.etcd_secret, self.etcd, self.cluster)
                break
            except EtcdUnavailable as exc:
                log.warning("node %s: cannot read the cluster secret from etcd (%s); retrying", self.node_id,
                            exc.message)
                await trio.sleep(0.5)
        self.credentials = identity.install_secret(self.node.tenants, self.secret, self.cluster, self.config)

    def _shutdown(self) -> None:
        lease, self.lease_id = self.lease_id, None
        self.valid_until = 0.0
        if lease is not None and self.etcd is not None:
            try:
                self.etcd.revoke(lease)  # our node key (and leadership) go at once
                log.info("node %s left cluster %s (lease revoked)", self.node_id, self.cluster)
            except EtcdUnavailable as exc:
                log.warning("could not revoke lease on shutdown: %s", exc)
        if self.view is not None:
            self.view.stop()
        if self.etcd is not None:
            self.etcd.close()

    async def _register(self) -> None:
        assert self.etcd is not None and self.info is not None
        t0 = time.monotonic()
        lease = await trio.to_thread.run_sync(self.etcd.grant, self.lease_ttl)
        await trio.to_thread.run_sync(lambda: self.etcd.put(node_key(self.cluster, self.node_id),  # type: ignore[union-attr]
                                                            self.info.encode(), lease=lease))  # type: ignore[union-attr]
        self.lease_id = lease
        self.valid_until = t0 + self.lease_ttl * 0.9
        if not self.registered.is_set():
            self.registered.set()
        log.info("node %s registered in cluster %s (zone %s, lease %x, ttl %ds)", self.node_id, self.cluster,
                 self.zone, lease, self.lease_ttl)

    async def _lease_loop(self) -> None:
        assert self.etcd is not None
        period = self.lease_ttl / 3
        while True:
            try:
                if self.lease_id is None:
                    await self._register()
                await trio.sleep(period)
                t0 = time.monotonic()
                ttl = await trio.to_thread.run_sync(self.etcd.keepalive, self.lease_id)
                if ttl <= 0:
                    log.warning("node %s: lease expired; registering again", self.node_id)
                    self.lease_id = None
                    self.valid_until = 0.0
                    continue
                self.valid_until = t0 + min(ttl, self.lease_ttl) * 0.9
            except EtcdUnavailable as exc:
                if not self.fenced():
                    log.warning("node %s: cannot renew lease (%s)", self.node_id, exc.message)
                await trio.sleep(min(0.5, period))
