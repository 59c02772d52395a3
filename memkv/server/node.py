"""A storage node: the store, its request pipeline, its listeners, metrics and housekeeping.

``Node.__init__`` builds everything a request can touch, once: the store and its
flash tier, the tenant table, the audit log and resource limits, the operation
table (the node's own operations plus those its extensions declare:
memkv/server/extension.py), the pipeline of stages in front of them
(memkv/server/pipeline.py) and the binary protocol's opcode table. These are
frozen; serving a request never adds, replaces or wraps any of them.

Everything runs as tasks of one trio nursery; ``serve`` returns only when the
node is cancelled (Ctrl-C, SIGTERM, or a test's cancel scope).
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import Any

import trio

from memkv.config import NodeConfig, split_hostport
from memkv.engine.clock import SYSTEM, Clock
from memkv.engine.region import Region
from memkv.engine.store import Store
from memkv.errors import InvalidArgument, TooManyConnections
from memkv.flash.tier import FlashTier, open_tier
from memkv.protocol import codec as c
from memkv.server import binary
from memkv.server.admin import Admin
from memkv.server.audit import AuditLog
from memkv.server.binary import BinaryOp
from memkv.server.connection import Connection
from memkv.server.extension import Extension, NodeContext, NodeExtension, Operation
from memkv.server.hot_reads import HotReads
from memkv.server.limits import Hardening
from memkv.server.metrics import MetricsCollector, NodeMetrics
from memkv.server.onesided import OneSided
from memkv.server.operations import Operations
from memkv.server.pipeline import Pipeline, stage_order
from memkv.server.requests import (
    Auth,
    Count,
    Delete,
    Expire,
    Flush,
    Get,
    Hello,
    Keyspace,
    Login,
    LookupPrefix,
    Peek,
    Pin,
    Ping,
    Put,
    ReportCorrupt,
    Scan,
    Stats,
    TimeToLive,
    Unpin,
)
from memkv.server.resp import RespServer
from memkv.server.session import Session
from memkv.server.stages import (
    DEFAULT_NO_STORE_TTL,
    Audit,
    Authenticate,
    Grants,
    InFlight,
    NoStore,
    Promote,
    RateLimit,
    Route,
)
from memkv.server.tenants import TenantRegistry
from memkv.server.tls import connection_class, context_from_config
from memkv.sizes import parse_duration, parse_size

log = logging.getLogger("memkv.node")


class Node:
    def __init__(self, config: NodeConfig, *, limits: c.Limits | None = None, clock: Clock = SYSTEM,
                 extensions: Sequence[NodeExtension] = ()) -> None:
        self.config = config
        self.limits = limits or c.Limits()
        self.node_id = config.node_id or f"node-{os.getpid()}"
        self.clock = clock
        self.store = Store(memory=config.memory, namespaces=config.namespaces, pools=config.pools,
                           shm_dir=config.shm_dir, name=self.node_id, clock=clock,
                           tenant_quotas={t.name: t.quota for t in config.tenants.values()
                                          if t.quota is not None},
                           tombstone_retention=config.tombstone_retention, max_tombstones=config.max_tombstones)
        self.metrics = NodeMetrics()
        self.listen_port: int = 0
        self.started = trio.Event()
        self.flash: FlashTier | None = None
        try:
            self._build(extensions)
        except BaseException:
            if self.flash is not None:
                self.flash.close()
            self.store.close()
            raise

    def _build(self, extensions: Sequence[NodeExtension]) -> None:
        cfg = self.config
        # One-sided reads (LOCATE, shared memory, RDMA): the region file is unlinked at once
        # (nothing left in /dev/shm after a SIGKILL); stale files of dead nodes are swept.
        Region.sweep_stale(cfg.shm_dir)
        self.store.region.detach_file()
        # the flash tier of durable namespaces (recovers what --data-dir holds); None without any
        self.flash = open_tier(cfg, self.store)
        self.tenants = TenantRegistry(cfg.tenants, self.store, data_dir=cfg.data_dir, clock=self.clock)
        self.audit = self._audit_log()
        self.hardening = Hardening(cfg.limits)
        self.operations = Operations(self.store)
        tls = context_from_config(cfg)
        self.connection_class: type[Connection] = Connection if tls is None else connection_class(tls)
        sec = cfg.extra.get("security") or {}
        no_store_ttl = parse_duration(sec.get("no_store_ttl", DEFAULT_NO_STORE_TTL)) or DEFAULT_NO_STORE_TTL

        # What the node's subsystems and its extensions declare (memkv/server/extension.py).
        context = NodeContext(cfg, self.node_id, self.store, self.tenants, self.clock, self.started, self.address,
                              self.advertised)
        self.onesided = OneSided(self.store, self.limits, tenants_trusted=cfg.onesided_tenants)
        declared: list[Extension] = [
            self._own_extension(),
            self.onesided.extension(),
            Admin(self.node_id, self.store, self.flash, self.tenants, self.audit).extension(),
            *(e.extend(context) for e in extensions),
        ]
        for ext in declared:
            if ext.store_observer is not None:
                self.store.attach_observer(ext.store_observer)
        self.advertisers: tuple[Callable[[], dict[str, str]], ...] = tuple(
            ext.advertise for ext in declared if ext.advertise is not None)
        routing = _one(declared, "routing")
        forwarder = _one(declared, "forwarder")
        source = _one(declared, "tenant_source")
        if source is not None:
            self.tenants.source, self.tenants.path = source.name, None
            source.load(self.tenants)
        else:
            self.tenants.load_file()

        operations: dict[str, Operation] = {}
        opcodes: dict[int, BinaryOp] = dict(binary.core_ops(self._overwritable, self._every_owner))
        for ext in declared:
            for op in ext.operations:
                if op.kind in operations:
                    raise InvalidArgument(f"operation {op.kind} is declared twice")
                operations[op.kind] = op
                if op.opcode is not None:
                    if op.opcode in opcodes:
                        raise InvalidArgument(f"opcode {op.opcode} is declared twice")
                    opcodes[op.opcode] = BinaryOp(op.kind, op.decode or binary.decode_call(op.kind, op.access),
                                                  op.encode or binary.encode_reply)
        self.binary: MappingProxyType[int, BinaryOp] = MappingProxyType(opcodes)
        self.pipeline = Pipeline(
            stage_order(authenticate=Authenticate(self.tenants), rate_limit=RateLimit(self.tenants),
                        route=None if routing is None else Route(routing, self.node_id, forwarder, self._overwritable),
                        grants=Grants(self.tenants), no_store=NoStore(self.tenants, no_store_ttl),
                        in_flight=InFlight(self.hardening),
                        audit=None if self.audit is None else Audit(self.audit),
                        promote=None if self.flash is None else Promote(self.flash)),
            operations, self.operations, forwarder=forwarder, tier=self.flash)
        # plain-TCP GETs answered from the client-readable index on the connection's thread; not where a
        # request needs more than the index knows: TLS, or a cluster (slot ownership, epochs)
        self.hot_reads = HotReads(self.store, self.metrics, self.tenants.tenants) \
            if cfg.tcp_hot_reads and tls is None and routing is None and self.store.readable is not None else None
        tasks = [task for ext in declared for task in ext.background]
        if source is not None:
            tasks.append(functools.partial(source.watch, self.tenants))
        self.background: tuple[Callable[[], Awaitable[None]], ...] = tuple(tasks)
        self.stats_sections: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = tuple(
            (ext.name, ext.stats) for ext in declared if ext.stats is not None)
        if self.hot_reads is not None:
            self.stats_sections += (("hot_reads", self.hot_reads.stats),)
        self.metric_sources: tuple[Callable[[], dict[str, float]], ...] = tuple(
            ext.metrics for ext in declared if ext.metrics is not None)
        self.resp = RespServer(self, forwarder) if cfg.resp_port is not None else None

    def _audit_log(self) -> AuditLog | None:
        """The audit log (needs a data dir; ``[audit] enabled = false`` turns it off)."""
        cfg = self.config
        acfg = cfg.extra.get("audit") or {}
        if not cfg.data_dir or not acfg.get("enabled", True):
            return None
        return AuditLog(os.path.join(cfg.data_dir, "audit"), self.node_id,
                        max_bytes=parse_size(acfg.get("max_size", "64MiB")), keep=int(acfg.get("keep", 8)),
                        flush_interval=float(acfg.get("flush_interval", 0.2)), clock=self.clock)

    def _overwritable(self, namespace: str) -> bool:
        policy = self.store.namespaces.get(namespace)  # (an unknown one is refused by a later stage)
        return policy is not None and policy.overwrite

    def _every_owner(self, namespace: str) -> bool:
        """A cluster write of ``namespace`` is acknowledged only once every live owner has it (``acks``)."""
        policy = self.store.namespaces.get(namespace)
        return policy is not None and policy.acks == "all"

    def _own_extension(self) -> Extension:
        """The node's own operations (memkv/server/operations.py) and housekeeping."""
        ops = self.operations
        tenants = self.tenants

        # a standalone worker of ``memkv serve --workers N`` tells clients where all N are, and they route
        # keys to them by slot (client/core/routing.py); in a cluster the slot map does that
        workers = [] if self.config.etcd else list(self.config.worker_addrs)

        def hello(session: Session, req: Hello) -> tuple[bytes, bool, list[str]]:
            return tenants.hello(session, req), session.auth_required, workers

        table = (
            (Ping, lambda session, req: self.clock.wall()),
            (Hello, hello),
            (Auth, tenants.authenticate),
            (Login, tenants.login),
            (Stats, lambda session, req: self.stats(session)),
            (Get, ops.get),
            (Peek, ops.peek),
            (TimeToLive, ops.ttl),
            (LookupPrefix, ops.lookup_prefix),
            (Scan, ops.scan),
            (Count, ops.count),
            (Keyspace, ops.keyspace),
            (ReportCorrupt, ops.report_corrupt),
            (Put, _not_direct),  # two steps: Pipeline.begin_put / finish_put
            (Delete, ops.delete),
            (Pin, ops.pin),
            (Unpin, ops.unpin),
            (Expire, ops.expire),
            (Flush, ops.flush),
        )
        background: list[Callable[[], Awaitable[None]]] = [self._housekeeping, self.hardening.reap]
        if self.audit is not None:
            background.append(self.audit.run)
        if self.flash is not None:
            background.extend(self.flash.background())
        return Extension("node", operations=tuple(Operation(cls.kind, cls.access, run) for cls, run in table),
                         background=tuple(background))

    def address(self) -> str:
        return f"{split_hostport(self.config.listen)[0]}:{self.listen_port}"

    def advertised(self) -> dict[str, str]:
        """What the extensions advertise in the node's cluster record (``Extension.advertise``)."""
        out: dict[str, str] = {}
        for advertise in self.advertisers:
            out.update(advertise())
        return out

    def stats(self, session: Session | None = None) -> dict[str, Any]:
        """STATS: the store's figures and one section per subsystem. ``session`` is who asks (None:
        the node itself): what a tenant may observe of other tenants is decided here. A session
        that may not observe the whole node (``Session.observes_all``) gets its own figures only --
        built from what is its own, not filtered from the node's, so that a figure added to the
        node's STATS later is not shown to tenants by mistake."""
        if session is not None and not session.observes_all:
            return self.tenant_stats(session)
        st = self.store.stats()
        st.update(node_id=self.node_id, server=self.metrics.snapshot(), listen=self.address(),
                  host=self.config.host_id or socket.gethostname())
        if self.config.worker_addrs:  # one worker of ``memkv serve --workers N``: where its siblings are
            st["workers"] = list(self.config.worker_addrs)
        if self.flash is not None:
            st["flash"] = self.flash.stats()
        security: dict[str, Any] = {**self.tenants.stats(), "tls": self.connection_class is not Connection}
        if self.audit is not None:
            security["audit"] = self.audit.stats()
        st["security"] = security
        st["limits"] = self.hardening.stats()
        for name, section in self.stats_sections:
            st[name] = section()
        return st

    def tenant_stats(self, session: Session) -> dict[str, Any]:
        """STATS as a non-admin tenant sees it: its keys, bytes, hits and misses, its share of each
        pool, its limits; nothing that counts other tenants' data or traffic."""
        st = self.store.tenant_stats(session.tenant)
        st.update(node_id=self.node_id, listen=self.address(), tenant=session.tenant, scope="tenant",
                  security={"tls": self.connection_class is not Connection},
                  limits=self.hardening.tenant_stats(session.tenant))
        return st

    def extra_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.flash is not None:
            out.update({f"flash_{k}": v for k, v in self.flash.stats().items() if isinstance(v, int | float)})
        for source in self.metric_sources:
            try:
                out.update(source())
            except Exception:  # metrics must never break a scrape
                log.exception("metrics source failed")
        return out

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = split_hostport(self.config.listen)
        listener = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                      trio.socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(1024)
        self.listen_port = listener.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, nursery)
                if self.config.metrics_port is not None:
                    await nursery.start(self._serve_metrics, self.config.metrics_port)
                if self.resp is not None:
                    await nursery.start(self.resp.serve)
                for task in self.background:
                    nursery.start_soon(task)
                log.info("memkv node %s listening on %s:%d (region %s, %d bytes)", self.node_id, host,
                         self.listen_port, self.store.region.path, self.store.region.size)
                self.started.set()
                task_status.started(self.listen_port)
        finally:
            listener.close()
            if self.flash is not None:
                self.flash.close()  # write what is queued, snapshot the index
            self.store.close()

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.05)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Hand the connection a plain non-blocking socket (see Connection).
            raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            raw.setblocking(False)
            if not self.hardening.admit():  # [limits] max_connections: a typed refusal, then close
                msg = f"node is at its limit of {self.hardening.max_connections} connections"
                nursery.start_soon(self.hardening.refuse, raw, c.encode_error(0, 0, TooManyConnections.code, msg))
                continue
            nursery.start_soon(self._run_connection, raw, f"{addr[0]}:{addr[1]}")

    async def _run_connection(self, sock: socket.socket, peer: str) -> None:
        self.metrics.connections += 1
        self.metrics.connections_total += 1
        conn = None
        try:
            with sock:
                conn = self.connection_class(self, sock, peer)
                with trio.CancelScope() as scope:
                    self.hardening.register(conn, scope)
                    await conn.serve()
                if conn.timed_out:  # closed by [limits] timeouts (memkv/server/limits.py)
                    conn.notify_timeout()
        except Exception:
            log.exception("connection %s failed", peer)
        finally:
            if conn is not None:
                self.hardening.unregister(conn)
            self.hardening.closed()
            self.metrics.connections -= 1

    async def _housekeeping(self) -> None:
        while True:
            await self.clock.sleep(0.5)
            self.store.expire()

    async def _serve_metrics(self, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """A tiny HTTP server for Prometheus scrapes, as a trio task (no thread)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self.metrics, self.store.stats, self.extra_metrics))
        host = self.config.metrics_host or split_hostport(self.config.listen)[0]
        # the figures name tenants: with a token configured, only a scraper that sends it sees them
        want = b"bearer " + self.config.metrics_token.encode() if self.config.metrics_token else None

        def authorized(request: bytes) -> bool:
            if want is None:
                return True
            for line in request.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"authorization":
                    got = value.strip()
                    return hmac.compare_digest(got[:7].lower() + got[7:], want)
            return False

        async def handle(stream: trio.SocketStream) -> None:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
                if not authorized(request):
                    body, status = b"memkv node: /metrics needs Authorization: Bearer <metrics_token>\n", \
                        b"401 Unauthorized"
                elif path.startswith(b"/metrics"):
                    body, status = generate_latest(registry), b"200 OK"
                else:
                    body, status = b"memkv node: see /metrics\n", b"404 Not Found"
                await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4"
                                      b"\r\nContent-Length: " + str(len(body)).encode() +
                                      b"\r\nConnection: close\r\n\r\n" + body)
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started()
        await trio.serve_listeners(handle, listeners)


def _not_direct(session: Session, req: Put) -> None:
    raise AssertionError("a put runs in two steps: Pipeline.begin_put / finish_put")


def _one(declared: list[Extension], what: str) -> Any:
    """The one extension that provides ``what`` (routing, forwarder, tenant source), or None."""
    found = [getattr(e, what) for e in declared if getattr(e, what) is not None]
    if len(found) > 1:
        raise InvalidArgument(f"more than one extension provides the node's {what}")
    return found[0] if found else None


def tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling the event loop.

    The index holds one small object per value; a full collection walks all
    of them (tens of milliseconds per million), which showed up as p99
    latency spikes. Index objects form no reference cycles, so objects alive
    at start-up are frozen out of collection and collections run less often.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def run_node(node: Node) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly."""
    tune_gc()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.serve)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    log.info("signal received, shutting down")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
