"""One index entry: where a value lives and everything the node knows about it."""

from __future__ import annotations


class Entry:
    """Metadata of one stored value (the payload itself lives only in the region).

    ``offset`` is -1 when the value is not in the region (e.g. only on flash,
    see ``flash``). ``pin_until`` is ``math.inf`` for a pin without TTL.
    ``children`` counts live entries whose ``parent`` is this key (same
    namespace/tenant scope); a chain head with children is never evicted.
    ``ikey`` is the index key ``(namespace, scope tenant, key)`` and ``size``
    the bytes the entry takes in the region (length rounded up). ``exposed``
    is set once a reader may have learnt where the bytes are (get, view,
    lookup_prefix, or the node's own sender); only then does freeing the extent need the
    quarantine for its whole bound. ``indexed`` is set once the value was published in the
    client-readable index: readers of the index announce their reads (memkv/engine/readers.py),
    so its extent is reusable as soon as no read that may have found it is still going.
    ``version`` orders the writes of one key across replicas (memkv/protocol/versions.py).
    """

    __slots__ = (
        "key", "namespace", "tenant", "offset", "length", "checksum", "generation",
        "created", "expires", "pin_until", "lease_until", "parent", "children", "pool",
        "hits", "flash", "ikey", "size", "exposed", "indexed", "version",
    )

    def __init__(
        self,
        key: bytes,
        namespace: str,
        tenant: str,
        offset: int,
        length: int,
        checksum: int,
        generation: int,
        created: float,
        expires: float | None = None,
        pin_until: float | None = None,
        parent: bytes | None = None,
        pool: str = "shared",
        ikey: tuple[str, str, bytes] | None = None,
        size: int = 0,
        version: int = 0,
    ) -> None:
        self.key = key
        self.namespace = namespace
        self.tenant = tenant
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.generation = generation
        self.created = created
        self.expires = expires
        self.pin_until = pin_until
        self.lease_until = 0.0
        self.parent = parent
        self.children = 0
        self.pool = pool
        self.hits = 0
        self.flash: object | None = None
        self.ikey = ikey if ikey is not None else (namespace, tenant, key)
        self.size = size
        self.exposed = False  # a reader may hold a descriptor for the whole bound (Store.expose)
        self.indexed = False  # published in the client-readable index (ReadableIndex.published)
        self.version = version

    def evictable(self, now: float) -> bool:
        """Not pinned, not leased and not the head of a live chain tail."""
        p = self.pin_until
        return (p is None or p <= now) and self.lease_until <= now and self.children == 0

    def pinned(self, now: float) -> bool:
        p = self.pin_until
        return p is not None and p > now

    def expired(self, now: float) -> bool:
        e = self.expires
        return e is not None and e <= now

    def __repr__(self) -> str:
        return (
            f"<Entry {self.namespace}/{self.tenant}/{self.key!r} off={self.offset} len={self.length} "
            f"gen={self.generation} ver={self.version}>"
        )
