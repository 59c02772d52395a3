"""Typed requests: what a client asks of a node, whatever protocol it spoke.

The binary connection decodes a frame into one of these (memkv/server/binary.py);
the RESP connection maps a Redis command onto one (memkv/server/resp.py). Both
hand it to the node's pipeline (memkv/server/pipeline.py), which passes it
through the same stages and runs the same operation (memkv/server/operations.py).

Each kind of request declares once, in its :class:`Access`, what the stages
check for it: whether it needs a logged-in session, which grant on its
namespace, whether it writes (a fenced node refuses it), whether its keys are
routed (the cluster's slot map), whether it counts against the rate limit.
A request is a plain object with slots; requests with keys carry them in
``keys`` so that the routing stage can check and split them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Access:
    """What the stages check for one kind of request."""

    login: bool = True  # an authenticated session, once the node has tenants
    level: str | None = None  # grant needed on the request's namespace: "r" | "rw"
    admin: bool = False  # an "admin" grant on "*" (node administration)
    internal: bool = False  # only the cluster identity, once the node has tenants
    write: bool = False  # changes data: a fenced node refuses it
    routed: bool = False  # the keys must be this node's (cluster slot map)
    rate_limited: bool = True  # counts against the tenant's request rate


OPEN = Access(login=False, rate_limited=False)
LOGIN = Access()
READ = Access(level="r", routed=True)
WRITE = Access(level="rw", write=True, routed=True)


class Request:
    """Base of every request. ``kind`` names its operation (the node's operation table)."""

    __slots__ = ("ns", "keys", "epoch", "remote", "durable")
    kind: ClassVar[str] = ""
    access: ClassVar[Access] = LOGIN

    def __init__(self, ns: str = "shared", keys: list[bytes] | None = None, epoch: int | None = None) -> None:
        self.ns = ns
        self.keys: list[bytes] = keys if keys is not None else []
        # the slot-map epoch the client routed with (cluster clients), None: not routed by the client
        self.epoch = epoch
        # positions of keys another node serves (set by the routing stage for forwarding sessions)
        self.remote: list[int] | None = None
        # the flash write the reply must wait for (group commit); 0: none (set by the pipeline)
        self.durable = 0

    def subset(self, positions: list[int]) -> Request:
        """The same request for some of its keys (forwarding splits a request by owner)."""
        raise NotImplementedError(f"{self.kind} requests are not split")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ns} {len(self.keys)} key(s)>"


def _pick(values: list[Any], positions: list[int]) -> list[Any]:
    return [values[i] for i in positions]


# -- session ------------------------------------------------------------------------------
class Ping(Request):
    __slots__ = ()
    kind = "PING"


class Hello(Request):
    """Start of the binary challenge-response login: the node answers with a nonce."""

    __slots__ = ()
    kind = "HELLO"
    access = OPEN


class Auth(Request):
    """Binary login: tenant + HMAC proof over both nonces (memkv/protocol/auth.py)."""

    __slots__ = ("tenant", "cnonce", "proof")
    kind = "AUTH"
    access = OPEN

    def __init__(self, tenant: str | None, cnonce: bytes, proof: bytes) -> None:
        super().__init__()
        self.tenant, self.cnonce, self.proof = tenant, cnonce, proof


class Login(Request):
    """RESP login: ``AUTH [tenant] token`` (the token itself, over the connection)."""

    __slots__ = ("tenant", "token")
    kind = "LOGIN"
    access = OPEN

    def __init__(self, tenant: str | None, token: bytes) -> None:
        super().__init__()
        self.tenant, self.token = tenant, token


class Stats(Request):
    __slots__ = ()
    kind = "STATS"


# -- reads --------------------------------------------------------------------------------
class Get(Request):
    """Values of keys. The result is a list aligned with ``keys``: ``(view, entry)`` or None.
    ``view`` is the region's bytes, or a private buffer (read from flash when the region had no
    room: ``entry.offset`` is then -1); ``entry`` is None for a value another node served."""

    __slots__ = ("private", "expose", "tombs")
    kind = "GET"
    access = READ

    def __init__(self, ns: str, keys: list[bytes], epoch: int | None = None, *, expose: bool = False) -> None:
        # (the base's fields set here: the most frequent request skips a call)
        self.ns, self.keys, self.epoch, self.remote, self.durable = ns, keys, epoch, None, 0
        # values the promotion stage read from flash into private buffers (no room in the region)
        self.private: dict[int, memoryview] | None = None
        # misses of deleted keys: position -> the tombstone's version (the reply carries it, so that a
        # cluster read does not take an older value from another replica); None: no such miss
        self.tombs: dict[int, int] | None = None
        # the reply holds the region's bytes while a reader that cannot verify checksums (RESP) gets
        # them: freeing such a value goes through the quarantine (Store.expose)
        self.expose = expose

    def subset(self, positions: list[int]) -> Get:
        sub = Get(self.ns, _pick(self.keys, positions), self.epoch, expose=self.expose)
        if self.private:
            sub.private = {new: self.private[old] for new, old in enumerate(positions) if old in self.private}
        return sub


class Peek(Request):
    """Metadata of keys without counting an access: a list of entries (or None) aligned with
    ``keys``. ``lengths``: the front end needs value lengths (a forwarded peek then reads the values)."""

    __slots__ = ("lengths", "versions", "tombs")
    kind = "PEEK"
    access = READ

    def __init__(self, ns: str, keys: list[bytes], epoch: int | None = None, *, lengths: bool = False,
                 versions: bool = False) -> None:
        super().__init__(ns, keys, epoch)
        self.lengths = lengths
        self.versions = versions  # the front end wants versions (binary EXISTS_MANY ``v``)
        self.tombs: dict[int, int] | None = None  # with ``versions``: absent keys' tombstone versions

    def subset(self, positions: list[int]) -> Peek:
        return Peek(self.ns, _pick(self.keys, positions), self.epoch, lengths=self.lengths, versions=self.versions)


class TimeToLive(Request):
    """Seconds each key has left: None (absent), ``math.inf`` (no TTL) or a number."""

    __slots__ = ()
    kind = "TTL"
    access = READ


class LookupPrefix(Request):
    """How many leading keys exist; each of them is leased for ``lease`` seconds."""

    __slots__ = ("lease",)
    kind = "LOOKUP_PREFIX"
    access = READ

    def __init__(self, ns: str, keys: list[bytes], lease: float, epoch: int | None = None) -> None:
        super().__init__(ns, keys, epoch)
        self.lease = lease


class Scan(Request):
    """Keys of the namespace visible to the session, written after generation ``cursor``."""

    __slots__ = ("cursor", "count", "match")
    kind = "SCAN"
    access = Access(level="r")

    def __init__(self, ns: str, cursor: int, count: int, match: Any = None) -> None:
        super().__init__(ns)
        self.cursor, self.count, self.match = cursor, count, match


class Count(Request):
    """Keys of the namespace visible to the session (RESP DBSIZE)."""

    __slots__ = ()
    kind = "COUNT"
    access = Access(level="r")


class Keyspace(Request):
    """Per namespace the session may read, the keys visible to it: ``[(namespace, count)]``.
    Counted exactly as :class:`Count` (RESP INFO keyspace and DBSIZE agree by construction)."""

    __slots__ = ("namespaces",)
    kind = "KEYSPACE"

    def __init__(self, namespaces: list[str]) -> None:
        super().__init__()
        self.namespaces = namespaces


class ReportCorrupt(Request):
    """A reader saw a checksum mismatch on generation ``gen`` of a key: the node re-verifies."""

    __slots__ = ("generation",)
    kind = "REPORT_CORRUPT"
    access = Access(level="r")

    def __init__(self, ns: str, key: bytes, generation: int) -> None:
        super().__init__(ns, [key])
        self.generation = generation


# -- writes -------------------------------------------------------------------------------
class Put(Request):
    """Values to store, one per key. Received in two steps (``Pipeline.begin_put`` reserves
    room, the payload lands in it, ``Pipeline.finish_put`` commits). The result is a list
    aligned with ``keys``: ``(entry | None, error | None)``; entry None means not written
    (a condition failed, or a copy no newer than the value here)."""

    __slots__ = ("lengths", "checksums", "parents", "ttl", "pin", "versions", "copies", "owner", "nostore",
                 "model", "cond", "keep_ttl", "get_old", "dram_only", "max_ttl", "single")
    kind = "PUT"
    access = WRITE

    def __init__(self, ns: str, keys: list[bytes], lengths: list[int], checksums: list[int | None], *,
                 parents: list[bytes | None] | None = None, ttl: float | None = None, pin: bool = False,
                 versions: list[int] | None = None, copies: bool = False, owner: str | None = None,
                 nostore: bool = False,
                 model: str | None = None, cond: str | None = None, keep_ttl: bool = False,
                 get_old: bool = False, epoch: int | None = None, single: bool = False) -> None:
        super().__init__(ns, keys, epoch)
        self.lengths = lengths
        # per key; None: computed when the value has arrived (RESP values streamed into the region)
        self.checksums = checksums
        self.parents = parents
        self.ttl = ttl
        self.pin = pin
        # per key: the writer's version (0: the node assigns one); None: all 0
        self.versions = versions
        # slot copies and read repairs: versions of existing writes; a copy no newer than the
        # value here takes no room (Store.commit would drop it)
        self.copies = copies
        # the tenant the values are stored for (slot copies keep their tenant); None: the session's
        self.owner = owner
        self.nostore = nostore  # asked for: DRAM only (the no-store stage decides ``dram_only``)
        self.model = model  # for the audit log
        # "nx": only keys that do not exist (checked again at commit); "xx": only keys that do
        self.cond = cond
        self.keep_ttl = keep_ttl  # keep an existing key's TTL (RESP SET KEEPTTL)
        self.get_old = get_old  # the result carries the old values (RESP SET GET)
        self.dram_only = False  # set by the no-store stage, with:
        self.max_ttl: float | None = None  # the longest TTL the value may get
        self.single = single  # one key, errors raised rather than reported per key (binary PUT)

    def payload_len(self) -> int:
        return sum(self.lengths)

    def effective_ttl(self, ttl: float | None = None) -> float | None:
        """``ttl`` (default: the request's) within ``max_ttl`` (a no-store write never lives unbounded)."""
        if ttl is None:
            ttl = self.ttl
        cap = self.max_ttl
        if cap is None:
            return ttl
        return cap if ttl is None or ttl <= 0 else min(ttl, cap)

    def subset(self, positions: list[int]) -> Put:
        p = Put(self.ns, _pick(self.keys, positions), _pick(self.lengths, positions),
                _pick(self.checksums, positions), ttl=self.ttl, pin=self.pin, copies=self.copies, owner=self.owner,
                nostore=self.nostore, model=self.model, cond=self.cond, keep_ttl=self.keep_ttl,
                get_old=self.get_old, epoch=self.epoch, single=self.single)
        if self.parents is not None:
            p.parents = _pick(self.parents, positions)
        if self.versions is not None:
            p.versions = _pick(self.versions, positions)
        return p


class Delete(Request):
    """Delete keys as of a version each (``versions``; None: the store assigns them), leaving
    tombstones; the result is a list of bools aligned with ``keys`` (a value was removed).
    ``owner``: the tenant whose keys they are (slot copies and anti-entropy, as the cluster
    identity; None: the session's)."""

    __slots__ = ("versions", "owner")
    kind = "DELETE"
    access = WRITE

    def __init__(self, ns: str, keys: list[bytes], epoch: int | None = None, *, versions: list[int] | None = None,
                 owner: str | None = None) -> None:
        super().__init__(ns, keys, epoch)
        self.versions = versions
        self.owner = owner

    def subset(self, positions: list[int]) -> Delete:
        return Delete(self.ns, _pick(self.keys, positions), self.epoch,
                      versions=None if self.versions is None else _pick(self.versions, positions), owner=self.owner)


class Pin(Request):
    """Pin existing keys (``ttl`` None: until unpinned); the result is how many were pinned."""

    __slots__ = ("ttl",)
    kind = "PIN"
    access = WRITE

    def __init__(self, ns: str, keys: list[bytes], ttl: float | None, epoch: int | None = None) -> None:
        super().__init__(ns, keys, epoch)
        self.ttl = ttl


class Unpin(Request):
    __slots__ = ()
    kind = "UNPIN"
    access = WRITE


class Expire(Request):
    """Give a key a TTL (``ttl`` None: persist; <= 0: delete now) under Redis' conditions
    (``nx``, ``xx``, ``gt``, ``lt``; ``persist``: only if it has one). Result: whether it changed."""

    __slots__ = ("ttl", "when", "persist")
    kind = "EXPIRE"
    access = WRITE

    def __init__(self, ns: str, key: bytes, ttl: float | None, when: frozenset[str] = frozenset(),
                 persist: bool = False) -> None:
        super().__init__(ns, [key])
        self.ttl, self.when, self.persist = ttl, when, persist


class Flush(Request):
    """Delete every key of the namespace visible to the session (RESP FLUSHDB)."""

    __slots__ = ()
    kind = "FLUSH"
    access = Access(level="rw", write=True)


# -- operations other subsystems register (cluster, one-sided reads, administration) ------
class Call(Request):
    """A request of an operation a subsystem registered (memkv/server/extension.py): its meta map
    as the client sent it. ``kind`` and ``access`` are the registered operation's."""

    __slots__ = ("meta", "op_kind", "op_access")

    def __init__(self, kind: str, access: Access, meta: dict[str, Any], ns: str = "shared",
                 keys: list[bytes] | None = None, epoch: int | None = None) -> None:
        super().__init__(ns, keys, epoch)
        self.op_kind = kind
        self.op_access = access
        self.meta = meta

    @property  # type: ignore[override]
    def kind(self) -> str:  # per instance: one class serves every registered operation
        return self.op_kind

    @property  # type: ignore[override]
    def access(self) -> Access:
        return self.op_access
