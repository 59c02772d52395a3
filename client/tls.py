"""TLS connections of the client library (``memkvs://`` URLs or ``connect(..., tls=...)``).

``tls`` may be ``True`` (system trust store), a path to a PEM CA bundle, or an
``ssl.SSLContext`` (e.g. one that also loads a client certificate for a node
that requires mutual TLS). The plain connections are untouched; these
subclasses replace only the methods that move bytes.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any

import trio

from memkv.client.connection import TrioConnection
from memkv.client.sync_connection import BlockingConnection
from memkv.errors import ConnectionLost, InvalidArgument, NodeUnavailable

RECV = 256 * 1024
COALESCE = 64 * 1024


def client_context(tls: Any) -> ssl.SSLContext | None:
    """``None``/``False`` -> None; ``True`` -> default context; ``str`` -> CA file; a context as is."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, str):
        try:
            return ssl.create_default_context(cafile=tls)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot load CA file {tls}: {exc}") from None
    raise InvalidArgument("tls must be True, a CA file path or an ssl.SSLContext")


def _coalesce(bufs: list[Any]) -> list[Any]:
    """Join runs of small buffers so each TLS record carries a useful amount of data."""
    out: list[Any] = []
    small: list[Any] = []
    size = 0
    for b in bufs:
        n = memoryview(b).nbytes
        if n < COALESCE:
            small.append(b)
            size += n
            if size >= COALESCE:
                out.append(b"".join(small))
                small, size = [], 0
        else:
            if small:
                out.append(b"".join(small))
                small, size = [], 0
            out.append(b)
    if small:
        out.append(b"".join(small))
    return out


class TLSTrioConnection(TrioConnection):
    stream: trio.SSLStream

    @classmethod
    async def open_tls(cls, host: str, port: int, ctx: ssl.SSLContext, *, tenant: str | None = None,
                       token: str | None = None, connect_timeout: float = 2.0) -> TLSTrioConnection:
        sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                  trio.socket.SOCK_STREAM)
        with trio.move_on_after(connect_timeout) as scope:
            try:
                await sock.connect((host, port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname=host,
                                        https_compatible=True)
                await stream.do_handshake()
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                sock.close()
                raise NodeUnavailable(f"TLS connect to {host}:{port} failed: {exc}") from None
        if scope.cancelled_caught:
            sock.close()
            raise NodeUnavailable(f"TLS connect to {host}:{port} timed out")
        conn = cls(sock, f"{host}:{port}")
        conn.stream = stream
        if tenant is not None:
            try:
                await conn.authenticate(tenant, token or "")
            except BaseException:
                conn.close()
                raise
        return conn

    async def _send(self, bufs: list[Any]) -> None:
        try:
            for b in _coalesce(bufs):
                await self.stream.send_all(b)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"send to {self.address} failed: {exc}") from None

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"receive from {self.address} failed: {exc}") from None
        if not data:
            raise ConnectionLost(f"{self.address} closed the connection")
        return data

    async def _recv_some(self) -> None:
        self.reader.feed(await self._receive())

    async def _fill(self, view: memoryview) -> None:
        got = self.reader.take_payload_into(view)
        while got < len(view):
            self.reader.feed(await self._receive())
            got += self.reader.take_payload_into(view[got:])


class TLSBlockingConnection(BlockingConnection):
    @classmethod
    def open_tls(cls, host: str, port: int, ctx: ssl.SSLContext, *, tenant: str | None = None,
                 token: str | None = None, timeout: float = 5.0,
                 connect_timeout: float = 2.0) -> TLSBlockingConnection:
        try:
            raw = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise NodeUnavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise NodeUnavailable(f"TLS handshake with {host}:{port} failed: {exc}") from None
        sock.settimeout(None)
        tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        conn = cls(sock, f"{host}:{port}")
        if tenant is not None:
            try:
                conn.authenticate(tenant, token or "")
            except BaseException:
                conn.close()
                raise
        return conn

    def _send(self, bufs: list[Any]) -> None:
        for b in _coalesce(bufs):
            self.sock.sendall(b)
