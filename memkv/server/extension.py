"""How subsystems add to a node: declared once, read once, while the node is built.

A node is built from its config plus a list of *extensions* (``Node(config,
extensions=[...])``). Each is asked once, in ``Node.__init__``, for its
:class:`Extension`: the operations it serves, the tasks it runs, the STATS
section and /metrics gauges it reports, what it follows of the store's contents
(a store observer: memkv/engine/observer.py), what the node advertises for it
in its cluster record, and -- for the cluster -- how keys are routed, how a RESP
request for another node's key is forwarded and where tenants come from. The
node builds its operation table and its pipeline from these declarations and
freezes them; nothing is added, replaced or wrapped
afterwards. The node's own subsystems (one-sided reads, administration, the
flash tier, resource limits) declare themselves the same way.

The interfaces the cluster implements are defined here, on the node side
(:class:`Routing`, :class:`Forwarder`, :class:`TenantSource`), so that node code
never imports ``memkv.cluster`` or ``memkv.client``; the command-line layer
(memkv/tools/) composes a node with its cluster membership, etcd tenant source
and RESP forwarder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memkv.server.requests import Access

if TYPE_CHECKING:
    import trio

    from memkv.config import NodeConfig, TenantConfig
    from memkv.engine.clock import Clock
    from memkv.engine.observer import StoreObserver
    from memkv.engine.store import Store
    from memkv.protocol.codec import Limits
    from memkv.server.binary import Reply
    from memkv.server.requests import Delete, Get, Peek, Put, Request
    from memkv.server.session import Session
    from memkv.server.tenants import TenantRegistry


@dataclass(frozen=True)
class Operation:
    """One kind of request the node serves: what the stages check and what runs.

    ``run(session, request)`` returns the result, or an awaitable of it. With an
    ``opcode`` the binary protocol serves it: ``decode(meta, limits)`` turns the
    frame's meta map into the request (default: a :class:`~memkv.server.requests.Call`
    holding the meta map) and ``encode(request, result)`` the result into the
    reply (default: ``run`` already returns a ``Reply``).
    """

    kind: str
    access: Access
    run: Callable[[Session, Request], Any]
    opcode: int | None = None
    decode: Callable[[dict[str, Any], Limits], Request] | None = None
    encode: Callable[[Request, Any], Reply] | None = None


class Routing(Protocol):
    """Which node serves a key (the cluster membership of a node)."""

    def check(self, keys: list[bytes], write: bool, epoch: int | None) -> None:
        """Raise ``Fenced`` (a write while the node's lease may have lapsed) or ``Moved`` (``epoch``
        given and the node does not serve every key at it, or a write with an older epoch)."""

    def owners(self, key: bytes) -> tuple[str, ...] | None:
        """The nodes serving ``key`` in this node's slot map (None: no map yet)."""


class Remote:
    """What a forwarded peek knows of a key another node serves."""

    __slots__ = ("length",)
    expires = None
    version = 0

    def __init__(self, length: int) -> None:
        self.length = length


class Forwarder(Protocol):
    """Serves keys other nodes own for a session that cannot follow ``Moved`` (RESP)."""

    async def get(self, session: Session, req: Get) -> list[bytes | None]: ...

    async def peek(self, session: Session, req: Peek) -> list[Remote | None]: ...

    async def put(self, session: Session, req: Put, values: list[Any]) -> None: ...

    async def delete(self, session: Session, req: Delete) -> list[bool]: ...

    async def aclose(self) -> None: ...


class TenantSource(Protocol):
    """Where a node's tenants come from when not from its own files (a cluster: etcd)."""

    name: str

    def load(self, tenants: TenantRegistry) -> None:
        """Fill ``tenants`` once, at construction (blocking; may leave it as it is when unreachable)."""

    async def watch(self, tenants: TenantRegistry) -> None:
        """Keep ``tenants`` equal to the source, for as long as the node runs."""


@dataclass(frozen=True)
class Extension:
    """What one subsystem adds to a node."""

    name: str
    operations: tuple[Operation, ...] = ()
    background: tuple[Callable[[], Awaitable[None]], ...] = ()
    stats: Callable[[], dict[str, Any]] | None = None  # a section of STATS, under ``name``
    metrics: Callable[[], dict[str, float]] | None = None  # gauges on /metrics (``memkv_<name>``)
    routing: Routing | None = None
    forwarder: Forwarder | None = None
    tenant_source: TenantSource | None = None
    # told of every value indexed or dropped (attached to the store while the node is built)
    store_observer: StoreObserver | None = None
    # entries of the node's cluster record (``services``), read when the node registers:
    # e.g. where its KV events are published
    advertise: Callable[[], dict[str, str]] | None = None


@dataclass(frozen=True)
class NodeContext:
    """What an extension may use of the node it extends."""

    config: NodeConfig
    node_id: str
    store: Store
    tenants: TenantRegistry
    clock: Clock
    started: trio.Event  # set once the node listens
    address: Callable[[], str]  # "host:port" the node listens on (after ``started``)
    advertised: Callable[[], dict[str, str]]  # what the extensions advertise (after ``started``)

    def token_of(self, tenant: str) -> str | None:
        t: TenantConfig | None = self.tenants.get(tenant)
        return t.token if t is not None else None


class NodeExtension(Protocol):
    """A subsystem that extends a node: asked once, while the node is built."""

    def extend(self, node: NodeContext) -> Extension: ...
