"""Typed errors shared by node, client and wire protocol.

Every error has a stable numeric ``code`` so that a node can send it as a typed
reply and the client can re-raise the same class on its side.
"""

from __future__ import annotations


class MemKVError(Exception):
    """Base class of every error memkv raises on purpose."""

    code: int = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class ProtocolError(MemKVError):
    """A frame could not be parsed or broke a rule of the wire protocol."""

    code = 2


class FrameTooLarge(ProtocolError):
    code = 3


class KeyTooLarge(ProtocolError):
    code = 4


class BatchTooLarge(ProtocolError):
    code = 5


class InvalidArgument(MemKVError):
    code = 6


class UnknownNamespace(InvalidArgument):
    code = 7


class KeyExists(MemKVError):
    """The namespace forbids overwriting a block with different bytes."""

    code = 10


class QuotaExceeded(MemKVError):
    code = 11


class OutOfMemory(MemKVError):
    """The region has no room even after eviction (everything left is pinned)."""

    code = 12


class ChecksumMismatch(MemKVError):
    """Bytes did not match the checksum that travelled with them."""

    code = 13


class CorruptValue(ChecksumMismatch):
    """A stored value failed verification; it is dropped and reported."""

    code = 14


class ValueTooLarge(MemKVError):
    code = 15


class VersionConflict(MemKVError):
    code = 16


class AuthError(MemKVError):
    code = 20


class PermissionDenied(MemKVError):
    code = 21


class RateLimited(MemKVError):
    code = 22


class ResourceLimit(MemKVError):
    """A per-connection, per-tenant or per-node resource limit refused the request ([limits])."""

    code = 23


class TooManyConnections(ResourceLimit):
    """The node is at ``[limits] max_connections``; it sends this, then closes the connection."""

    code = 24


class TimeoutError(MemKVError):  # noqa: A001 - deliberately shadows the builtin inside memkv
    code = 30


class ConnectionLost(MemKVError):
    code = 31


class NodeUnavailable(MemKVError):
    code = 32


class NotEnoughReplicas(NodeUnavailable):
    """A write in an ``acks = "all"`` namespace did not reach every owner of its slot that holds a
    live etcd lease, directly or relayed by another owner: it is not acknowledged (it may be stored
    on some of them; a retry is safe)."""

    code = 33


class Moved(MemKVError):
    """The node does not own the slot in the client's epoch; refresh the map."""

    code = 40

    def __init__(self, message: str = "", epoch: int = 0) -> None:
        super().__init__(message)
        if not epoch:
            # Over the wire only (code, message) travels: nodes write "... epoch N".
            import re

            m = re.search(r"\bepoch (\d+)", message)
            epoch = int(m.group(1)) if m else 0
        self.epoch = epoch


class Fenced(MemKVError):
    """The node lost its etcd lease and refuses writes until it re-registers."""

    code = 41


class DiskFull(MemKVError):
    code = 50


class KVLayoutMismatch(MemKVError):
    """A KV-cache block was saved for another model, dtype or shape (client/kvcache.py); never loaded."""

    code = 60


class ServerError(MemKVError):
    """An unexpected failure inside the node (a bug); the connection survives."""

    code = 99


_BY_CODE: dict[int, type[MemKVError]] = {}


def _register(cls: type[MemKVError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(MemKVError)


def error_from_code(code: int, message: str) -> MemKVError:
    """Rebuild the typed exception a peer sent as ``(code, message)``."""
    cls = _BY_CODE.get(code, MemKVError)
    return cls(message)
