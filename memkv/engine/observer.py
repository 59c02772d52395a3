"""What the store tells the subsystems that follow its contents (the node's KV events).

The store calls these hooks at fixed points and nowhere else; observers are
given to the store once, while the node is built (``Store.attach_observer``;
a node subsystem declares one in its ``Extension.store_observer``):

* ``indexed(entry)``: a new value entered the index -- a client write, a
  replica's or a slot migration's copy, a read repair. Not an idempotent
  re-put of the same bytes, nor a write dropped as older than the value held.
  The value's bytes are in the region (``Store.view``) during the call.
* ``dropped(entry, reason)``: a value left the index. ``reason``: "evict"
  (memory pressure; a value that also lives on flash is not dropped by
  eviction, only its region copy goes), "expire" (TTL), "delete" (a client
  delete, a tenant purge, a slot handed off after a migration), "replace"
  (overwritten by a newer write), "corrupt" (a checksum mismatch),
  "rollback" (a durable write whose record never reached the disk).

Hooks run synchronously on the store's thread, on the write path: they must be
quick and must not call back into the store's writes. Entries that were
already indexed when an observer was attached (those recovered from flash)
are not announced to it; it lists them with ``Store.entries``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from memkv.engine.entry import Entry


class StoreObserver(Protocol):
    def indexed(self, entry: Entry) -> None: ...

    def dropped(self, entry: Entry, reason: str) -> None: ...
