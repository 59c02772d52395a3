"""Value checksums: xxh3-64 over any buffer, without copying it.

Part of the wire contract: a PUT carries the checksum of its value, a reply carries the
stored one, and the node, the client and one-sided readers all compute it the same way.
"""

from __future__ import annotations

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
# Values at least this large are hashed piece by piece as they arrive (``Checksummer``), while
# the bytes are still in the cache and the sender is still sending; below it one call is cheaper.
STREAM_MIN = 128 * 1024


def checksum(buf) -> int:
    """xxh3-64 of the bytes of ``buf`` (bytes, bytearray, memoryview, numpy array, mmap).

    The buffer protocol is used directly, so nothing is copied. A non-contiguous
    buffer (a strided numpy view) cannot be hashed in place and is rejected by
    xxhash with ``BufferError``/``TypeError``.
    """
    return _xxh3(buf)


class Checksummer:
    """``checksum`` computed piece by piece: ``update`` each piece in order, then ``value``.

    The result equals ``checksum`` of the whole. A receiver hashes each piece right after
    ``recv_into`` wrote it, so a large value's hash no longer costs a second pass over the
    whole value (cold by then) after its last byte arrived.
    """

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, buf) -> None:
        self._state.update(buf)

    def value(self) -> int:
        return self._state.intdigest()
