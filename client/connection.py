"""A pipelined, multiplexed trio connection to one node.

Many tasks may share one connection. Each sends its frame under a send lock,
then waits for its reply; whichever waiting task holds the receive lock reads
the next reply frame and hands it to its owner (by request id), receiving the
payload straight into the owner's buffers. There is no background reader
task, so a connection needs no nursery of its own and nothing outlives the
calls that use it. A cancellation in the middle of a frame breaks the
connection (framing is lost) and every waiter gets ``ConnectionLost``.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import trio

from memkv.client.calls import Call
from memkv.errors import AuthError, ConnectionLost, MemKVError, NodeUnavailable, error_from_code
from memkv.protocol import auth
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op

IOV_MAX = 512


class _Pending:
    __slots__ = ("call", "done", "result", "error")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class TrioConnection:
    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self.sock = sock
        self.address = address
        self.reader = c.FrameReader(buffer_size=256 * 1024)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self.broken: BaseException | None = None

    @classmethod
    async def open(cls, host: str, port: int, *, tenant: str | None = None, token: str | None = None,
                   connect_timeout: float = 2.0) -> TrioConnection:
        with trio.move_on_after(connect_timeout) as scope:
            try:
                stream_sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                                 trio.socket.SOCK_STREAM)
                await stream_sock.connect((host, port))
            except OSError as exc:
                stream_sock.close()
                raise NodeUnavailable(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        if scope.cancelled_caught:
            stream_sock.close()
            raise NodeUnavailable(f"connect to {host}:{port} timed out")
        stream_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(stream_sock, f"{host}:{port}")
        if tenant is not None:
            try:
                await conn.authenticate(tenant, token or "")
            except BaseException:
                conn.close()
                raise
        return conn

    async def authenticate(self, tenant: str, token: str) -> None:
        from memkv.client.calls import SimpleCall

        hello = await self.call(SimpleCall(Op.HELLO, {}))
        cnonce = auth.new_nonce()
        snonce = hello["nonce"]
        reply = await self.call(SimpleCall(Op.AUTH, {
            "tenant": tenant, "cnonce": cnonce,
            "proof": auth.client_proof(token, tenant, snonce, cnonce)}))
        if not auth.verify(auth.server_proof(token, tenant, snonce, cnonce), reply.get("proof", b"")):
            raise AuthError("the node could not prove it knows the tenant's token")

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._break(ConnectionLost(f"connection to {self.address} closed"))

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
            self.sock.close()
        for p in self._pending.values():
            if not p.done:
                p.done, p.error = True, ConnectionLost(f"connection to {self.address} lost: {exc}")
        self._pending.clear()

    async def call(self, call: Call) -> Any:
        if self.broken is not None:
            raise ConnectionLost(f"connection to {self.address} is broken: {self.broken}")
        rid = next(self._ids) & 0xFFFFFFFF
        pending = _Pending(call)
        self._pending[rid] = pending
        try:
            head = c.encode_head(call.op, rid, call.meta, call.payload_len)
            async with self._send_lock:
                try:
                    await self._send([head, *call.payload])
                except BaseException as exc:
                    self._break(exc)
                    raise
            while not pending.done:
                async with self._recv_lock:
                    if pending.done:
                        break
                    try:
                        await self._read_one()
                    except BaseException as exc:
                        self._break(exc)
                        raise
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _send(self, bufs: list[Any]) -> None:
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = await self.sock.sendmsg(chunk)
            except OSError as exc:
                raise ConnectionLost(f"send to {self.address} failed: {exc}") from None
            bufs = c.advance(bufs, len(chunk), sent)

    async def _recv_some(self) -> None:
        try:
            n = await self.sock.recv_into(self.reader.recv_buffer())
        except OSError as exc:
            raise ConnectionLost(f"receive from {self.address} failed: {exc}") from None
        if n == 0:
            raise ConnectionLost(f"{self.address} closed the connection")
        self.reader.received(n)

    async def _fill(self, view: memoryview) -> None:
        got = self.reader.take_payload_into(view)
        while got < len(view):
            try:
                n = await self.sock.recv_into(view[got:])
            except OSError as exc:
                raise ConnectionLost(f"receive from {self.address} failed: {exc}") from None
            if n == 0:
                raise ConnectionLost(f"{self.address} closed the connection")
            self.reader.consumed_directly(n)
            got += n

    async def _read_one(self) -> None:
        while True:
            head = self.reader.next_head()
            if isinstance(head, c.Frame):
                break
            await self._recv_some()
        pending = self._pending.get(head.request_id)
        if head.request_id == 0 and head.is_error:
            # The node lost framing on our stream and is about to close it.
            raise error_from_code(head.meta.get("code", 2), str(head.meta.get("msg", "")))
        if pending is None or head.is_error:
            dests = [memoryview(bytearray(head.payload_len))] if head.payload_len else []
        else:
            try:
                dests = pending.call.destinations(head) if head.payload_len else []
            except MemKVError as exc:
                pending.error = exc
                dests = [memoryview(bytearray(head.payload_len))]
        for d in dests:
            await self._fill(d)
        if self.reader.payload_left:
            raise ConnectionLost("reply payload longer than its destinations")
        self.reader.payload_done()
        if pending is None:
            return  # a reply to a call that was cancelled
        pending.done = True
        if pending.error is not None:
            return
        if head.is_error:
            pending.error = error_from_code(int(head.meta.get("code", 1)), str(head.meta.get("msg", "")))
            return
        try:
            pending.result = pending.call.finish(head, dests)
        except MemKVError as exc:
            pending.error = exc
