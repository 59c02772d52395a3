"""Value checksums: xxh3-64 over any buffer, without copying it.

Part of the wire contract: a PUT carries the checksum of its value, a reply carries the
stored one, and the node, the client and one-sided readers all compute it the same way.
"""

from __future__ import annotations

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest


def checksum(buf) -> int:
    """xxh3-64 of the bytes of ``buf`` (bytes, bytearray, memoryview, numpy array, mmap).

    The buffer protocol is used directly, so nothing is copied. A non-contiguous
    buffer (a strided numpy view) cannot be hashed in place and is rejected by
    xxhash with ``BufferError``/``TypeError``.
    """
    return _xxh3(buf)
