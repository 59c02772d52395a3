"""Connection pools: a few connections per node, opened lazily, replaced when broken."""

from __future__ import annotations

import queue
import threading
from typing import Any

import trio

from memkv.client.connection import TrioConnection
from memkv.client.sync_connection import BlockingConnection
from memkv.client.url import NodeAddress


class TrioPool:
    """Per node up to ``size`` multiplexed connections; calls go to the least busy."""

    def __init__(self, *, size: int = 2, tenant: str | None = None, token: str | None = None,
                 connect_timeout: float = 2.0, tls: Any = None) -> None:
        self.tls = tls  # ssl.SSLContext or None (client/tls.py)
        self.size = size
        self.tenant = tenant
        self.token = token
        self.connect_timeout = connect_timeout
        self._conns: dict[NodeAddress, list[TrioConnection]] = {}
        self._opening: dict[NodeAddress, trio.Lock] = {}

    async def get(self, node: NodeAddress) -> TrioConnection:
        conns = [c for c in self._conns.get(node, []) if c.broken is None]
        self._conns[node] = conns
        idle = [c for c in conns if c.in_flight == 0]
        if idle:
            return idle[0]
        if len(conns) < self.size:
            lock = self._opening.setdefault(node, trio.Lock())
            async with lock:
                conns = [c for c in self._conns.get(node, []) if c.broken is None]
                if len(conns) < self.size:
                    if self.tls is not None:
                        from memkv.client.tls import TLSTrioConnection

                        conn = await TLSTrioConnection.open_tls(node.host, node.port, self.tls, tenant=self.tenant,
                                                                token=self.token, connect_timeout=self.connect_timeout)
                    else:
                        conn = await TrioConnection.open(node.host, node.port, tenant=self.tenant, token=self.token,
                                                         connect_timeout=self.connect_timeout)
                    conns.append(conn)
                    self._conns[node] = conns
                    return conn
        return min(conns, key=lambda c: c.in_flight)

    def drop(self, node: NodeAddress) -> None:
        for conn in self._conns.pop(node, []):
            conn.close()

    def close(self) -> None:
        for node in list(self._conns):
            self.drop(node)


class BlockingPool:
    """Per node a stack of idle blocking connections; each call checks one out.

    Safe to use from many threads: a connection is owned by one thread for the
    duration of a call.
    """

    def __init__(self, *, tenant: str | None = None, token: str | None = None, timeout: float = 5.0,
                 connect_timeout: float = 2.0, max_idle: int = 8, tls: Any = None) -> None:
        self.tls = tls  # ssl.SSLContext or None (client/tls.py)
        self.tenant = tenant
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[NodeAddress, queue.LifoQueue[BlockingConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _queue(self, node: NodeAddress) -> queue.LifoQueue[BlockingConnection]:
        with self._lock:
            q = self._idle.get(node)
            if q is None:
                q = self._idle[node] = queue.LifoQueue()
            return q

    def call(self, node: NodeAddress, call: Any) -> Any:
        q = self._queue(node)
        try:
            conn = q.get_nowait()
        except queue.Empty:
            if self.tls is not None:
                from memkv.client.tls import TLSBlockingConnection

                conn = TLSBlockingConnection.open_tls(node.host, node.port, self.tls, tenant=self.tenant,
                                                      token=self.token, timeout=self.timeout,
                                                      connect_timeout=self.connect_timeout)
            else:
                conn = BlockingConnection.open(node.host, node.port, tenant=self.tenant, token=self.token,
                                               timeout=self.timeout, connect_timeout=self.connect_timeout)
        try:
            return conn.call(call)
        finally:
            if conn.broken is None and not self._closed and q.qsize() < self.max_idle:
                q.put(conn)
            else:
                conn.close()

    def drop(self, node: NodeAddress) -> None:
        q = self._queue(node)
        while True:
            try:
                q.get_nowait().close()
            except queue.Empty:
                return

    def close(self) -> None:
        self._closed = True
        for node in list(self._idle):
            self.drop(node)
