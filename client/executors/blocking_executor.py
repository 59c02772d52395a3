"""The blocking executor: runs client operations on the caller's thread.

``run`` is the one loop that drives an operation of the client core
(``client/core/requests.py``): a ``NodeCall`` goes over a pooled
``BlockingConnection`` in this very thread (no event loop, no hand-off: a
small GET costs one ``sendmsg`` and one ``recv_into``), ``Parallel``
operations run on a few worker threads with the first on this one,
``Blocking`` work is simply called, and ``WAIT`` yields the GIL.

Parallel parts may themselves ask for parallel parts (a batch split per
replica set, each a write to every replica). A bounded thread pool could
then deadlock — every worker waiting for work queued behind it — so a
waiter runs any part no worker has started yet itself: every wait is then
for work that is running.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memkv.client.core.requests import WAIT, NodeCall, Op, Parallel
from memkv.client.executors.blocking_connection import BlockingPool
from memkv.errors import MemKVError

WORKERS = 16


class BlockingExecutor:
    def __init__(self, pool: BlockingPool) -> None:
        self.pool = pool
        self._threads: ThreadPoolExecutor | None = None

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
                        value = self._parallel(req.ops)
                    elif req is WAIT:
                        time.sleep(0)
                    else:  # Blocking
                        value = req.fn(*req.args)
                except MemKVError as exc:
                    error = exc
        except BaseException:
            op.close()
            raise

    def _outcome(self, op: Op) -> Any:
        try:
            return self.run(op)
        except MemKVError as exc:
            return exc

    def _parallel(self, ops: list[Op]) -> list[Any]:
        if len(ops) <= 1:
            return [self._outcome(op) for op in ops]
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="memkv-client")
        futures = [self._threads.submit(self._outcome, op) for op in ops[1:]]
        results = [self._outcome(ops[0])]
        for f, op in zip(futures, ops[1:], strict=True):
            results.append(self._outcome(op) if f.cancel() else f.result())
        return results

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
