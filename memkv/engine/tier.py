"""What the store asks of the tier under its region (the flash tier of durable namespaces).

The store calls these hooks at fixed points and nowhere else; the tier is given
to the store once, while the node is built (``Store.attach_tier``). The tier
reads the store only through its public methods (``lookup``, ``current``,
``drop``, ``reserve_copy``/``refill``, ``entries``).

* ``admit``: before a durable write is reserved (refuse with ``DiskFull`` before
  any payload is received).
* ``committed``: a durable value was indexed (queue its record; the entry's
  ``flash`` location is set by the tier).
* ``dropped``: an entry with a tier copy leaves the index (an unversioned
  tombstone record when it is freed for good -- a purge, a slot this node no
  longer holds -- so that a restart does not bring it back; dead bytes otherwise;
  a versioned delete's record is written by ``buried``).
* ``buried``: a versioned delete left a tombstone in a durable namespace (persist
  it with its version and purge time, so that a restart keeps refusing older
  writes of the key).
* ``promote_sync``: a caller outside the async request path needs the bytes of a
  value that is only in the tier (blocking read back into the region).
* ``read_head``: the first bytes of a value that is only in the tier, without
  bringing it back (``Store.head``: a restarted node's KV events read the block
  headers of what it recovered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from memkv.engine.entry import Entry


class Tier(Protocol):
    def admit(self, key: bytes, length: int) -> None: ...

    def committed(self, entry: Entry) -> None: ...

    def dropped(self, entry: Entry, reason: str) -> None: ...

    def buried(self, ikey: tuple[str, str, bytes], version: int, until: float) -> None: ...

    def promote_sync(self, entry: Entry) -> None: ...

    def read_head(self, entry: Entry, n: int) -> bytes | None: ...
