"""Blocking connections to nodes, for ``SyncClient`` and the tools: sockets only.

A ``BlockingConnection`` moves bytes between a plain socket and its
``ConnectionProtocol`` (``client/core/protocol.py``), which does everything
else (framing, request ids, HELLO/AUTH, TLS). It runs in the caller's own
thread: no event-loop hop on the data path, which is what keeps a small
synchronous GET within a few tens of microseconds — one ``sendmsg`` and,
usually, one ``recv_into``.

Timeouts are the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking
socket): Python's own socket timeouts ``poll()`` before every recv and send,
one more system call per operation. A timeout or a socket error breaks the
connection; the pool then opens a fresh one.

``BlockingPool`` keeps, per node, a stack of idle connections; each call
checks one out, so many threads may share a pool.
"""

from __future__ import annotations

import builtins
import queue
import socket
import ssl
import struct
import threading
from typing import Any

from memkv.client.core.calls import Call
from memkv.client.core.protocol import ConnectionProtocol, Pending
from memkv.client.url import NodeAddress
from memkv.errors import ConnectionLost, NodeUnavailable, TimeoutError
from memkv.protocol import codec as c

IOV_MAX = 512


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class BlockingConnection:
    def __init__(self, sock: socket.socket, proto: ConnectionProtocol) -> None:
        self.sock = sock
        self.proto = proto

    @property
    def broken(self) -> BaseException | None:
        return self.proto.broken

    @classmethod
    def open(cls, host: str, port: int, *, tenant: str | None = None, token: str | None = None,
             timeout: float = 5.0, connect_timeout: float = 2.0,
             tls: ssl.SSLContext | None = None) -> BlockingConnection:
        """Connect, then (TLS handshake and) authenticate when ``tenant`` is given."""
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise NodeUnavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        conn = cls(sock, ConnectionProtocol(f"{host}:{port}", tls=tls, server_hostname=host,
                                            tenant=tenant, token=token))
        try:
            if tls is not None:  # the handshake within the connect timeout
                _kernel_timeouts(sock, connect_timeout)
                conn._run_until(lambda: conn.proto.handshaken)
            _kernel_timeouts(sock, timeout)
            conn._run_until(lambda: conn.proto.ready)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.proto.close()
        self.sock.close()

    def call(self, call: Call) -> Any:
        """Send ``call`` and receive until its reply is in (replies of calls given up earlier are drained)."""
        proto = self.proto
        pending = proto.start(call)
        sock = self.sock
        try:
            self._flush()
            while not pending.done:
                proto.received(sock.recv_into(proto.recv_buffer()))
                if proto.tls_output_due():  # a TLS key update to answer
                    self._flush()
        except BaseException as exc:
            raise self._failed(exc) from None
        return pending.outcome()

    # -- the same call in two halves, for a fan-out that sends to many nodes before it reads
    def send(self, call: Call) -> Pending:
        """Send ``call``; its reply is read by ``receive`` or, piece by piece, ``receive_some``."""
        pending = self.proto.start(call)
        try:
            self._flush()
        except BaseException as exc:
            raise self._failed(exc) from None
        return pending

    def receive(self, pending: Pending) -> Any:
        """Receive until ``pending``'s reply is in (each ``recv`` within the socket's timeout); its outcome."""
        while not self.receive_some(pending):
            pass
        return pending.outcome()

    def receive_some(self, pending: Pending) -> bool:
        """One ``recv`` (it does not block when the socket is known to be readable); whether
        ``pending``'s reply is now complete."""
        proto = self.proto
        try:
            proto.received(self.sock.recv_into(proto.recv_buffer()))
            if proto.tls_output_due():  # a TLS key update to answer
                self._flush()
        except BaseException as exc:
            raise self._failed(exc) from None
        return pending.done

    def expire(self) -> TimeoutError:
        """The reply did not come within the timeout: the connection is closed (a late reply
        would otherwise be taken for the next call's); the error to raise."""
        exc = self._failed(builtins.TimeoutError())
        assert isinstance(exc, TimeoutError)
        return exc

    def _run_until(self, done: Any) -> None:
        """Opening: send what is due and receive until ``done()``."""
        proto = self.proto
        sock = self.sock
        try:
            while True:
                self._flush()
                if done():
                    return
                proto.received(sock.recv_into(proto.recv_buffer()))
        except BaseException as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: BaseException) -> BaseException:
        """Any failure of the socket or the stream closes the connection; the error to raise."""
        self.close()
        if isinstance(exc, builtins.TimeoutError):
            return TimeoutError(f"{self.proto.address} did not answer in time")
        if isinstance(exc, OSError):
            return ConnectionLost(f"connection to {self.proto.address} failed: {exc}")
        return exc

    def _flush(self) -> None:
        """Send everything that is due (with TLS, piece by piece as it is encrypted)."""
        proto = self.proto
        bufs = proto.data_to_send()
        while bufs:
            self._send(bufs)
            bufs = proto.data_to_send()

    def _send(self, bufs: list[Any]) -> None:
        while bufs:
            chunk = bufs[:IOV_MAX]
            sent = self.sock.sendmsg(chunk)
            bufs = c.advance(bufs, len(chunk), sent)


class BlockingPool:
    """Per node a stack of idle blocking connections; each call checks one out.

    Safe to use from many threads: a connection is owned by one thread for the
    duration of a call.
    """

    def __init__(self, *, tenant: str | None = None, token: str | None = None, timeout: float = 5.0,
                 connect_timeout: float = 2.0, max_idle: int = 8, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
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

    def open(self, node: NodeAddress) -> BlockingConnection:
        """A new connection to ``node`` with this pool's credentials."""
        return BlockingConnection.open(node.host, node.port, tenant=self.tenant, token=self.token,
                                       timeout=self.timeout, connect_timeout=self.connect_timeout, tls=self.tls)

    def give(self, node: NodeAddress, conn: BlockingConnection) -> None:
        """Put ``conn`` among ``node``'s idle connections (or close it if the pool is full or closed)."""
        self._put_back(self._idle.get(node) or self._queue(node), conn)

    def _put_back(self, q: queue.LifoQueue[BlockingConnection], conn: BlockingConnection) -> None:
        if conn.broken is None and not self._closed and q.qsize() < self.max_idle:
            q.put(conn)
        else:
            conn.close()

    def call(self, node: NodeAddress, call: Call) -> Any:
        q = self._idle.get(node) or self._queue(node)
        try:
            conn = q.get_nowait()
        except queue.Empty:
            conn = self.open(node)
        try:
            return conn.call(call)
        finally:
            self._put_back(q, conn)

    def take(self, node: NodeAddress) -> BlockingConnection:
        """Check out an idle connection to ``node`` (or open one); hand it back with ``give``."""
        try:
            return (self._idle.get(node) or self._queue(node)).get_nowait()
        except queue.Empty:
            return self.open(node)

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
