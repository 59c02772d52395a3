"""Fixtures for cluster tests: a real etcd (Debian's /usr/bin/etcd) and real node processes.

``etcd_server`` — an :class:`~memkv.tools.localproc.EtcdProcess` on free loopback
ports with a tmp data dir (``stop()``, ``start()``, ``restart()``, ``kill()``);
skipped when no etcd binary is installed.

``start_cluster(n, *, replicas=2, lease_ttl=2, name=None, zones=1)`` — starts
``n`` nodes (``memkv serve --etcd ... --cluster NAME --node-id nI --zone zJ``,
through conftest's ``start_node``) and waits until all of them are in the
slot map. Returns a :class:`LocalCluster` (``.url``, ``.nodes``, ``.etcd``,
``.view()``, ``.add_node()``, ``.wait_members(ids)``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CLUSTER_FORM_TIMEOUT_S = 60.0


@pytest.fixture
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from memkv.tools.localproc import EtcdProcess, find_etcd

    if find_etcd() is None:
        pytest.skip("no etcd binary (apt-get install etcd-server)")
    base = tmp_path_factory.mktemp("etcd")
    proc = EtcdProcess(base / "data", log_path=base / "etcd.log")
    proc.start()
    yield proc
    proc.kill()


class LocalCluster:
    def __init__(self, etcd: Any, name: str, start_node: Callable[..., Any], config: str) -> None:
        self.etcd = etcd
        self.name = name
        self._start_node = start_node
        self.config = config
        self.nodes: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"etcd://{self.etcd.endpoint}/{self.name}"

    def add_node(self, node_id: str | None = None, zone: str = "z0") -> Any:
        node_id = node_id or f"n{len(self.nodes) + 1}"
        proc = self._start_node("--etcd", self.etcd.endpoint, "--cluster", self.name, "--node-id", node_id,
                                "--zone", zone, config=self.config)
        self.nodes[node_id] = proc
        return proc

    def state(self) -> Any:
        from memkv.client.cluster_view import ClusterView
        from memkv.client.etcd import Etcd

        etcd = Etcd(self.etcd.endpoint, timeout=2.0)
        try:
            return ClusterView(etcd, self.name).load()
        finally:
            etcd.close()

    def wait(self, predicate: Callable[[Any], bool], timeout: float = CLUSTER_FORM_TIMEOUT_S, what: str = "") -> Any:
        from memkv.client.etcd import EtcdUnavailable

        deadline = time.monotonic() + timeout
        last = None
        while True:
            with contextlib.suppress(EtcdUnavailable):
                last = self.state()
                if predicate(last):
                    return last
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n} ---\n{p.output()[-2000:]}" for n, p in self.nodes.items())
                pytest.fail(f"cluster condition not reached in {timeout}s: {what}\nlast state: {last}\n{logs}",
                            pytrace=False)
            time.sleep(0.1)

    def wait_members(self, ids: set[str], timeout: float = CLUSTER_FORM_TIMEOUT_S) -> Any:
        """Until exactly ``ids`` are registered and the slot map was computed for them."""
        return self.wait(lambda st: set(st.nodes) == ids and st.slotmap is not None
                         and set(st.slotmap.members) == ids, timeout, f"members == {sorted(ids)}")


@pytest.fixture
def start_cluster(etcd_server: Any, start_node: Callable[..., Any]) -> Callable[..., LocalCluster]:
    def _start(n: int = 3, *, replicas: int = 2, lease_ttl: int = 2, name: str | None = None,
               zones: int = 1, cluster_opts: str = "") -> LocalCluster:
        name = name or f"t{uuid.uuid4().hex[:8]}"
        config = f"[cluster]\nreplicas = {replicas}\nlease_ttl = {lease_ttl}\n{cluster_opts}"
        cluster = LocalCluster(etcd_server, name, start_node, config)
        for i in range(n):
            cluster.add_node(f"n{i + 1}", zone=f"z{i % zones}")
        cluster.wait_members({f"n{i + 1}" for i in range(n)})
        return cluster

    return _start
