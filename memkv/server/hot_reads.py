"""TCP GETs served on the connection's own thread, read from the node's client-readable index.

Why. A small GET served by the trio loop costs the node four system calls
(``recvfrom``, ``sendmsg``, ``epoll_wait`` and the ``epoll_ctl`` that re-arms
trio's one-shot registration) and two scheduler hand-offs; a server that
blocks in ``recv`` on a thread of its own makes two, and the kernel wakes that
thread directly (docs/benchmarks.md, "Where a TCP GET's time goes"). So a
connection whose client sends GETs is served by a thread that blocks in
``recv``, as long as every frame it reads is a GET it can answer from the
index; anything else goes back to the trio loop.

What such a thread may answer. Only what a one-sided reader in another process
could read itself without asking: the key's entry in the client-readable index
(memkv/engine/readable_index.py ``find_local``, the one-sided reader's
``index_format.find``: even seq, self-check, tag, fingerprint), announced in a
slot of the reader table first (memkv/engine/readers.py, ``ReaderSlot`` as a
same-host client uses it), so the extent is not reused until the reply is in
the socket. The extents being sent are also marked (``ReadableIndex.hazard_set``,
then ``still``: hazard pointers): while no reader outside the process was given
the index, every other freed extent is reused at once, as on a node that
serves TCP only, rather than after the readers' grace. Every value of the reply must hit; a miss (which the node answers
with the key's tombstone), a value being changed, one near its TTL, one only
on flash, a namespace with no published values, a session of a node with
tenants (grants, rate limits and revocation are checked per request), a
cluster node (slot ownership and epochs), a malformed request: the frame is
handed to the trio loop, which runs it through the pipeline unchanged. The
reply is the same bytes the pipeline's would be (``binary.py``'s decoder and
encoder are used for both).

What it owes the node. Reads count for eviction and hit statistics as
one-sided reads do: the thread batches the (slot, seq) pairs it served and the
trio loop applies them (``Store.touch``) with the request counters, once a
second (an idle thread wakes for it) and whenever the thread hands the
connection back: another connection's STATS may see them up to a second late.

The bound. A reader's announcement holds an extent only ``quarantine_s``
(a stalled reader must not hold the region for ever), so the reply must be
in the socket before then: the socket's send timeout is a quarter of the
bound and a reply not sent within half of it is cut off by closing the
connection (the client sees a dead connection, never a wrong value).

Only plain TCP binary connections (not TLS, not RESP) are served this way; the
node builds ``HotReads`` only where it may be used (standalone, ``[node]
tcp_hot_reads = true``). It is off by default: a lone GET stream gets faster
(4 KiB p50 -11 %, 1 MiB +13 % GB/s), but with a writer or 8 readers on the
same node small GETs and PUTs get slower, because the threads and the trio
loop take turns at the GIL (docs/benchmarks.md, "hot reads on vs off").
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from memkv.engine.readable_index import ReadableIndex
from memkv.engine.store import Store
from memkv.errors import MemKVError
from memkv.protocol import codec as c
from memkv.protocol.index_format import ENTRY, ReaderSlot
from memkv.protocol.opcodes import Flag, Op
from memkv.server.binary import BinaryOp
from memkv.server.metrics import NodeMetrics
from memkv.server.session import Session

if TYPE_CHECKING:
    from memkv.server.limits import Watched

IOV_MAX = 512
EXPIRY_MARGIN_S = 2.0  # a value this close to its TTL goes through the pipeline (which decides)
FOLD_INTERVAL_S = 1.0  # the thread hands its touches and counters to the trio loop this often
MAX_THREADS = 256  # connections served by a thread at once; others stay on the trio loop
_GET, _GET_MANY = int(Op.GET), int(Op.GET_MANY)
_RESPONSE = int(Flag.RESPONSE)
_INF = float("inf")


class Gone:
    """The thread's result when the peer closed (or the reply had to be cut off)."""


GONE = Gone()


class _Hit:
    """What ``binary.py``'s GET encoders read of an entry, taken from the entry as the reader found it."""

    __slots__ = ("checksum", "generation", "version", "length")

    def __init__(self, checksum: int, generation: int, version: int, length: int) -> None:
        self.checksum, self.generation, self.version, self.length = checksum, generation, version, length


class HotReads:
    """The node's side: whether a session may be served by a thread, the threads' count, and what
    their reads owe the store and the counters (applied on the trio loop)."""

    def __init__(self, store: Store, metrics: NodeMetrics, tenants: Mapping[str, Any],
                 max_threads: int = MAX_THREADS) -> None:
        self.store = store
        self.metrics = metrics
        self.tenants = tenants  # the live tenant table: once it has any, every GET takes the pipeline
        self.max_threads = max_threads
        self.threads = 0
        self.served = 0
        self.handed_back = 0
        self.cut = 0
        self.no_slot = 0

    def may_serve(self, session: Session) -> bool:
        return not session.auth_required and not self.tenants and self.threads < self.max_threads

    def open(self, conn: Watched, sock: socket.socket, reader: c.FrameReader, session: Session,
             ops: Mapping[int, BinaryOp], limits: c.Limits) -> HotPath | None:
        """The hot path of one connection (on the trio loop): starts the index if no reader did yet and
        claims a reader slot; None when there is no index or no slot (the connection stays on trio)."""
        index = self.store.open_readable_index(shared=False)
        readers = self.store.readers
        if index is None or readers is None:
            return None
        slot = readers.local_slot(index.view, index.base)
        if slot is None:
            self.no_slot += 1
            return None
        return HotPath(self, index, slot, conn, sock, reader, session, ops, limits)

    def fold(self, touches: dict[int, int], gets: int, nbytes: int, took: list[float]) -> None:
        """What a thread served, on the trio loop: hits and eviction order (as one-sided touches are),
        request counters and latencies."""
        index = self.store.readable
        if index is not None:
            for slot, seq in touches.items():
                e = index.entry_at(slot, seq)
                if e is not None:
                    self.store.touch(e)
        m = self.metrics
        m.ops["GET"] += gets
        m.bytes_out += nbytes
        h = m.latency["GET"]
        for t in took:
            h.observe(t)
        self.served += gets

    def stats(self) -> dict[str, int]:
        return {"threads": self.threads, "served": self.served, "handed_back": self.handed_back, "cut": self.cut,
                "no_slot": self.no_slot}


class HotPath:
    """One connection's thread: blocking ``recv``, GETs answered from the index, anything else handed back."""

    def __init__(self, reads: HotReads, index: ReadableIndex, slot: ReaderSlot, conn: Watched,
                 sock: socket.socket, reader: c.FrameReader, session: Session, ops: Mapping[int, BinaryOp],
                 limits: c.Limits) -> None:
        self.reads = reads
        self.index = index
        self.slot = slot
        self.conn = conn
        self.sock = sock
        self.reader = reader
        self.session = session
        self.ops = ops
        self.limits = limits
        self.view = index.view
        self.hazards = index.hazard_set()  # the extents this thread is sending (ReadableIndex.in_use)
        self.bound = index.quarantine_s * 0.5  # a reply must be in the socket within this of its read
        self.token = trio.lowlevel.current_trio_token()
        hard = conn.hard
        self.idle = _INF if hard is None else hard.idle_timeout
        # a blocking send returns (partly done) after this long: the bound is checked between sends
        us = int(index.quarantine_s * 0.25 * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", us // 1000000, us % 1000000))
        # an idle thread wakes this often to hand what it served to the trio loop
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(FOLD_INTERVAL_S), 0))
        self._batch()
        self.served_now = 0  # GETs this thread run served

    def _batch(self) -> None:
        self.touches: dict[int, int] = {}
        self.gets = 0
        self.nbytes = 0
        self.took: list[float] = []
        self.batch_t0 = time.monotonic()

    def take(self) -> tuple[dict[int, int], int, int, list[float]]:
        out = (self.touches, self.gets, self.nbytes, self.took)
        self._batch()
        return out

    # -- the thread
    def run(self) -> c.Frame | Gone | None:
        """Serve until a frame needs the pipeline (returned), the peer goes (``GONE``), or only part of a
        frame is buffered (None: the trio loop's frame timeout applies to it)."""
        sock, reader, conn = self.sock, self.reader, self.conn
        self.served_now = 0
        sock.setblocking(True)
        try:
            while True:
                if not reader.buffered:
                    conn.wait_kind = "idle"
                    conn.deadline = time.monotonic() + self.idle  # for the [limits] reaper
                    while True:
                        try:
                            n = sock.recv_into(reader.recv_buffer())
                            break
                        except BlockingIOError:  # FOLD_INTERVAL_S without a request
                            if self.gets:
                                self.token.run_sync_soon(self.reads.fold, *self.take())
                        except OSError:
                            n = 0
                            break
                    conn.deadline = _INF
                    if n == 0:
                        return GONE
                    reader.received(n)
                try:
                    head = reader.next_head()
                except MemKVError:
                    return None  # the trio loop answers the framing error and closes
                if isinstance(head, c.NeedData):
                    return None
                served = self._serve(head)
                if served is None:
                    return head
                if served is GONE:
                    return GONE
                if time.monotonic() - self.batch_t0 >= FOLD_INTERVAL_S:
                    self.token.run_sync_soon(self.reads.fold, *self.take())
        finally:
            sock.setblocking(False)

    def _serve(self, head: c.Frame) -> bool | Gone | None:
        """Answer ``head`` from the index (True), cut the connection (``GONE``), or None: the pipeline's."""
        op = head.op
        if (op != _GET and op != _GET_MANY) or head.payload_len or head.is_response:
            return None
        reads = self.reads
        if self.session.auth_required or reads.tenants:
            return None
        bop = self.ops[op]
        try:
            req = bop.decode(head.meta, self.limits, 0)
        except MemKVError:
            return None  # the pipeline replies with the error
        t0 = time.perf_counter()
        mono = time.monotonic()
        token, oldest = self.slot.enter(mono)  # before the index is read: the extents found stay ours
        try:
            if not token:
                return None
            index, ns, view, hazards = self.index, req.ns, self.view, self.hazards
            found = []
            for key in req.keys:
                got = index.find_local(ns, "", key, EXPIRY_MARGIN_S)
                if got is None:
                    return None
                found.append(got)
                hazards.add(got[0].offset)
            # marked, then checked: a value withdrawn before its mark is not sent, one withdrawn after it
            # waits for this read's announcement (memkv/engine/store.py ``_free_extent``)
            hits = []
            for f, e in found:
                if not index.still(f, e):
                    return None
                hits.append((view[f.offset:f.offset + f.length], _Hit(f.checksum, e.generation, f.version, f.length),
                             f))
            reply = bop.encode(req, [(v, h) for v, h, _f in hits])
            bufs: list[Any] = [c.encode_head(op, head.request_id, reply.meta, reply.payload_len, _RESPONSE),
                               *reply.buffers]
            if not self._send(bufs, oldest + self.bound):
                reads.cut += 1
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return GONE
        finally:
            self.hazards.clear()
            if token:
                self.slot.leave(token)
        for _v, _h, f in hits:
            self.touches[f.slot] = ENTRY.unpack_from(f.raw)[0]
        self.gets += 1
        self.nbytes += reply.payload_len
        self.took.append(time.perf_counter() - t0)
        self.served_now += 1
        return True

    def _send(self, bufs: list[Any], deadline: float) -> bool:
        """Send the whole reply, each ``sendmsg`` bounded by the socket's send timeout; False when the
        peer is gone or the reply is not out by ``deadline`` (the extent may be reused after it)."""
        sock = self.sock
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = sock.sendmsg(chunk)
            except BlockingIOError:
                sent = 0  # the send timeout passed with nothing sent
            except OSError:
                return False
            bufs = c.advance(bufs, len(chunk), sent)
            if bufs and time.monotonic() > deadline:
                return False
        return True

    # -- the trio loop's side
    def stop(self) -> None:
        """Wake the thread out of its ``recv`` (the connection is being cancelled)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        self.index.drop_hazard_set(self.hazards)
        self.slot.release()
