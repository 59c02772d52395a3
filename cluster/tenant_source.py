"""A cluster node's tenants come from etcd: ``/memkv/<cluster>/tenants/<name>`` (JSON records).

The node's ``TenantSource`` (memkv/server/extension.py): read once while the node
is built, then listed and watched for as long as it runs (a broken watch is
re-listed), so a tenant added, changed or revoked with ``memkv tenant ...
etcd://...`` reaches every node within a watch round trip. One of the
extensions ``memkv serve --etcd ...`` builds the node with (memkv/tools/cli.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio

from memkv.client.etcd import Etcd, EtcdUnavailable
from memkv.config import NodeConfig
from memkv.server.extension import Extension, NodeContext
from memkv.server.tenants import TenantRegistry

log = logging.getLogger("memkv.security")

RETRY_S = 1.0


def tenants_prefix(cluster: str) -> str:
    return f"/memkv/{cluster or 'default'}/tenants/"


class EtcdTenants:
    name = "etcd"

    def __init__(self, config: NodeConfig) -> None:
        self.endpoints = config.etcd or ""
        self.prefix = tenants_prefix(config.cluster)

    def extend(self, node: NodeContext) -> Extension:
        return Extension("tenants", tenant_source=self)

    def load(self, tenants: TenantRegistry) -> None:
        etcd = Etcd(self.endpoints)
        try:
            kvs, _rev = etcd.get_prefix(self.prefix)
        except EtcdUnavailable as exc:
            log.warning("tenants: etcd unavailable at start (%s); will retry", exc)
            return
        finally:
            etcd.close()
        for kv in kvs:
            tenants.apply_json(kv.key[len(self.prefix):], kv.value)

    async def watch(self, tenants: TenantRegistry) -> None:
        """Keep the tenant table equal to etcd's (list, then watch; re-list after a broken watch)."""
        prefix = self.prefix
        token = trio.lowlevel.current_trio_token()
        while True:
            etcd = Etcd(self.endpoints)
            send, recv = trio.open_memory_channel[Any](10_000)

            def callback(ev: Any, send: Any = send) -> None:
                with contextlib.suppress(trio.RunFinishedError, trio.WouldBlock, trio.ClosedResourceError):
                    token.run_sync_soon(lambda: _try_send(send, ev))

            wid = None
            try:
                kvs, rev = await trio.to_thread.run_sync(etcd.get_prefix, prefix)
                names = {kv.key[len(prefix):] for kv in kvs}
                for name in [n for n in tenants.names() if n not in names]:
                    tenants.drop(name)
                for kv in kvs:
                    tenants.apply_json(kv.key[len(prefix):], kv.value)
                wid = await trio.to_thread.run_sync(etcd.watch_prefix, prefix, rev + 1, callback)
                async for ev in recv:
                    if isinstance(ev, Exception):
                        break
                    for e in ev:
                        tenants.apply_json(e.key[len(prefix):], e.value)
            except EtcdUnavailable as exc:
                log.warning("tenants: etcd unavailable (%s)", exc)
            finally:
                if wid is not None:
                    with contextlib.suppress(Exception):
                        await trio.to_thread.run_sync(etcd.cancel_watch, wid)
                with contextlib.suppress(Exception):
                    await trio.to_thread.run_sync(etcd.close)
            await trio.sleep(RETRY_S)


def _try_send(send: Any, ev: Any) -> None:
    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
        send.send_nowait(ev)
