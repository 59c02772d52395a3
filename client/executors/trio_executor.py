"""The trio executor: runs client operations as trio tasks.

``run`` is the one loop that drives an operation of the client core
(``client/core/requests.py``): a ``NodeCall`` goes over a pooled, shared
``TrioConnection`` within the client's timeout (a node that does not answer
in time becomes ``TimeoutError`` and its connections are dropped, so the
operation fails over instead of hanging), ``Parallel`` operations run as
tasks of one nursery, ``Blocking`` work runs in a worker thread (never on
the event loop), and ``WAIT`` is a checkpoint.
"""

from __future__ import annotations

from typing import Any

import trio

from memkv.client.core.calls import Call
from memkv.client.core.requests import WAIT, NodeCall, Op, Parallel
from memkv.client.executors.trio_connection import TrioPool
from memkv.client.url import NodeAddress
from memkv.errors import MemKVError, TimeoutError


class TrioExecutor:
    def __init__(self, pool: TrioPool, *, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def run(self, op: Op) -> Any:
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
                        value = await self._call(req.node, req.call)
                    elif type(req) is Parallel:
                        value = await self._parallel(req.ops)
                    elif req is WAIT:
                        await trio.sleep(0)
                    else:  # Blocking
                        value = await trio.to_thread.run_sync(req.fn, *req.args)
                except MemKVError as exc:
                    error = exc
        except BaseException:
            op.close()
            raise

    async def _call(self, node: NodeAddress, call: Call) -> Any:
        with trio.move_on_after(self.timeout) as scope:
            conn = await self.pool.get(node)
            return await conn.call(call)
        if scope.cancelled_caught:
            self.pool.drop(node)
        raise TimeoutError(f"{node} did not answer within {self.timeout}s")

    async def _outcome(self, op: Op) -> Any:
        try:
            return await self.run(op)
        except MemKVError as exc:
            return exc

    async def _parallel(self, ops: list[Op]) -> list[Any]:
        if len(ops) <= 1:
            return [await self._outcome(op) for op in ops]
        results: list[Any] = [None] * len(ops)

        async def one(i: int, op: Op) -> None:
            results[i] = await self._outcome(op)

        async with trio.open_nursery() as nursery:
            for i, op in enumerate(ops):
                nursery.start_soon(one, i, op)
        return results
