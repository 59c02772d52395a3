"""One connection to a node, as a sans-IO protocol object that both connection classes drive.

``ConnectionProtocol`` holds everything about a connection except its socket:
the frame reader, request ids and the calls waiting for them (many calls may
share one connection: replies are matched by request id, in any order), the
opening sequence (TLS handshake, then HELLO/AUTH when a tenant is given) and,
for ``memkvs://``, the TLS session itself (``ssl.SSLObject`` over memory
BIOs, so TLS is bytes in, bytes out like everything else here).

Its owner — ``TrioConnection`` or ``BlockingConnection`` — only moves bytes::

    pending = proto.start(call)              # queue a request
    send(proto.data_to_send())               # whatever is due, in order
    while not pending.done:
        n = sock.recv_into(proto.recv_buffer())
        proto.received(n)                    # parse, decrypt, complete calls
    return pending.outcome()

Payload bytes go straight into where they belong: ``recv_buffer()`` is the
caller's destination itself while a reply payload is being received and
nothing else is buffered (plain TCP), so a large GET is received into the
caller's buffer (or a fresh ``bytes``) by ``recv_into`` with no copy.

Errors: a failure of one call (an error reply, a buffer too small, a bad
checksum) is that call's outcome. A failure of the connection (end of
stream, a malformed frame, a request-id-0 error, a TLS or authentication
failure) makes it ``broken``: ``received`` raises it and every waiting call
gets ``ConnectionLost``.
"""

from __future__ import annotations

import itertools
import ssl
from typing import Any

from memkv.client.core.calls import Call, SimpleCall
from memkv.errors import AuthError, ConnectionLost, MemKVError, NodeUnavailable, error_from_code
from memkv.protocol import auth
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op

BUFFER = 256 * 1024  # frame reader buffer; also the TLS ciphertext receive buffer
COALESCE = 64 * 1024  # TLS: small buffers are joined so that each record carries a useful amount
# TLS: plaintext encrypted per ``data_to_send()`` call, so that the node decrypts one piece while
# the next is encrypted (encrypting a large value whole before sending any of it serialises the two)
TLS_PIECE = 128 * 1024
_NONE: list[memoryview] = []


class Pending:
    """A call sent on a connection, waiting for its reply."""

    __slots__ = ("call", "rid", "done", "result", "error")

    def __init__(self, call: Call, rid: int) -> None:
        self.call = call
        self.rid = rid
        self.done = False
        self.result: Any = None
        self.error: MemKVError | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class ConnectionProtocol:
    def __init__(self, address: str, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 tenant: str | None = None, token: str | None = None) -> None:
        self.address = address
        self.reader = c.FrameReader(buffer_size=BUFFER)
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._out: list[Any] = []  # plain TCP: buffers due to be sent, in order
        self.broken: MemKVError | None = None
        # the reply being received: its head, its call (None: nobody waits) and destinations
        self._frame: c.Frame | None = None
        self._owner: Pending | None = None
        self._dests: list[memoryview] = _NONE
        self._dest_i = 0
        self._dest_pos = 0
        self._direct = False  # the last recv_buffer() was a destination, not the reader's buffer
        self._watch = False  # the call receiving wants each piece of payload as it lands (Call.landed)
        self._tls: ssl.SSLObject | None = None
        if tls is not None:
            self._bio_in, self._bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = tls.wrap_bio(self._bio_in, self._bio_out, server_hostname=server_hostname)
            self._raw = memoryview(bytearray(BUFFER))
            self._plain: list[Any] = []  # TLS: plaintext due, not encrypted yet
        self._handshaken = tls is None
        self._credentials = (tenant, token or "") if tenant is not None else None
        self._hello: Pending | None = None
        self._auth: Pending | None = None
        self._cnonce = self._snonce = b""
        self.ready = False  # handshake and authentication done: calls may be started
        self.replies = 0  # replies received so far (a reader may stop at a reply boundary)
        self._advance_open()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def handshaken(self) -> bool:
        """The TLS handshake is done (always, without TLS)."""
        return self._handshaken

    # -- requests
    def start(self, call: Call) -> Pending:
        """Queue ``call``; its bytes come out of ``data_to_send()``."""
        if self.broken is not None:
            raise ConnectionLost(f"connection to {self.address} is broken: {self.broken}")
        rid = next(self._ids) & 0xFFFFFFFF
        if rid == 0:  # request id 0 is the node's "framing lost" reply
            rid = next(self._ids) & 0xFFFFFFFF
        pending = Pending(call, rid)
        self._pending[rid] = pending
        head = c.encode_head(call.op, rid, call.meta, call.payload_len)
        if self._tls is None:
            self._out.append(head)
            if call.payload:
                self._out.extend(call.payload)
        else:
            self._plain.extend(_coalesce([head, *call.payload]))
        return pending

    def forget(self, pending: Pending) -> None:
        """The caller stopped waiting (cancelled): its reply, when it comes, is drained and dropped.

        If that reply is being received right now, the rest of its payload goes to
        scratch space instead of the caller's buffer, which is the caller's again."""
        self._pending.pop(pending.rid, None)
        if self._owner is pending:
            left = sum(len(d) for d in self._dests[self._dest_i:]) - self._dest_pos
            self._owner, self._watch = None, False
            self._dests, self._dest_i, self._dest_pos = [memoryview(bytearray(left))], 0, 0

    def data_to_send(self) -> list[Any]:
        """Buffers to send now, in order (``sendmsg`` them; empty when nothing is due).

        Call again until it is empty: with TLS each call encrypts the next piece only."""
        if self._tls is None:
            out, self._out = self._out, []
            return out
        if self._plain and self._handshaken:
            budget = TLS_PIECE
            while self._plain and budget > 0:
                chunk = memoryview(self._plain[0]).cast("B")
                n = min(budget, chunk.nbytes)
                self._tls.write(chunk[:n])
                budget -= n
                if n == chunk.nbytes:
                    self._plain.pop(0)
                else:
                    self._plain[0] = chunk[n:]
        data = self._bio_out.read()
        return [data] if data else []

    # -- replies
    def recv_buffer(self) -> memoryview:
        """Where the next ``recv_into`` goes."""
        if self._tls is not None:
            return self._raw
        view, self._direct = self._target()
        return view

    def received(self, n: int) -> None:
        """``n`` bytes arrived in ``recv_buffer()`` (0: the peer closed). Raises when the connection broke."""
        if self.broken is not None:
            raise self.broken
        if n == 0:
            self._break(ConnectionLost(f"{self.address} closed the connection"))
        try:
            if self._tls is None:
                if self._direct:  # straight into a destination: unless it is full, nothing to parse
                    self.reader.consumed_directly(n)
                    self._dest_pos += n
                    if self._watch:
                        self._landed(n)
                    if self._dest_pos < len(self._dests[self._dest_i]):
                        return
                else:
                    self.reader.received(n)
                self._process()
            else:
                self._bio_in.write(self._raw[:n])
                self._decrypt()
            if not self.ready:
                self._advance_open()
        except MemKVError as exc:
            self._break(exc)

    def tls_output_due(self) -> bool:
        """TLS only: bytes are due (receiving produced some: a key update to answer; or plaintext
        queued while the handshake was not done)."""
        return self._tls is not None and (self._bio_out.pending > 0 or (bool(self._plain) and self._handshaken))

    def abort(self, reason: BaseException) -> None:
        """The connection is gone (its socket failed, or it was closed): every waiting call gets ``ConnectionLost``."""
        if self.broken is None:
            self.broken = reason if isinstance(reason, MemKVError) else \
                ConnectionLost(f"connection to {self.address} lost: {reason}")
        self._fail_all(self.broken)

    def close(self) -> None:
        self.abort(ConnectionLost(f"connection to {self.address} closed"))

    # -- inside
    def _target(self) -> tuple[memoryview, bool]:
        if self._frame is not None and self._dest_i < len(self._dests) and not self.reader.buffered:
            return self._dests[self._dest_i][self._dest_pos:], True
        return self.reader.recv_buffer(), False

    def _take(self, n: int, direct: bool) -> None:
        if direct:
            self.reader.consumed_directly(n)
            self._dest_pos += n
            if self._watch:
                self._landed(n)
        else:
            self.reader.received(n)

    def _decrypt(self) -> None:
        if not self._handshaken:
            self._advance_open()
            if not self._handshaken:
                return
        tls = self._tls
        assert tls is not None
        bio_in = self._bio_in
        while bio_in.pending or tls.pending():  # (a read with nothing to decrypt raises, which costs)
            view, direct = self._target()
            try:
                n = tls.read(len(view), view)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                raise ConnectionLost(f"{self.address} closed the TLS session") from None
            except ssl.SSLError as exc:
                raise ConnectionLost(f"TLS error on the connection to {self.address}: {exc}") from None
            if n == 0:
                return
            self._take(n, direct)
            self._process()

    def _process(self) -> None:
        """Parse what is buffered: heads, payloads into their destinations, finished replies."""
        reader = self.reader
        while True:
            if self._frame is None:
                head = reader.next_head()
                if not isinstance(head, c.Frame):
                    return
                self._begin(head)
            dests = self._dests
            while self._dest_i < len(dests):
                d = dests[self._dest_i]
                if self._dest_pos < len(d):
                    got = reader.take_payload_into(d[self._dest_pos:])
                    self._dest_pos += got
                    if got and self._watch:
                        self._landed(got)
                    if self._dest_pos < len(d):
                        return
                self._dest_i += 1
                self._dest_pos = 0
            if reader.payload_left:
                raise ConnectionLost(f"reply payload from {self.address} longer than its destinations")
            reader.payload_done()
            self._complete()

    def _landed(self, n: int) -> None:
        """The last ``n`` bytes written to the current destination: the call sees them while they are hot."""
        assert self._owner is not None
        pos = self._dest_pos
        self._owner.call.landed(self._dest_i, self._dests[self._dest_i][pos - n:pos])

    def _begin(self, head: c.Frame) -> None:
        if head.request_id == 0 and head.is_error:
            # the node lost framing on our stream and is about to close it
            raise error_from_code(int(head.meta.get("code", 2)), str(head.meta.get("msg", "")))
        owner = self._pending.get(head.request_id)
        self._frame, self._owner, self._dest_i, self._dest_pos = head, owner, 0, 0
        self._watch = False
        n = head.payload_len
        if not n:
            self._dests = _NONE
        elif owner is None or head.is_error:
            self._dests = [memoryview(bytearray(n))]  # a reply nobody waits for any more: drained
        else:
            try:
                self._dests = owner.call.destinations(head)
                self._watch = owner.call.watches_payload
            except MemKVError as exc:
                owner.error = exc
                self._dests = [memoryview(bytearray(n))]

    def _complete(self) -> None:
        head, owner, dests = self._frame, self._owner, self._dests
        self._frame, self._owner, self._dests, self._watch = None, None, _NONE, False
        self.replies += 1
        if owner is None or head is None:
            return  # the reply to a call that was given up
        del self._pending[owner.rid]
        owner.done = True
        if owner.error is not None:
            return
        if head.is_error:
            owner.error = error_from_code(int(head.meta.get("code", 1)), str(head.meta.get("msg", "")))
            return
        try:
            owner.result = owner.call.finish(head, dests)
        except MemKVError as exc:
            owner.error = exc

    def _break(self, exc: MemKVError) -> None:
        if self.broken is None:
            self.broken = exc
        self._fail_all(exc)
        raise exc

    def _fail_all(self, exc: MemKVError) -> None:
        for p in self._pending.values():
            if not p.done:
                p.done, p.error = True, ConnectionLost(f"connection to {self.address} lost: {exc}")
        self._pending.clear()

    # -- opening: TLS handshake, then HELLO/AUTH (mutual: the node proves it knows the token too)
    def _advance_open(self) -> None:
        if not self._handshaken:
            assert self._tls is not None
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise NodeUnavailable(f"TLS handshake with {self.address} failed: {exc}") from None
            self._handshaken = True
        if self._credentials is None:
            self.ready = True
            return
        tenant, token = self._credentials
        if self._hello is None:
            self._hello = self.start(SimpleCall(Op.HELLO, {}))
            return
        if not self._hello.done:
            return
        if self._auth is None:
            snonce = self._hello.outcome()["nonce"]
            self._cnonce = auth.new_nonce()
            self._auth = self.start(SimpleCall(Op.AUTH, {
                "tenant": tenant, "cnonce": self._cnonce,
                "proof": auth.client_proof(token, tenant, snonce, self._cnonce)}))
            self._snonce = snonce
            return
        if not self._auth.done:
            return
        reply = self._auth.outcome()
        if not auth.verify(auth.server_proof(token, tenant, self._snonce, self._cnonce), reply.get("proof", b"")):
            raise AuthError("the node could not prove it knows the tenant's token")
        self.ready = True


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
