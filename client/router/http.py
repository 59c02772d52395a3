"""Minimal HTTP/1.1 over trio with h11 (sans-IO) on both ends: what ``memkv route`` needs.

The server reads one request at a time per connection (keep-alive), the
proxy streams a backend's response to the client event by event: every
``Data`` chunk the backend sends (an SSE token, say) is forwarded as soon as
it arrives, never buffered whole.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

MAX_BODY = 32 << 20
RECV = 64 << 10
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
              b"upgrade", b"host", b"content-length"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class ServerConnection:
    """One client connection: read requests, write responses (h11 server role)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECV)
            self.conn.receive_data(data)

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed the connection."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        event = await self._next()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise HTTPError(400, f"unexpected {type(event).__name__}")
        body = bytearray()
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise HTTPError(413, "request body too large")
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise HTTPError(400, f"unexpected {type(ev).__name__}")
        return Request(event.method.decode(), event.target.decode(), list(event.headers), bytes(body))

    async def send(self, event: object) -> None:
        await self.stream.send_all(self.conn.send(event) or b"")

    async def respond(self, status: int, body: bytes, content_type: str = "application/json",
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await self.send(h11.Response(status_code=status, headers=headers + (extra or [])))
        await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def respond_json(self, status: int, obj: object) -> None:
        await self.respond(status, json.dumps(obj).encode())

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


async def request(host: str, port: int, method: str, target: str, body: bytes = b"",
                  headers: list[tuple[bytes, bytes]] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """A whole request/response to a backend (health checks, /tokenize, /v1/models)."""
    chunks: list[bytes] = []
    status = 0

    async def on_response(resp: h11.Response) -> None:
        nonlocal status
        status = resp.status_code

    async def on_data(data: bytes) -> None:
        chunks.append(data)

    with trio.fail_after(timeout):
        await proxy(host, port, method, target, body, headers or [], on_response, on_data)
    return status, b"".join(chunks)


async def proxy(host: str, port: int, method: str, target: str, body: bytes, headers: list[tuple[bytes, bytes]],
                on_response: Callable[[h11.Response], Awaitable[None]],
                on_data: Callable[[bytes], Awaitable[None]]) -> None:
    """Send a request to ``host:port`` and hand its response to the callbacks as it streams in.

    Raises ``OSError`` (connect/read failures) or ``h11.ProtocolError``;
    ``on_response`` has been called iff the backend answered at all.
    """
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        out = [(b"host", f"{host}:{port}".encode()), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
        out += [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=out)) or b"")
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECV)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                await on_response(event)
            elif isinstance(event, h11.Data):
                await on_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise OSError("backend closed the connection mid-response")
