"""The blocking executor: runs client operations on the caller's thread.

``run`` is the one loop that drives an operation of the client core
(``client/core/requests.py``): a ``NodeCall`` goes over a pooled
``BlockingConnection`` in this very thread (no event loop, no hand-off: a
small GET costs one ``sendmsg`` and one ``recv_into``), ``Parallel``
operations are driven together by a ``FanOut`` on this same thread,
``Blocking`` work is simply called, and ``WAIT`` yields the GIL.

Why no threads for ``Parallel``: its operations are almost always one call
each to different nodes (a batch split per worker or per replica set, a write
to every replica). Handing one to a pool thread cost the client more than the
call itself (a wake-up, a future, the GIL passed back and forth: 20-44 µs a
key of a split batch instead of 14-23); sending every request first and then
reading the replies as they come needs no thread, and the nodes still work
on them at the same time.
"""

from __future__ import annotations

import select
import time
from collections import deque
from typing import Any

from memkv.client.core.protocol import Pending
from memkv.client.core.requests import WAIT, NodeCall, Op, Parallel
from memkv.client.executors.blocking_connection import BlockingConnection, BlockingPool
from memkv.client.url import NodeAddress
from memkv.errors import MemKVError


class BlockingExecutor:
    def __init__(self, pool: BlockingPool) -> None:
        self.pool = pool

    def run(self, op: Op) -> Any:
        """Drive ``op`` to its end; its result, or the error it raised."""
        value: Any = None
        error: MemKVError | None = None
        try:
            while True:
                try:
                    req = op.send(value) if error is None else op.throw(error)
                except StopIteration as stop:
                    return stop.value
                value = error = None
                try:
                    if type(req) is NodeCall:
                        value = self.pool.call(req.node, req.call)
                    elif type(req) is Parallel:
                        value = FanOut(self.pool).run(req.ops)
                    elif req is WAIT:
                        time.sleep(0)
                    else:  # Blocking
                        value = req.fn(*req.args)
                except MemKVError as exc:
                    error = exc
        except BaseException:
            op.close()
            raise


class _Group:
    """The operations of one ``Parallel``: their outcomes, and the task that waits for them."""

    __slots__ = ("waiter", "results", "left")

    def __init__(self, waiter: _Task | None, n: int) -> None:
        self.waiter = waiter
        self.results: list[Any] = [None] * n
        self.left = n


class _Task:
    """One operation of a fan-out, and what to send into it next."""

    __slots__ = ("op", "group", "index", "value", "error")

    def __init__(self, op: Op, group: _Group, index: int) -> None:
        self.op = op
        self.group = group
        self.index = index
        self.value: Any = None
        self.error: MemKVError | None = None


class _InFlight:
    """A call sent and not yet answered: on which connection, and until when its reply may come."""

    __slots__ = ("task", "node", "conn", "pending", "fd", "deadline")

    def __init__(self, task: _Task, node: NodeAddress, conn: BlockingConnection, pending: Pending,
                 deadline: float) -> None:
        self.task = task
        self.node = node
        self.conn = conn
        self.pending = pending
        self.fd = conn.sock.fileno()
        self.deadline = deadline


class FanOut:
    """Runs the operations of a ``Parallel`` together on the caller's thread.

    Each operation runs until it asks for a call, which is sent at once (on a
    connection of its own, checked out of the pool); when every operation is
    waiting, the replies are read as they arrive (``poll`` over the connections
    with a call in flight; with one, a plain blocking read), and the operation
    whose reply is in runs on to its next call. So every node gets its request
    before any reply is read, and nothing waits for a thread.

    Nested ``Parallel`` operations join the same fan-out; ``WAIT`` puts an
    operation aside until a reply came in or the others had their turn (it
    waits for another operation or another thread); ``Blocking`` work is called
    in place. The timeout is the socket's, for every call at once: a call of
    which nothing arrived for the client's timeout (since it was sent, or since
    the last piece of its reply) fails with ``TimeoutError`` and its connection
    is closed, as in ``BlockingConnection.call`` -- so hung nodes cost the
    fan-out one timeout together, not one each.
    """

    def __init__(self, pool: BlockingPool) -> None:
        self.pool = pool
        self.ready: deque[_Task] = deque()
        self.waiting: list[_Task] = []
        self.inflight: dict[int, _InFlight] = {}
        self.live: set[_Task] = set()
        self.poller: Any = None

    def run(self, ops: list[Op]) -> list[Any]:
        """Each op's return value or the ``MemKVError`` it ended with, in order."""
        top = _Group(None, len(ops))
        for i, op in enumerate(ops):
            task = _Task(op, top, i)
            self.live.add(task)
            self.ready.append(task)
        try:
            while top.left:
                while self.ready:
                    self._step(self.ready.popleft())
                if self.inflight:
                    self._receive()
                elif self.waiting:
                    time.sleep(0)  # what they wait for runs on another thread
                if self.waiting:
                    self.ready.extend(self.waiting)
                    self.waiting.clear()
        except BaseException:
            self._abandon()
            raise
        return top.results

    def _step(self, task: _Task) -> None:
        """Run ``task``'s operation up to its next call (sent here), wait, parallel part or end."""
        op = task.op
        while True:
            try:
                req = op.send(task.value) if task.error is None else op.throw(task.error)
            except StopIteration as stop:
                self._finish(task, stop.value)
                return
            except MemKVError as exc:
                self._finish(task, exc)
                return
            task.value = task.error = None
            if type(req) is NodeCall:
                try:
                    self._send(task, req.node, req)
                    return
                except MemKVError as exc:
                    task.error = exc
            elif type(req) is Parallel:
                if not req.ops:
                    task.value = []
                    continue
                group = _Group(task, len(req.ops))
                for i, sub in enumerate(req.ops):
                    child = _Task(sub, group, i)
                    self.live.add(child)
                    self.ready.append(child)
                return
            elif req is WAIT:
                self.waiting.append(task)
                return
            else:  # Blocking
                try:
                    task.value = req.fn(*req.args)
                except MemKVError as exc:
                    task.error = exc

    def _send(self, task: _Task, node: NodeAddress, req: NodeCall) -> None:
        conn = self.pool.take(node)
        try:
            pending = conn.send(req.call)
        except BaseException:
            self.pool.give(node, conn)  # (closed by the failure: the pool drops it)
            raise
        sent = _InFlight(task, node, conn, pending, time.monotonic() + self.pool.timeout)
        self.inflight[sent.fd] = sent
        if self.poller is not None:
            self.poller.register(sent.fd, select.POLLIN)

    def _finish(self, task: _Task, outcome: Any) -> None:
        self.live.discard(task)
        group = task.group
        group.results[task.index] = outcome
        group.left -= 1
        if not group.left and group.waiter is not None:
            group.waiter.value = group.results
            self.ready.append(group.waiter)

    def _receive(self) -> None:
        """Read replies until at least one call is answered (or timed out)."""
        if len(self.inflight) == 1:  # nothing to interleave: the plain blocking read
            (sent,) = self.inflight.values()
            try:
                sent.task.value = sent.conn.receive(sent.pending)
            except MemKVError as exc:
                sent.task.error = exc
            self._answered(sent)
            return
        if self.poller is None:
            self.poller = select.poll()
            for fd in self.inflight:
                self.poller.register(fd, select.POLLIN)
        timeout = self.pool.timeout
        while not self.ready:
            wait = min(s.deadline for s in self.inflight.values()) - time.monotonic()
            events = self.poller.poll(max(0, int(wait * 1000) + 1))
            now = time.monotonic()
            for fd, _ev in events:
                sent = self.inflight[fd]
                sent.deadline = now + timeout  # like the socket's timeout: for each read, not the whole reply
                try:
                    if not sent.conn.receive_some(sent.pending):
                        continue
                    sent.task.value = sent.pending.outcome()
                except MemKVError as exc:
                    sent.task.error = exc
                self._answered(sent)
            for sent in [s for s in self.inflight.values() if s.deadline <= now]:
                sent.task.error = sent.conn.expire()  # no reply, nor a piece of one, within the timeout
                self._answered(sent)

    def _answered(self, sent: _InFlight) -> None:
        self._done(sent)
        self.pool.give(sent.node, sent.conn)
        self.ready.append(sent.task)

    def _done(self, sent: _InFlight) -> None:
        del self.inflight[sent.fd]
        if self.poller is not None:
            self.poller.unregister(sent.fd)

    def _abandon(self) -> None:
        """Something other than a ``MemKVError`` (an interrupt, a bug) ends the fan-out: the calls
        in flight are given up with their connections, and every operation is closed."""
        for sent in list(self.inflight.values()):
            self._done(sent)
            sent.conn.close()
        for task in self.live:
            task.op.close()
        self.live.clear()
