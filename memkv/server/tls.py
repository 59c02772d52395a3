"""TLS for client connections of a node, sans-IO (``ssl.MemoryBIO`` + ``SSLObject``).

The plain connection (``memkv.server.connection.Connection``) stays exactly as
it is; ``TLSConnection`` subclasses it and replaces only the methods that
touch the socket:

* ``_recv_some`` reads ciphertext from the socket into the incoming BIO and
  decrypts **everything** that can be decrypted into the frame reader's
  buffer, so no plaintext is ever left inside the SSLObject (the base loop may
  then park on ``wait_readable(socket)`` safely);
* payloads are taken from the frame reader's buffer (``_recv_exact_into``,
  ``_discard_payload``): with TLS there is no zero-copy receive into region
  extents (bytes must be decrypted somewhere first);
* ``flush`` encrypts the queued reply buffers (region views included) and
  sends the ciphertext, waiting for writability as needed.

The handshake runs first, with a timeout. Certificates come from files
(``[tls] cert/key/ca`` or ``--tls-cert/--tls-key/--tls-ca``); with a CA the node
requires client certificates signed by it (mutual TLS).
"""

from __future__ import annotations

import errno
import logging
import ssl
from typing import TYPE_CHECKING, Any

import trio

from memkv.errors import InvalidArgument
from memkv.server.connection import Connection, PeerGone

if TYPE_CHECKING:
    from memkv.server.node import Node

log = logging.getLogger("memkv.tls")

HANDSHAKE_TIMEOUT_S = 10.0
RECV_CHUNK = 256 * 1024
ENCRYPT_CHUNK = 256 * 1024


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"TLS: cannot load certificate/key/CA ({cert}, {key}, {ca}): {exc}") from None
    return ctx


def context_from_config(cfg: Any) -> ssl.SSLContext | None:
    tls = cfg.extra.get("tls") or {}
    cert, key, ca = tls.get("cert"), tls.get("key"), tls.get("ca")
    if not cert and not key:
        return None
    if not cert or not key:
        raise InvalidArgument("TLS needs both a certificate and a key ([tls] cert/key or --tls-cert/--tls-key)")
    return server_context(str(cert), str(key), str(ca) if ca else None)


class TLSConnection(Connection):
    context: ssl.SSLContext  # set on the subclass made by ``connection_class``

    def __init__(self, node: Node, sock: Any, peer: str) -> None:
        super().__init__(node, sock, peer)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = self.context.wrap_bio(self._in, self._out, server_side=True)
        self._eof = False

    # -- raw socket I/O
    async def _raw_recv(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_CHUNK)
            except BlockingIOError:
                await self._wait_readable()  # [limits] deadlines (memkv/server/limits.py)
                continue
            except OSError as exc:
                raise PeerGone from exc
            if not data:
                self._in.write_eof()
                self._eof = True
            else:
                self._in.write(data)
            return

    async def _raw_send_pending(self) -> None:
        while self._out.pending:
            data = self._out.read()
            view = memoryview(data)
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    await self._wait_writable()
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT):
                        raise PeerGone from exc
                    raise
                view = view[n:]

    async def handshake(self) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._raw_send_pending()
                    if self._eof:
                        raise PeerGone from None
                    await self._raw_recv()
                except ssl.SSLError as exc:
                    await self._raw_send_pending()  # the alert, if any
                    log.debug("TLS handshake with %s failed: %s", self.session.peer, exc)
                    raise PeerGone from exc
            await self._raw_send_pending()
        if scope.cancelled_caught:
            raise PeerGone

    # -- plaintext in
    def _drain(self) -> int:
        """Decrypt all that can be decrypted into the frame reader; bytes of plaintext added."""
        got = 0
        reader = self.reader
        while True:
            view = reader.recv_buffer(max(65536, self.tls.pending()))
            try:
                n = self.tls.read(len(view), view)
            except ssl.SSLWantReadError:
                return got
            except ssl.SSLZeroReturnError:
                self._eof = True
                return got
            except ssl.SSLError as exc:
                raise PeerGone from exc
            finally:
                view.release()  # the reader may have to grow its buffer next time
            if n == 0:
                self._eof = True
                return got
            reader.received(n)
            got += n

    async def _recv_some(self) -> None:
        while True:
            got = self._drain()
            if self._out.pending:  # post-handshake messages (tickets, key updates)
                await self._raw_send_pending()
            if got:
                return
            if self._eof:
                raise PeerGone
            await self._raw_recv()

    async def _recv_into(self, view: memoryview) -> int:  # not used by this class's paths
        await self._recv_some()
        return self.reader.take_payload_into(view)

    async def _recv_exact_into(self, view: memoryview) -> None:
        got = self.reader.take_payload_into(view)
        while got < len(view):
            await self._recv_some()
            got += self.reader.take_payload_into(view[got:])

    async def _discard_payload(self) -> None:
        while self.reader.skip_payload():
            await self._recv_some()
        self.reader.payload_done()

    # -- plaintext out
    async def flush(self) -> None:
        if self.durable:
            await self._settle_durable()
        bufs, self.out, self.out_bytes = self.out, [], 0
        write = self.tls.write
        for buf in bufs:
            view = memoryview(buf).cast("B")
            while view:
                try:
                    n = write(view[:ENCRYPT_CHUNK])
                except ssl.SSLError as exc:
                    raise PeerGone from exc
                view = view[n:]
                if self._out.pending >= ENCRYPT_CHUNK:
                    await self._raw_send_pending()
        await self._raw_send_pending()

    async def serve(self) -> None:
        try:
            await self.handshake()
        except PeerGone:
            return
        await super().serve()


def connection_class(ctx: ssl.SSLContext) -> type[TLSConnection]:
    return type("BoundTLSConnection", (TLSConnection,), {"context": ctx})
