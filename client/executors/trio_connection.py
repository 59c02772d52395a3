"""Trio connections to nodes, for ``Client``: sockets only.

A ``TrioConnection`` moves bytes between a non-blocking socket and its
``ConnectionProtocol`` (``client/core/protocol.py``), which does everything
else. Many tasks share one connection: each queues its request and sends
what is due under the send lock, then waits for its reply; whichever waiting
task holds the receive lock reads from the socket, up to the end of the next
reply, and hands the protocol the bytes, which completes the calls they
answer (by request id, any order). There is no background reader task, so a
connection needs no nursery of its own and nothing outlives the calls that
use it.

No scheduler pass when nothing has to wait. A trio socket operation, and a
``trio.Lock`` acquisition, yields to the scheduler even when it could
complete at once — three or four passes per request. Here a call tries each
step directly (``acquire_nowait``, a non-blocking ``sendmsg``/``recv_into``)
and waits only when it must (``wait_readable``, ``wait_writable``, a held
lock). It still honours trio's rules: it is a cancel point on entry, and a
call that never had to wait ends with a schedule point, so that a task
issuing calls in a loop cannot starve the others.

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


async def _acquire(lock: trio.Lock) -> bool:
    """Take ``lock``; True when that meant waiting (other tasks ran meanwhile)."""
    try:
        lock.acquire_nowait()
        return False
    except trio.WouldBlock:
        await lock.acquire()
        return True


class TrioConnection:
    def __init__(self, sock: socket.socket, proto: ConnectionProtocol) -> None:
        self.sock = sock  # non-blocking; waited on with trio.lowlevel.wait_readable/wait_writable
        self.proto = proto
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._closed = False

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
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = cls(sock, ConnectionProtocol(f"{host}:{port}", tls=tls, server_hostname=host,
                                            tenant=tenant, token=token))
        try:
            with trio.move_on_after(connect_timeout) as scope:
                try:  # trio's connect resolves the name without blocking the loop
                    await trio.socket.from_stdlib_socket(sock).connect((host, port))
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
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # a task waiting on it gets ClosedResourceError
            self.sock.close()

    async def _run_until(self, done: Any) -> None:
        """Opening only (nobody else uses the connection yet): send what is due, receive until ``done()``."""
        while True:
            await self._flush()
            if done():
                return
            await self._receive()

    async def call(self, call: Call) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        proto = self.proto
        pending = proto.start(call)
        waited = False
        try:
            waited |= await _acquire(self._send_lock)
            try:
                waited |= await self._flush()
            finally:
                self._send_lock.release()
            while not pending.done:
                waited |= await _acquire(self._recv_lock)
                try:
                    # read up to the end of one reply (a large one takes many reads), then let its caller run
                    replies = proto.replies
                    while not pending.done and proto.replies == replies:
                        waited |= await self._receive()
                finally:
                    self._recv_lock.release()
                if proto.tls_output_due():  # TLS: a key update to answer
                    waited |= await _acquire(self._send_lock)
                    try:
                        await self._flush()
                    finally:
                        self._send_lock.release()
        finally:
            if not pending.done:
                proto.forget(pending)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return pending.outcome()

    async def _flush(self) -> bool:
        """Send everything that is due (with TLS, piece by piece as it is encrypted); True when
        that meant waiting for the socket."""
        waited = False
        bufs = self.proto.data_to_send()
        while bufs:
            waited |= await self._send(bufs)
            bufs = self.proto.data_to_send()
        return waited

    async def _send(self, bufs: list[Any]) -> bool:
        waited = False
        try:
            while bufs:
                chunk = bufs[:IOV_MAX]
                try:
                    sent = self.sock.sendmsg(chunk)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    waited = True
                    continue
                except OSError as exc:
                    raise ConnectionLost(f"send to {self.proto.address} failed: {exc}") from None
                bufs = c.advance(bufs, len(chunk), sent)
        except trio.ClosedResourceError:
            raise ConnectionLost(f"connection to {self.proto.address} closed") from None
        except BaseException as exc:
            if bufs:  # a frame may be partly out: the stream's framing is lost
                self._abort(exc)
            raise
        return waited

    async def _receive(self) -> bool:
        """One read into the protocol; True when that meant waiting for the socket."""
        proto = self.proto
        waited = False
        while True:
            try:
                n = self.sock.recv_into(proto.recv_buffer())
                break
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise ConnectionLost(f"connection to {self.proto.address} closed") from None
                waited = True
            except OSError as exc:
                self._abort(exc)
                raise ConnectionLost(f"receive from {self.proto.address} failed: {exc}") from None
        try:
            proto.received(n)
        except BaseException as exc:
            self._abort(exc)
            raise
        return waited

    def _abort(self, exc: BaseException) -> None:
        self.proto.abort(exc)
        self.close()


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
