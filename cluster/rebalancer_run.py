"""The rebalancer in production: its programs (``memkv.cluster.rebalancer``) driven on real I/O.

:class:`RebalancerIO` performs the effects the rebalancer yields -- etcd calls on the etcd
adapter, node calls over a client pool as the cluster identity, waits on the process's
``ClusterView``, sleeps that a stop request ends early, parallel programs on threads -- and
:func:`run` drives a rebalancer's campaign with it until ``stop`` is set. The in-node candidate
(``memkv.cluster.leader``) and ``memkv rebalancer URL`` (:func:`run_standalone`) both come here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memkv.client.cluster_view import ClusterView
from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.cluster.effects import EtcdCall, NodeCall, Parallel, Sleep, WaitView, run_blocking
from memkv.cluster.rebalancer import DEFAULT_MBPS, Rebalancer

log = logging.getLogger("memkv.rebalancer")


class Stopped(BaseException):
    """Thrown into a program whose driver was asked to stop (not an ``Exception``: the programs'
    error handlers let it through, their ``finally`` blocks run)."""


class RebalancerIO:
    """Performs a rebalancer's effects: real etcd, real nodes, this process's cluster view."""

    def __init__(self, etcd: Etcd, view: ClusterView, *, credentials: Any = None,
                 stop: threading.Event | None = None) -> None:
        from memkv.client.executors.blocking_connection import BlockingPool

        self.etcd = etcd
        self.view = view
        self.stop = stop or threading.Event()
        # calls to nodes log in as the cluster identity, over TLS when the nodes serve it (cluster/identity.py)
        self.pool = BlockingPool(timeout=60.0, connect_timeout=3.0,
                                 **(credentials.pool_kwargs() if credentials is not None else {}))

    def __call__(self, eff: Any) -> Any:
        if self.stop.is_set():
            raise Stopped()
        if isinstance(eff, EtcdCall):
            return getattr(self.etcd, eff.method)(*eff.args, **eff.kwargs)
        if isinstance(eff, NodeCall):
            from memkv.client.core.calls import SimpleCall
            from memkv.client.url import NodeAddress

            host, _, port = eff.addr.rpartition(":")
            return self.pool.call(NodeAddress(host.strip("[]"), int(port)), SimpleCall(eff.op, eff.meta))  # type: ignore[arg-type]
        if isinstance(eff, Sleep):
            if self.stop.wait(eff.seconds):
                raise Stopped()
            return None
        if isinstance(eff, WaitView):
            return self.view.wait_for(eff.predicate, eff.timeout)
        if isinstance(eff, Parallel):
            with ThreadPoolExecutor(max_workers=max(1, len(eff.programs)), thread_name_prefix="memkv-migrate") as ex:
                futures = [ex.submit(run_blocking, p, self) for p in eff.programs]
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]
            return [f.result() for f in futures]
        raise TypeError(f"not a rebalancer effect: {eff!r}")

    def close(self) -> None:
        self.pool.close()


def run(rb: Rebalancer, io: RebalancerIO) -> None:
    """Campaign and lead until ``io.stop`` is set."""
    try:
        run_blocking(rb.campaign(), io)
    except Stopped:
        pass
    finally:
        io.close()


class LeaseHolder:
    """A lease of our own, kept alive by a thread (for ``memkv rebalancer``)."""

    def __init__(self, etcd: Etcd, ttl: int) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.lease: int | None = None
        self.valid_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memkv-rebalancer-lease", daemon=True)

    def start(self) -> LeaseHolder:
        self._thread.start()
        return self

    def ok(self) -> bool:
        return time.monotonic() < self.valid_until

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                t0 = time.monotonic()
                if self.lease is None:
                    self.lease = self.etcd.grant(self.ttl)
                    self.valid_until = t0 + self.ttl * 0.9
                else:
                    ttl = self.etcd.keepalive(self.lease)
                    if ttl <= 0:
                        self.lease, self.valid_until = None, 0.0
                        continue
                    self.valid_until = t0 + min(ttl, self.ttl) * 0.9
            except EtcdUnavailable:
                pass
            self._stop.wait(self.ttl / 3)

    def stop(self) -> None:
        self._stop.set()
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                self.etcd.revoke(lease)
            except EtcdUnavailable:
                pass


def run_standalone(url: str, *, identity: str | None = None, mbps: float = DEFAULT_MBPS, lease_ttl: int = 5,
                   slots: int = 4096, replicas: int = 2, stop: threading.Event | None = None,
                   secret_file: str | None = None, tls: dict[str, Any] | None = None) -> None:
    """``memkv rebalancer URL``: campaign and lead until ``stop`` is set.

    Node calls use the cluster identity: the secret from ``secret_file`` / ``MEMKV_CLUSTER_SECRET``, else
    etcd's ``/memkv/<c>/secret``; ``tls`` (``ca``, ``cert``, ``key``, ``check_hostname``) when the nodes
    serve TLS (cluster/identity.py)."""
    import os
    import socket

    from memkv.client.url import parse_url
    from memkv.cluster import identity as cid

    stop = stop or threading.Event()
    parsed = parse_url(url)
    etcd = Etcd([(n.host, n.port) for n in parsed.nodes], timeout=max(1.0, min(3.0, lease_ttl / 2)))
    secret = cid.configured_secret({}, secret_file=secret_file)
    while secret is None:
        try:
            secret = cid.etcd_secret(etcd, parsed.cluster)
        except EtcdUnavailable as exc:
            log.warning("rebalancer: cannot read the cluster secret from etcd (%s); retrying", exc.message)
            if stop.wait(0.5):
                etcd.close()
                return
    t = tls or {}
    ctx = cid.client_tls({}, {"tls_ca": t.get("ca"), "tls_cert": t.get("cert"), "tls_key": t.get("key"),
                              "tls_check_hostname": t.get("check_hostname", True)}) if t.get("ca") else None
    creds = cid.credentials(secret, parsed.cluster, ctx)
    view = ClusterView(etcd, parsed.cluster)
    view.start()
    holder = LeaseHolder(etcd, lease_ttl).start()
    ident = identity or f"rebalancer-{socket.gethostname()}-{os.getpid()}"
    rb = Rebalancer(view, parsed.cluster, ident, lease=lambda: holder.lease, alive=holder.ok, mbps=mbps,
                    slots=slots, replicas=replicas)
    try:
        run(rb, RebalancerIO(etcd, view, credentials=creds, stop=stop))
    finally:
        holder.stop()
        view.stop()
        etcd.close()
