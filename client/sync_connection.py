"""A blocking connection to one node, for ``SyncClient``.

It runs the same sans-IO ``Call`` objects as the trio connection, over a plain
socket in the caller's own thread: no event loop hop on the data path, which
is what keeps a small synchronous GET within a few tens of microseconds.
"""

from __future__ import annotations

import builtins
import itertools
import socket
import struct
from typing import Any

from memkv.client.calls import Call, SimpleCall
from memkv.errors import AuthError, ConnectionLost, MemKVError, NodeUnavailable, TimeoutError, error_from_code
from memkv.protocol import auth
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op

IOV_MAX = 512


class BlockingConnection:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.reader = c.FrameReader(buffer_size=256 * 1024)
        self._ids = itertools.count(1)
        self.broken: BaseException | None = None

    @classmethod
    def open(cls, host: str, port: int, *, tenant: str | None = None, token: str | None = None,
             timeout: float = 5.0, connect_timeout: float = 2.0) -> BlockingConnection:
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise NodeUnavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A blocking socket with kernel timeouts: Python's own socket timeouts
        # poll() before every recv/send, one extra system call per operation.
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

    def authenticate(self, tenant: str, token: str) -> None:
        hello = self.call(SimpleCall(Op.HELLO, {}))
        cnonce = auth.new_nonce()
        snonce = hello["nonce"]
        reply = self.call(SimpleCall(Op.AUTH, {"tenant": tenant, "cnonce": cnonce,
                                               "proof": auth.client_proof(token, tenant, snonce, cnonce)}))
        if not auth.verify(auth.server_proof(token, tenant, snonce, cnonce), reply.get("proof", b"")):
            raise AuthError("the node could not prove it knows the tenant's token")

    def close(self) -> None:
        if self.broken is None:
            self.broken = ConnectionLost("closed")
        self.sock.close()

    def call(self, call: Call) -> Any:
        if self.broken is not None:
            raise ConnectionLost(f"connection to {self.address} is broken")
        rid = next(self._ids) & 0xFFFFFFFF
        try:
            self._send([c.encode_head(call.op, rid, call.meta, call.payload_len), *call.payload])
            return self._receive(rid, call)
        except builtins.TimeoutError:
            self.close()
            raise TimeoutError(f"{self.address} did not answer in time") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"connection to {self.address} failed: {exc}") from None
        except (ConnectionLost, c.ProtocolError):
            self.close()
            raise

    def _send(self, bufs: list[Any]) -> None:
        while bufs:
            chunk = bufs[:IOV_MAX]
            sent = self.sock.sendmsg(chunk)
            bufs = c.advance(bufs, len(chunk), sent)

    def _fill(self, view: memoryview) -> None:
        got = self.reader.take_payload_into(view)
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionLost(f"{self.address} closed the connection")
            self.reader.consumed_directly(n)
            got += n

    def _receive(self, rid: int, call: Call) -> Any:
        while True:
            head = self.reader.next_head()
            while not isinstance(head, c.Frame):
                n = self.sock.recv_into(self.reader.recv_buffer())
                if n == 0:
                    raise ConnectionLost(f"{self.address} closed the connection")
                self.reader.received(n)
                head = self.reader.next_head()
            mine = head.request_id == rid
            error: MemKVError | None = None
            if head.request_id == 0 and head.is_error:
                raise error_from_code(int(head.meta.get("code", 2)), str(head.meta.get("msg", "")))
            if not mine or head.is_error or not head.payload_len:
                dests = [memoryview(bytearray(head.payload_len))] if head.payload_len else []
            else:
                try:
                    dests = call.destinations(head)
                except MemKVError as exc:
                    error = exc
                    dests = [memoryview(bytearray(head.payload_len))]
            for d in dests:
                self._fill(d)
            if self.reader.payload_left:
                raise ConnectionLost("reply payload longer than its destinations")
            self.reader.payload_done()
            if not mine:
                continue  # a stale reply of an earlier, abandoned call
            if error is not None:
                raise error
            if head.is_error:
                raise error_from_code(int(head.meta.get("code", 1)), str(head.meta.get("msg", "")))
            return call.finish(head, dests)
