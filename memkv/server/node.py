"""A storage node: the store, its TCP listener, metrics and housekeeping.

Everything runs as tasks of one trio nursery; ``serve`` returns only when the
node is cancelled (Ctrl-C, SIGTERM, or a test's cancel scope).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from memkv.config import NodeConfig
from memkv.engine.region import Region
from memkv.engine.store import Store
from memkv.protocol import codec as c
from memkv.server.connection import Connection
from memkv.server.handlers import Handlers
from memkv.server.metrics import MetricsCollector, NodeMetrics

log = logging.getLogger("memkv.node")


def split_hostport(text: str, default_port: int = 7400) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host.strip("[]"), int(port)


class Node:
    def __init__(self, config: NodeConfig, *, limits: c.Limits | None = None) -> None:
        self.config = config
        self.limits = limits or c.Limits()
        self.node_id = config.node_id or f"node-{os.getpid()}"
        self.store = Store(memory=config.memory, namespaces=config.namespaces, pools=config.pools,
                           shm_dir=config.shm_dir, name=self.node_id,
                           tenant_quotas={t.name: t.quota for t in config.tenants.values()
                                          if t.quota is not None})
        self.metrics = NodeMetrics()
        self.handlers = Handlers(self.store, config.tenants, self.limits, self._stats_extra)
        # Opcodes served by other subsystems (cluster admin, transports): op -> handler.
        self.extra_handlers: dict[int, Callable[..., Any]] = {}
        # Long-running tasks other subsystems add before ``serve`` starts.
        self.background: list[Callable[[], Awaitable[None]]] = []
        self.listen_port: int = 0
        self.started = trio.Event()
        # One-sided reads (LOCATE, shared memory, RDMA): the region file is unlinked
        # at once (nothing left in /dev/shm after a SIGKILL); stale files of dead
        # nodes from older versions are swept.
        from memkv.server import onesided

        Region.sweep_stale(config.shm_dir)
        self.store.region.detach_file()
        self.onesided = onesided.install(self)
        # The flash tier of durable namespaces (recovers what --data-dir holds); None without any.
        from memkv.flash.tier import attach as attach_flash

        try:
            self.flash = attach_flash(self)
        except BaseException:
            self.store.close()
            raise
        # Tenants at runtime, rate limits, audit log, purge, no-store, TLS (memkv/server/security.py).
        self.connection_class: type[Connection] = Connection
        from memkv.server.security import install as install_security

        try:
            self.security = install_security(self)
        except BaseException:
            if self.flash is not None:
                self.flash.close()
            self.store.close()
            raise
        # Resource limits: max connections, in-flight bytes, slowloris timeouts (memkv/server/limits.py).
        from memkv.server.limits import install as install_limits

        self.hardening = install_limits(self)

    def _stats_extra(self) -> dict[str, Any]:
        extra = {"node_id": self.node_id, "server": self.metrics.snapshot(),
                 "listen": f"{split_hostport(self.config.listen)[0]}:{self.listen_port}"}
        if self.flash is not None:
            extra["flash"] = self.flash.stats()
        return extra

    def _flash_metrics(self) -> dict[str, float]:
        if self.flash is None:
            return {}
        st = self.flash.stats()
        return {f"flash_{k}": v for k, v in st.items() if isinstance(v, int | float)}

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
                nursery.start_soon(self._housekeeping)
                if self.config.metrics_port is not None:
                    await nursery.start(self._serve_metrics, self.config.metrics_port)
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
                from memkv.errors import TooManyConnections

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
            await trio.sleep(0.5)
            self.store.expire()

    async def _serve_metrics(self, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """A tiny HTTP server for Prometheus scrapes, as a trio task (no thread)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self.metrics, self.store.stats, self._flash_metrics))
        host = split_hostport(self.config.listen)[0]

        async def handle(stream: trio.SocketStream) -> None:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
                if path.startswith(b"/metrics"):
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
