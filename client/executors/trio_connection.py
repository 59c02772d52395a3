"""Trio connections to nodes, for ``Client``: sockets only.

A ``TrioConnection`` moves bytes between a trio socket and its
``ConnectionProtocol`` (``client/core/protocol.py``), which does everything
else. Many tasks share one connection: each queues its request and sends
what is due under the send lock, then waits for its reply; whichever waiting
task holds the receive lock reads from the socket and hands the protocol the
bytes, which completes the calls they answer (by request id, any order).
There is no background reader task, so a connection needs no nursery of its
own and nothing outlives the calls that use it.

Cancellation: a task cancelled while waiting gives its call up (the reply is
drained when it comes; its buffer is the caller's again). A task cancelled
half-way through sending a frame breaks the connection (the stream's
framing is lost) and every waiter gets ``ConnectionLost``.

``TrioPool`` keeps up to ``size`` connections per node and hands out the
least busy.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from memkv.client.core.calls import Call
from memkv.client.core.protocol import ConnectionProtocol
from memkv.client.url import NodeAddress
from memkv.errors import ConnectionLost, NodeUnavailable
from memkv.protocol import codec as c

IOV_MAX = 512


class TrioConnection:
    def __init__(self, sock: trio.socket.SocketType, proto: ConnectionProtocol) -> None:
        self.sock = sock
        self.proto = proto
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()

    @property
    def broken(self) -> BaseException | None:
        return self.proto.broken

    @property
    def in_flight(self) -> int:
        return self.proto.in_flight

    @classmethod
    async def open(cls, host: str, port: int, *, tenant: str | None = None, token: str | None = None,
                   connect_timeout: float = 2.0, tls: ssl.SSLContext | None = None) -> TrioConnection:
        """Connect (and do the TLS handshake) within ``connect_timeout``, then authenticate."""
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                  trio.socket.SOCK_STREAM)
        conn = cls(sock, ConnectionProtocol(f"{host}:{port}", tls=tls, server_hostname=host,
                                            tenant=tenant, token=token))
        try:
            with trio.move_on_after(connect_timeout) as scope:
                try:
                    await sock.connect((host, port))
                except OSError as exc:
                    raise NodeUnavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await conn._run_until(lambda: conn.proto.handshaken)
            if scope.cancelled_caught:
                raise NodeUnavailable(f"connect to {host}:{port} timed out")
            await conn._run_until(lambda: conn.proto.ready)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.proto.close()
        self.sock.close()

    async def _run_until(self, done: Any) -> None:
        """Opening only (nobody else uses the connection yet): send what is due, receive until ``done()``."""
        while True:
            await self._flush()
            if done():
                return
            await self._receive()

    async def call(self, call: Call) -> Any:
        proto = self.proto
        pending = proto.start(call)
        try:
            async with self._send_lock:
                await self._flush()
            while not pending.done:
                async with self._recv_lock:
                    if pending.done:
                        break
                    await self._receive()
                if proto.tls_output_due():
                    async with self._send_lock:  # TLS: a key update to answer
                        await self._flush()
        finally:
            if not pending.done:
                proto.forget(pending)
        return pending.outcome()

    async def _flush(self) -> None:
        bufs = self.proto.data_to_send()
        try:
            while bufs:
                chunk = bufs[:IOV_MAX]
                try:
                    sent = await self.sock.sendmsg(chunk)
                except (OSError, trio.ClosedResourceError) as exc:
                    raise ConnectionLost(f"send to {self.proto.address} failed: {exc}") from None
                bufs = c.advance(bufs, len(chunk), sent)
        except BaseException as exc:
            if bufs:  # a frame may be partly out: the stream's framing is lost
                self._abort(exc)
            raise

    async def _receive(self) -> None:
        proto = self.proto
        try:
            n = await self.sock.recv_into(proto.recv_buffer())
        except (OSError, trio.ClosedResourceError) as exc:
            self._abort(exc)
            raise ConnectionLost(f"receive from {self.proto.address} failed: {exc}") from None
        try:
            proto.received(n)
        except BaseException as exc:
            self._abort(exc)
            raise

    def _abort(self, exc: BaseException) -> None:
        self.proto.abort(exc)
        self.sock.close()


class TrioPool:
    """Per node up to ``size`` multiplexed connections; calls go to the least busy."""

    def __init__(self, *, size: int = 2, tenant: str | None = None, token: str | None = None,
                 connect_timeout: float = 2.0, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
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
                    conn = await TrioConnection.open(node.host, node.port, tenant=self.tenant, token=self.token,
                                                     connect_timeout=self.connect_timeout, tls=self.tls)
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
