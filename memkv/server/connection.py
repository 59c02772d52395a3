"""One binary-protocol connection on a node: read frames, move payloads, send replies.

Each frame is decoded into a typed request (memkv/server/binary.py) and handed
to the node's pipeline (memkv/server/pipeline.py), the same path RESP requests
take; this module only moves bytes. Payload bytes travel socket -> region
extent (``recv_into``) for writes and region -> socket (``sendmsg`` of
memoryviews) for reads. Replies are queued and flushed when the node is about
to wait for more input, so a pipelining client gets many replies per system
call while a lone request is answered at once.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import TYPE_CHECKING

import trio

from memkv.errors import AuthError, MemKVError, ProtocolError, ServerError
from memkv.errors import TimeoutError as MemKVTimeout
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Flag, Op
from memkv.server.binary import BinaryOp, Reply
from memkv.server.hot_reads import GONE, HotPath, HotReads
from memkv.server.limits import Watched
from memkv.server.requests import Put, Request
from memkv.server.session import Session

if TYPE_CHECKING:
    import outcome

    from memkv.server.node import Node

log = logging.getLogger("memkv.node")

IOV_MAX = 512
_OP_NAMES = {int(op): op.name for op in Op}
_RESPONSE = int(Flag.RESPONSE)
FLUSH_AT = 1 << 20
_DISCARD = bytearray(1 << 20)
_HOT_OPS = (int(Op.GET), int(Op.GET_MANY))
HOT_BACKOFF_MAX = 1024  # frames a connection whose frames the hot path keeps handing back stays on trio


class PeerGone(Exception):
    pass


async def recv_nonblocking(sock: socket.socket, view: memoryview, wait_readable: Callable[[], Awaitable[None]]) -> int:
    """``recv_into`` on a non-blocking socket: try the call, park in ``wait_readable`` only on EAGAIN.

    Shared by the binary-protocol and RESP connections. A closed or failed
    peer raises ``PeerGone``; the result is never 0.
    """
    while True:
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            await wait_readable()
            continue
        except OSError as exc:
            raise PeerGone from exc
        if n == 0:
            raise PeerGone
        return n


class Connection(Watched):
    """Serves one socket.

    The socket is a plain non-blocking stdlib socket driven with trio's
    low-level ``wait_readable``/``wait_writable``: a system call is tried
    first and the task parks only on EAGAIN. trio's socket wrappers add a
    scheduler round trip to every successful call, which costs a small GET a
    third of its latency. To stay fair to other connections, the loop yields
    to the scheduler every ``YIELD_EVERY`` frames that needed no waiting.
    """

    YIELD_EVERY = 16

    def __init__(self, node: Node, sock: socket.socket, peer: str) -> None:
        self.node = node
        self.sock = sock
        # [limits] (memkv/server/limits.py): deadlines of waits on the peer, in-flight bytes.
        self.hard = getattr(node, "hardening", None)
        self.flush_at = FLUSH_AT if self.hard is None else min(FLUSH_AT, self.hard.max_inflight)
        self.reader = c.FrameReader(node.limits)
        self.limits = node.limits
        self.pipeline = node.pipeline
        self.ops = node.binary
        self.session = Session(auth_required=bool(node.tenants), peer=peer)
        self.out: list[memoryview | bytes] = []
        self.out_bytes = 0
        # Replies that wait for a flash group commit: (position in out, op, rid, reply, write seq).
        self.flash = getattr(node, "flash", None)
        self.durable: list[tuple[int, int, int, Reply, int]] = []
        # GETs served on a thread of this connection (memkv/server/hot_reads.py; None: never)
        self.hot_reads: HotReads | None = node.hot_reads
        self.hot: HotPath | None = None
        self.hot_wait = 2  # frames to serve on the trio loop before (again) waiting on the thread
        self.hot_backoff = 1
        self.last_op = 0

    # -- socket helpers
    async def _recv_into(self, view: memoryview) -> int:
        return await recv_nonblocking(self.sock, view, self._wait_readable)

    async def _recv_some(self) -> None:
        self.reader.received(await self._recv_into(self.reader.recv_buffer()))

    async def _recv_exact_into(self, view: memoryview) -> None:
        got = self.reader.take_payload_into(view)
        while got < len(view):
            n = await self._recv_into(view[got:])
            self.reader.consumed_directly(n)
            got += n

    async def _discard_payload(self) -> None:
        while self.reader.skip_payload():
            n = await self._recv_into(memoryview(_DISCARD)[: min(self.reader.payload_left, len(_DISCARD))])
            self.reader.consumed_directly(n)
        self.reader.payload_done()

    def _queue(self, op: int, rid: int, reply: Reply) -> None:
        self.out.append(c.encode_head(op, rid, reply.meta, reply.payload_len, _RESPONSE))
        self.out.extend(reply.buffers)
        self.out_bytes += reply.payload_len + 64
        self.node.metrics.bytes_out += reply.payload_len

    def _queue_error(self, op: int, rid: int, exc: MemKVError) -> None:
        self.node.metrics.errors[type(exc).__name__] += 1
        self.out.append(c.encode_error(op, rid, exc.code, exc.message))
        self.out_bytes += 64

    def _defer(self, op: int, rid: int, reply: Reply, seq: int) -> None:
        """Queue a reply that may be sent only once flash write ``seq`` is durable."""
        self.durable.append((len(self.out), op, rid, reply, seq))
        self.out_bytes += 64

    async def _settle_durable(self) -> None:
        """Wait for the group commit covering the deferred replies; put them in place (or errors)."""
        pending, self.durable = self.durable, []
        flog = self.flash.log
        try:
            await flog.wait(max(p[4] for p in pending))
        except MemKVError:
            pass  # checked per reply below
        for pos, op, rid, reply, seq in reversed(pending):
            try:
                flog.check(seq)
            except MemKVError as exc:
                self.node.metrics.errors[type(exc).__name__] += 1
                frames: list[memoryview | bytes] = [c.encode_error(op, rid, exc.code, exc.message)]
            else:
                frames = [c.encode_head(op, rid, reply.meta, reply.payload_len, _RESPONSE), *reply.buffers]
                self.node.metrics.bytes_out += reply.payload_len
            self.out[pos:pos] = frames

    async def flush(self) -> None:
        if self.durable:
            await self._settle_durable()
        bufs, self.out, self.out_bytes = self.out, [], 0
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = self.sock.sendmsg(chunk)
            except BlockingIOError:
                await self._wait_writable()
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT):
                    raise PeerGone from exc
                raise
            bufs = c.advance(bufs, len(chunk), sent)

    # -- main loop
    async def serve(self) -> None:
        m = self.node.metrics
        since_yield = 0
        try:
            while True:
                try:
                    head = self.reader.next_head()
                except ProtocolError as exc:
                    # Framing is lost: answer once, then close this connection only.
                    self._queue_error(0, 0, exc)
                    await self.flush()
                    return
                if isinstance(head, c.NeedData):
                    if self.reader.buffered:  # part of a frame: [limits] frame_timeout runs
                        self._phase_frame()
                    else:
                        self._phase_idle()
                    flushed = bool(self.out or self.durable)
                    if flushed:
                        await self.flush()
                    if not self.reader.buffered and self._hot_ready():
                        # GETs the index answers are served on a thread (memkv/server/hot_reads.py)
                        hot = await self._serve_hot()
                        if hot is None:
                            continue
                        head = hot
                    else:
                        if flushed and not self.reader.buffered:
                            # A request-response client sends nothing until it has our
                            # reply: skip the recv that would only return EAGAIN.
                            await self._wait_readable()
                        await self._recv_some()
                        since_yield += 1
                        if since_yield >= self.YIELD_EVERY:
                            since_yield = 0
                            await trio.lowlevel.checkpoint()
                        continue
                t0 = time.perf_counter()
                op = head.op
                name = _OP_NAMES.get(op) or str(op)
                m.ops[name] += 1
                self._frame_t0 = None
                await self._handle(head)
                m.latency[name].observe(time.perf_counter() - t0)
                self.hot_wait -= 1
                self.last_op = op
                if self.out_bytes >= self.flush_at:  # also the per-connection in-flight throttle
                    await self.flush()
        except PeerGone:
            return
        finally:
            if self.hot is not None:
                self.hot.close()

    # -- GETs served on a thread (memkv/server/hot_reads.py)
    def _hot_ready(self) -> bool:
        """Whether to wait for the next frame on the hot-read thread: the node serves them, this session
        may use it, the last frame was a GET (a client that only writes never needs the thread, nor the
        index), and the last tries did not just hand every frame back (then the connection waits out
        ``hot_wait`` frames on the trio loop, twice as many after each such try)."""
        reads = self.hot_reads
        if reads is None or self.hot_wait > 0 or self.last_op not in _HOT_OPS or not reads.may_serve(self.session):
            return False
        if self.hot is None:
            self.hot = reads.open(self, self.sock, self.reader, self.session, self.ops, self.limits)
            if self.hot is None:
                self.hot_reads = None  # no index or no reader slot: this connection stays on trio
                return False
        return True

    async def _serve_hot(self) -> c.Frame | None:
        """Run the hot path's thread until it hands a frame back (returned: the pipeline's), leaves a
        partial frame buffered (None) or the peer goes (``PeerGone``). Cancelled (node stopping, a
        [limits] timeout), it wakes the thread and waits for it: the socket is closed only after."""
        hot, reads = self.hot, self.hot_reads
        assert hot is not None and reads is not None
        done = trio.Event()
        result: list[outcome.Outcome] = []
        token = trio.lowlevel.current_trio_token()

        def deliver(out: outcome.Outcome) -> None:
            result.append(out)
            token.run_sync_soon(done.set)

        reads.threads += 1
        try:
            trio.lowlevel.start_thread_soon(hot.run, deliver)
            try:
                await done.wait()
            except trio.Cancelled:
                hot.stop()
                with trio.CancelScope(shield=True):
                    await done.wait()
                raise
        finally:
            reads.threads -= 1
            reads.fold(*hot.take())
        got = result[0].unwrap()
        if hot.served_now:
            self.hot_backoff = 1
        else:
            self.hot_backoff = min(self.hot_backoff * 2, HOT_BACKOFF_MAX)
            self.hot_wait = self.hot_backoff
        if got is GONE:
            raise PeerGone
        if got is not None:
            reads.handed_back += 1
        return got

    async def _handle(self, head: c.Frame) -> None:
        op, rid, meta = head.op, head.request_id, head.meta
        if head.payload_len:  # [limits]: the payload must arrive at min_payload_rate
            self._phase_payload(head.payload_len)
        if head.is_response:
            await self._discard_payload()
            self._queue_error(op, rid, ProtocolError("clients send requests, not responses"))
            return
        bop = self.ops.get(op)
        if bop is None:
            await self._discard_payload()
            self._queue_error(op, rid, ProtocolError(f"opcode {op} is not served by this node"))
            return
        try:
            req = bop.decode(meta, self.limits, head.payload_len)
        except MemKVError as exc:
            await self._discard_payload()
            self._queue_error(op, rid, exc)
            return
        if type(req) is Put:
            await self._put(head, op, rid, req, bop)
            return
        if head.payload_len:
            await self._discard_payload()
            self._queue_error(op, rid, ProtocolError(f"{Op(op).name} takes no payload"))
            return
        await self._run(op, rid, req, bop)

    def notify_timeout(self) -> None:
        """Closed by a [limits] timeout: say so with a typed error frame when the stream allows it."""
        log.info("closing connection %s: %s timeout", self.session.peer, self.timed_out)
        if self.timed_out == "write" or getattr(self, "tls", None) is not None:
            return  # mid-reply, or encrypted: a plaintext frame would only garble the stream
        try:
            self.sock.send(c.encode_error(0, 0, MemKVTimeout.code, f"closed: {self.timed_out} timeout"))
        except OSError:
            pass

    async def _put(self, head: c.Frame, op: int, rid: int, req: Put, bop: BinaryOp) -> None:
        hard = self.hard
        nbytes = head.payload_len
        if hard is not None and self.out_bytes and self.out_bytes + nbytes > hard.max_inflight:
            # Per-connection in-flight bytes: drain queued replies (not reading meanwhile) first.
            await self.flush()
        pipeline, session = self.pipeline, self.session
        try:
            plan = pipeline.begin_put(session, req)
            if plan is None:  # binary sessions are never forwarded
                raise ProtocolError("the keys of this write are served by another node")
        except MemKVError as exc:
            await self._discard_payload()
            self._queue_error(op, rid, exc)
            return
        try:
            for view, length in zip(plan.views(), req.lengths, strict=True):
                if view is None:
                    left = length
                    while left:
                        chunk = memoryview(_DISCARD)[: min(left, len(_DISCARD))]
                        await self._recv_exact_into(chunk)
                        left -= len(chunk)
                else:
                    await self._recv_exact_into(view)
            self.reader.payload_done()
        except BaseException:
            pipeline.abort_put(session, plan)
            raise
        self.node.metrics.bytes_in += nbytes
        try:
            reply = bop.encode(req, pipeline.finish_put(session, plan))
        except MemKVError as exc:
            self._queue_error(op, rid, exc)
            return
        if req.durable:  # durable namespace: reply after the group commit
            self._defer(op, rid, reply, req.durable)
        else:
            self._queue(op, rid, reply)

    async def _run(self, op: int, rid: int, req: Request, bop: BinaryOp) -> None:
        try:
            result = self.pipeline.run(self.session, req)
            if type(result) is CoroutineType:  # a stage or the operation had to wait
                result = await result
            reply = bop.encode(req, result)
        except MemKVError as exc:
            if op == Op.AUTH and isinstance(exc, AuthError):
                self.node.metrics.auth_failures += 1
            self._queue_error(op, rid, exc)
            return
        except Exception as exc:  # a bug must cost one request, never the node
            log.exception("request %s failed", bop.kind)
            self._queue_error(op, rid, ServerError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        if req.durable:  # a delete in a durable namespace: its tombstone first
            self._defer(op, rid, reply, req.durable)
            return
        self._queue(op, rid, reply)
