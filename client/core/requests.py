"""What an operation may ask of its executor: the only four things the client core cannot do itself.

The client core (this package) decides everything — which node, which
replica next, what to repair — but never touches a socket, a thread or a
clock. An *operation* is a generator that yields these requests and gets
their outcome sent back (or the ``MemKVError`` thrown in), the way h11's
connection object hands its owner "send these bytes" and "I need data":

- ``NodeCall(node, call)``: run one ``Call`` on a connection to ``node``,
  within the client's timeout (an executor turns a timeout into
  ``memkv.errors.TimeoutError`` and drops that node's connections);
- ``Parallel(ops)``: run these operations concurrently; the result is one
  entry per operation, its return value or the ``MemKVError`` it ended with
  (the operation that asked decides what a failure means);
- ``WAIT``: nothing to do until another task or thread runs (an RDMA
  completion is pending, or another task is setting a node up);
- ``Blocking(fn, args)``: call ``fn(*args)``, which may block (waiting for a
  slot map after ``MOVED``, the shared-memory hand-off, opening etcd).

Each executor (``client/executors/``) has exactly one loop that runs an
operation by answering these four.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memkv.client.core.calls import Call
    from memkv.client.url import NodeAddress


class NodeCall:
    """Run ``call`` on ``node`` (one request, one reply)."""

    __slots__ = ("node", "call")

    def __init__(self, node: NodeAddress, call: Call) -> None:
        self.node = node
        self.call = call


class Parallel:
    """Run ``ops`` concurrently; each outcome is the op's return value or its ``MemKVError``."""

    __slots__ = ("ops",)

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops


class Blocking:
    """Call ``fn(*args)`` where blocking is allowed (a worker thread under trio)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args


class _Wait:
    __slots__ = ()

    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()

Request = NodeCall | Parallel | Blocking | _Wait
Op = Generator[Request, Any, Any]
