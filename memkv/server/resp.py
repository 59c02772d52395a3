"""The node's Redis-protocol (RESP2/RESP3) front end: ``memkv serve --resp-port PORT``.

Existing Redis clients and tools (redis-py, redis-cli, redis-benchmark,
LMCache's ``redis://`` backend) talk to memkv unmodified. See docs/resp.md
for the command coverage and the mapping of Redis concepts onto memkv:

* ``SELECT 0`` = namespace ``shared`` (default), ``SELECT 1`` = ``session``,
  ``SELECT 2..`` = the other configured namespaces in name order.
* ``AUTH tenant token`` (or ``AUTH token``, or ``HELLO 3 AUTH tenant token``)
  logs in as a configured tenant; with tenants configured every other
  command answers ``-NOAUTH`` until then. Grants apply per namespace (``-NOPERM``).
* ``shared`` keeps blocks immutable: a SET of different bytes over an existing
  key answers ``-ERR ... different bytes`` (the same bytes again is fine).

Data path: the connection is a plain non-blocking socket driven with trio's
``wait_readable``/``wait_writable`` (as :mod:`memkv.server.connection`). GET
values go region -> socket as memoryviews (``sendmsg``); a large SET/MSET value
is received straight into its region reservation (:class:`LargeArg`).

Keys owned by another node of a cluster are served by a :class:`RemoteBackend`
(forwarding through ``memkv.client``, imported lazily; see ``resp_forward``).
The server never imports ``memkv.client``/``memkv.cluster`` otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hmac
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from memkv.engine.checksum import checksum as _checksum
from memkv.errors import (
    AuthError,
    InvalidArgument,
    KeyExists,
    KeyTooLarge,
    MemKVError,
    Moved,
    OutOfMemory,
    PermissionDenied,
    QuotaExceeded,
)
from memkv.protocol import resp as R
from memkv.protocol.codec import advance
from memkv.server.connection import PeerGone, recv_nonblocking
from memkv.server.limits import Watched
from memkv.server.session import Session

if TYPE_CHECKING:
    from memkv.engine.store import Reservation
    from memkv.server.node import Node

log = logging.getLogger("memkv.resp")

IOV_MAX = 512
FLUSH_AT = 1 << 20
_DISCARD = bytearray(1 << 20)
Buffer = bytes | memoryview


class CommandError(Exception):
    """A Redis-style error reply (the full text after '-', e.g. ``ERR syntax error``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _err_syntax() -> CommandError:
    return CommandError("ERR syntax error")


def _err_int() -> CommandError:
    return CommandError("ERR value is not an integer or out of range")


def _err_args(name: bytes) -> CommandError:
    return CommandError(f"ERR wrong number of arguments for '{name.decode(errors='replace').lower()}' command")


def _int(b: Any) -> int:
    try:
        s = bytes(b)
        if len(s) > 20:
            raise ValueError
        return int(s)
    except (ValueError, TypeError):
        raise _err_int() from None


def error_text(exc: MemKVError, session: Session) -> str:
    """Map a memkv error to a Redis error reply text."""
    if isinstance(exc, AuthError):
        if session.auth_required and not session.authenticated:
            return "NOAUTH Authentication required."
        return "WRONGPASS invalid username-password pair or user is disabled."
    if isinstance(exc, PermissionDenied):
        return f"NOPERM {exc.message}"
    if isinstance(exc, KeyExists):
        return (f"ERR {exc.message}: memkv's namespace keeps blocks immutable; a key can be written again "
                "only with the same bytes (DEL it first, or SELECT an overwritable namespace such as db 1)")
    if isinstance(exc, (OutOfMemory, QuotaExceeded)):
        return f"OOM {exc.message}"
    if isinstance(exc, Moved):
        return f"ERR key is owned by another node and forwarding is not available: {exc.message}"
    return f"ERR {exc.message}"


# -- backends -------------------------------------------------------------------------------------
class RemoteBackend(Protocol):
    """Serves keys another node owns (cluster forwarding). Values are bytes (copied once)."""

    async def get_many(self, session: Session, namespace: str, keys: list[bytes]) -> list[bytes | None]: ...

    async def put(self, session: Session, namespace: str, key: bytes, value: Buffer,
                  ttl: float | None) -> None: ...

    async def delete(self, session: Session, namespace: str, key: bytes) -> bool: ...

    async def exists_many(self, session: Session, namespace: str, keys: list[bytes]) -> list[bool]: ...

    async def aclose(self) -> None: ...


@dataclass
class Streamed:
    """Placeholder for a large value received straight into a region reservation."""

    res: Reservation | None
    error: MemKVError | None = None
    length: int = 0


class RespServer:
    """The RESP listener of one node; ``attach_resp(node)`` creates it and schedules ``serve``."""

    def __init__(self, node: Node, port: int | None = None) -> None:
        self.node = node
        self.store = node.store
        self.port_wanted = node.config.resp_port if port is None else port
        self.port = 0
        self.started = trio.Event()
        names = [n for n in ("shared", "session") if n in self.store.namespaces]
        self.dbs: list[str] = names + sorted(n for n in self.store.namespaces if n not in names)
        limit = min(512 * 1024 * 1024, max(self.store.region.size, 1 << 20))
        self.limits = R.RespLimits(max_bulk=limit)
        # Cluster hooks. ``is_local(session, key, write)`` says whether this node serves the
        # key; the default asks the node's route checks (Moved = another owner).
        # ``remote`` forwards requests for other owners (None: answer an error).
        self.is_local: Callable[[Session, bytes, bool], bool] = self._route_is_local
        self.remote: RemoteBackend | None = None
        self.clients = 0
        self.clients_total = 0
        self.commands = 0
        self.streamed = 0  # large values received straight into the region
        self.next_client_id = 0
        self.started_at = time.time()

    def _route_is_local(self, session: Session, key: bytes, write: bool) -> bool:
        checks = self.node.handlers.route_checks
        if not checks:
            return True
        try:
            for check in checks:
                check(session, {}, [key], write)
        except Moved:
            return False
        return True

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from memkv.server.node import split_hostport

        host = split_hostport(self.node.config.listen)[0]
        listener = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                      trio.socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, self.port_wanted or 0))
        listener.listen(1024)
        self.port = listener.getsockname()[1]
        log.info("RESP front end listening on %s:%d", host, self.port)
        self.started.set()
        task_status.started(self.port)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        sock, addr = await listener.accept()
                    except OSError as exc:
                        log.warning("RESP accept failed: %s", exc)
                        await trio.sleep(0.05)
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
                    raw.setblocking(False)
                    hard = getattr(self.node, "hardening", None)
                    if hard is not None and not hard.admit():  # [limits] max_connections (node-wide)
                        nursery.start_soon(hard.refuse, raw, b"-ERR max number of clients reached\r\n")
                        continue
                    nursery.start_soon(self._run, raw, f"{addr[0]}:{addr[1]}")
        finally:
            listener.close()
            if self.remote is not None:
                with trio.CancelScope(shield=True):
                    await self.remote.aclose()

    async def _run(self, sock: socket.socket, peer: str) -> None:
        self.clients += 1
        self.clients_total += 1
        self.next_client_id += 1
        conn = RespConnection(self, sock, peer, self.next_client_id)
        hard = getattr(self.node, "hardening", None)
        try:
            with sock:
                with trio.CancelScope() as scope:
                    if hard is not None:
                        hard.register(conn, scope)
                    await conn.serve()
                if conn.timed_out:  # closed by a [limits] timeout (memkv/server/limits.py)
                    log.info("closing RESP connection %s: %s timeout", peer, conn.timed_out)
                    if conn.timed_out != "write":
                        with contextlib.suppress(OSError):
                            sock.send(f"-ERR closed: {conn.timed_out} timeout\r\n".encode())
        except Exception:
            log.exception("RESP connection %s failed", peer)
        finally:
            conn.abort_reservations()
            self.clients -= 1
            if hard is not None:
                hard.unregister(conn)
                hard.closed()


def attach_resp(node: Node, port: int | None = None) -> RespServer:
    """Serve RESP on ``port`` (default: ``node.config.resp_port``) as one of the node's background tasks."""
    server = RespServer(node, port)
    node.resp = server  # type: ignore[attr-defined]
    node.background.append(server.serve)
    if node.config.etcd:
        # Cluster forwarding: installed lazily (memkv.client is imported only for clusters).
        from memkv.server.resp_forward import install_forwarding

        install_forwarding(server)
    return server


# -- command table -----------------------------------------------------------------------------
# name -> (method name, arity (negative: at least), flags, first key, last key, step)
COMMANDS: dict[bytes, tuple[str, int, list[str], int, int, int]] = {
    b"PING": ("c_ping", -1, ["fast", "stale"], 0, 0, 0),
    b"ECHO": ("c_echo", 2, ["fast"], 0, 0, 0),
    b"QUIT": ("c_quit", -1, ["fast"], 0, 0, 0),
    b"RESET": ("c_reset", 1, ["fast", "noauth"], 0, 0, 0),
    b"AUTH": ("c_auth", -2, ["fast", "noauth", "no-auth"], 0, 0, 0),
    b"HELLO": ("c_hello", -1, ["fast", "noauth", "no-auth"], 0, 0, 0),
    b"SELECT": ("c_select", 2, ["fast"], 0, 0, 0),
    b"CLIENT": ("c_client", -2, ["admin"], 0, 0, 0),
    b"COMMAND": ("c_command", -1, ["random"], 0, 0, 0),
    b"CONFIG": ("c_config", -2, ["admin"], 0, 0, 0),
    b"INFO": ("c_info", -1, ["random"], 0, 0, 0),
    b"DBSIZE": ("c_dbsize", 1, ["readonly", "fast"], 0, 0, 0),
    b"TIME": ("c_time", 1, ["random", "fast"], 0, 0, 0),
    b"GET": ("c_get", 2, ["readonly", "fast"], 1, 1, 1),
    b"SET": ("c_set", -3, ["write", "denyoom"], 1, 1, 1),
    b"SETNX": ("c_setnx", 3, ["write", "denyoom", "fast"], 1, 1, 1),
    b"SETEX": ("c_setex", 4, ["write", "denyoom"], 1, 1, 1),
    b"PSETEX": ("c_psetex", 4, ["write", "denyoom"], 1, 1, 1),
    b"MGET": ("c_mget", -2, ["readonly", "fast"], 1, -1, 1),
    b"MSET": ("c_mset", -3, ["write", "denyoom"], 1, -1, 2),
    b"DEL": ("c_del", -2, ["write"], 1, -1, 1),
    b"UNLINK": ("c_del", -2, ["write", "fast"], 1, -1, 1),
    b"EXISTS": ("c_exists", -2, ["readonly", "fast"], 1, -1, 1),
    b"STRLEN": ("c_strlen", 2, ["readonly", "fast"], 1, 1, 1),
    b"TYPE": ("c_type", 2, ["readonly", "fast"], 1, 1, 1),
    b"EXPIRE": ("c_expire", -3, ["write", "fast"], 1, 1, 1),
    b"PEXPIRE": ("c_pexpire", -3, ["write", "fast"], 1, 1, 1),
    b"PERSIST": ("c_persist", 2, ["write", "fast"], 1, 1, 1),
    b"TTL": ("c_ttl", 2, ["readonly", "fast"], 1, 1, 1),
    b"PTTL": ("c_pttl", 2, ["readonly", "fast"], 1, 1, 1),
    b"SCAN": ("c_scan", -2, ["readonly"], 0, 0, 0),
    b"KEYS": ("c_keys", 2, ["readonly"], 0, 0, 0),
    b"FLUSHDB": ("c_flushdb", -1, ["write"], 0, 0, 0),
    b"MULTI": ("c_multi", 1, ["fast"], 0, 0, 0),
    b"EXEC": ("c_exec", 1, ["slow"], 0, 0, 0),
    b"DISCARD": ("c_discard", 1, ["fast"], 0, 0, 0),
}
_NOAUTH_OK = {b"AUTH", b"HELLO", b"QUIT", b"RESET"}
_MULTI_IMMEDIATE = {b"EXEC", b"DISCARD", b"MULTI", b"QUIT", b"RESET"}
# values that may be streamed into a reservation: command -> (arg index -> index of its key, or -1)
_STREAMABLE: dict[bytes, Callable[[int], int]] = {
    b"SET": lambda i: 1 if i == 2 else -1,
    b"SETNX": lambda i: 1 if i == 2 else -1,
    b"SETEX": lambda i: 1 if i == 3 else -1,
    b"PSETEX": lambda i: 1 if i == 3 else -1,
    b"MSET": lambda i: i - 1 if i >= 2 and i % 2 == 0 else -1,
}


def _glob(pattern: bytes) -> Callable[[bytes], bool]:
    if pattern == b"*":
        return lambda k: True
    pat = pattern.replace(b"[^", b"[!")
    return lambda k: fnmatch.fnmatchcase(k, pat)


class RespConnection(Watched):
    YIELD_EVERY = 16

    def __init__(self, server: RespServer, sock: socket.socket, peer: str, client_id: int) -> None:
        self.server = server
        self.node = server.node
        self.store = server.store
        self.sock = sock
        self.peer = peer
        self.id = client_id
        self.reader = R.CommandReader(server.limits)
        self.session = Session(auth_required=bool(self.node.config.tenants), peer=peer)
        self.db = 0
        self.proto = 2
        self.name = b""
        self.lib: dict[str, bytes] = {}
        self.multi: list[list[Any]] | None = None
        self.multi_failed = False
        self.out: list[Buffer] = []
        self.out_bytes = 0
        self.out_entries: list[Any] = []  # entries whose region bytes are queued in ``out``
        self.quit = False
        self.reservations: list[Reservation] = []
        self.quarantine_s = float(getattr(self.store, "quarantine_s", 2.0))
        # [limits] (memkv/server/limits.py) and the security hooks (memkv/server/security.py)
        self.hard = getattr(self.node, "hardening", None)
        self.sec = getattr(self.node, "security", None)
        self.cmd_bytes = 0  # bytes received for the command being parsed (in-flight in the parser)
        self.reserved = 0  # bytes of streamed values reserved for the command being parsed
        self.reserved_tenant = ""

    @property
    def ns(self) -> str:
        return self.server.dbs[self.db]

    # -- output
    def w(self, data: Buffer) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def w_error(self, text: str) -> None:
        self.w(b"-" + text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\r\n")

    def w_null(self) -> None:
        self.w(R.NULL3 if self.proto >= 3 else R.NULL2)

    def w_entry(self, entry: Any) -> None:
        """Queue a stored value as a bulk string, straight from the region."""
        view = self.store.view(entry)
        # A freed extent is quarantined only if a reader may still hold it: this reply does.
        self.store.expose(entry)
        self.out.append(R.bulk_head(entry.length))
        self.out.append(view)
        self.out.append(R.CRLF)
        self.out_bytes += entry.length + 16
        self.out_entries.append(entry)

    def w_value(self, value: bytes | None) -> None:
        if value is None:
            self.w_null()
        else:
            self.w(R.bulk_head(len(value)))
            self.w(value)
            self.w(R.CRLF)

    def _stale(self) -> bool:
        return any(e.offset < 0 for e in self.out_entries)

    async def flush(self) -> None:
        bufs, self.out, self.out_bytes = self.out, [], 0
        t0 = 0.0
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = self.sock.sendmsg(chunk)
            except BlockingIOError:
                if self.hard is not None:  # no progress for write_timeout: the reaper closes it
                    self.deadline = time.monotonic() + self.hard.write_timeout
                    self.wait_kind = "write"
                if not t0:
                    t0 = time.monotonic()
                elif time.monotonic() - t0 > self.quarantine_s / 2 and self._stale():
                    # A value being sent was freed and its quarantine may run out before the
                    # slow reader gets it: close rather than risk sending recycled bytes.
                    log.warning("RESP client %s too slow for a value that was freed; closing", self.peer)
                    raise PeerGone from None
                await self._wait_writable()
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT):
                    raise PeerGone from exc
                raise
            bufs = advance(bufs, len(chunk), sent)
        self.out_entries.clear()

    # -- input
    async def _recv_into(self, view: memoryview) -> int:
        return await recv_nonblocking(self.sock, view, self._wait_readable)

    def _release_reserved(self) -> None:
        """The command's streamed values are committed or aborted: its tenant bytes are no longer in flight."""
        if self.reserved and self.hard is not None:
            self.hard.release_tenant(self.reserved_tenant, self.reserved)
        self.reserved = 0

    def abort_reservations(self) -> None:
        self._release_reserved()
        for res in self.reservations:
            self.store.abort(res)
        self.reservations.clear()
        if self.multi:
            for cmd in self.multi:
                self._release_args(cmd)

    def _release_args(self, args: list[Any]) -> None:
        for a in args:
            if isinstance(a, Streamed) and a.res is not None:
                self.store.abort(a.res)
                a.res = None

    async def serve(self) -> None:
        since_yield = 0
        reader = self.reader
        try:
            while not self.quit:
                try:
                    ev = reader.next()
                except R.RespError as exc:
                    self.w_error(f"ERR Protocol error: {exc.message}")
                    await self.flush()
                    return
                if isinstance(ev, R.NeedData):
                    if reader.buffered or reader._nargs is not None:  # a partial command: frame_timeout
                        self._phase_frame()
                    else:
                        self._phase_idle()
                    if self.out:
                        await self.flush()
                    n = await self._recv_into(reader.recv_buffer())
                    reader.received(n)
                    hard = self.hard
                    if hard is not None:
                        self.cmd_bytes += n
                        if self.cmd_bytes + self.out_bytes + self.reserved > hard.max_inflight:
                            hard.counters["inflight_refusals"] += 1
                            self.w_error(f"ERR command exceeds the per-connection in-flight limit of "
                                         f"{hard.max_inflight} bytes ([limits] max_inflight_bytes)")
                            await self.flush()
                            return
                    since_yield += 1
                    if since_yield >= self.YIELD_EVERY:
                        since_yield = 0
                        await trio.lowlevel.checkpoint()
                    continue
                if isinstance(ev, R.LargeArg):
                    await self._large(ev)
                    continue
                self._frame_t0 = None
                self.cmd_bytes = reader.buffered  # what is left belongs to the next command
                try:
                    await self.dispatch(ev)
                finally:
                    self._release_args(ev)
                    self.reservations.clear()
                    self._release_reserved()
                if self.out_bytes >= FLUSH_AT:
                    await self.flush()
            if self.out:
                await self.flush()
        except PeerGone:
            return

    async def _large(self, ev: R.LargeArg) -> None:
        """A large argument is arriving: receive a SET/MSET value straight into the region."""
        reader = self.reader
        name = bytes(ev.args[0]).upper() if ev.args else b""
        pos = len(ev.args)
        key_at = _STREAMABLE.get(name, lambda i: -1)(pos)
        key = ev.args[key_at] if key_at > 0 else None
        try:
            local = isinstance(key, bytes) and self._local(key, True)
        except MemKVError:
            local = False  # e.g. fenced: the command reports it once it is complete
        if key is None or self.multi is not None or not local:
            reader.buffer_large()
            return
        ph = Streamed(None, length=ev.length)
        hard = self.hard
        if hard is not None:
            self._phase_payload(ev.length)
        try:
            if len(key) > self.node.limits.max_key:
                raise KeyTooLarge(f"key of {len(key)} bytes is over the limit of {self.node.limits.max_key}")
            self.session.require(self.ns, "rw")
            if hard is not None:  # [limits]: this connection's and this tenant's writes in flight
                if self.reserved + ev.length > hard.max_inflight:
                    hard.check_put(self.reserved + ev.length)
                if self.reserved and self.reserved_tenant != self.session.tenant:
                    self._release_reserved()
                hard.reserve_tenant(self.session.tenant, ev.length)
                self.reserved_tenant = self.session.tenant
                self.reserved += ev.length
            old = self.store.peek(key, namespace=self.ns, tenant=self.session.tenant)
            cs = old.checksum if old is not None and old.length == ev.length else 0
            ph.res = self.store.reserve(key, ev.length, namespace=self.ns, tenant=self.session.tenant,
                                        checksum=cs)
            self.reservations.append(ph.res)
        except MemKVError as exc:
            ph.error = exc
        try:
            if ph.res is not None:
                view = ph.res.view
                got = reader.take_into(view)
                while got < ev.length:
                    n = await self._recv_into(view[got:])
                    reader.consumed_directly(n)
                    got += n
            else:
                reader.take_into(memoryview(_DISCARD)[:0])
                while reader.large_left:
                    k = min(reader.large_left, len(_DISCARD))
                    got = reader.take_into(memoryview(_DISCARD)[:k])
                    if got == 0:
                        n = await self._recv_into(memoryview(_DISCARD)[:k])
                        reader.consumed_directly(n)
        except BaseException:
            if ph.res is not None:
                self.store.abort(ph.res)
            raise
        reader.finish_large(ph)
        self.node.metrics.bytes_in += ev.length
        if ph.res is not None:
            self.server.streamed += 1

    def _local(self, key: bytes, write: bool) -> bool:
        return self.server.is_local(self.session, key, write)

    # -- dispatch
    async def dispatch(self, args: list[Any]) -> None:
        raw = args[0]
        name = bytes(raw).upper() if isinstance(raw, bytes) else b""
        self.server.commands += 1
        spec = COMMANDS.get(name)
        if spec is None:
            shown = bytes(raw[:128]).decode("utf-8", "replace") if isinstance(raw, bytes) else "?"
            rest = " ".join(f"'{bytes(a[:64]).decode('utf-8', 'replace')}'" for a in args[1:4]
                            if isinstance(a, bytes))
            self._fail_multi()
            self.w_error(f"ERR unknown command '{shown}', with args beginning with: {rest}")
            return
        method, arity, _flags, *_ = spec
        if (arity > 0 and len(args) != arity) or (arity < 0 and len(args) < -arity):
            self._fail_multi()
            self.w_error(_err_args(name).text)
            return
        if self.sec is not None and name not in _NOAUTH_OK:
            # The binary protocol's per-request guard: revocation and the tenant's rate limit.
            try:
                self.sec.guard(self.session)
            except MemKVError as exc:
                self._fail_multi()
                self.node.metrics.errors[type(exc).__name__] += 1
                self.w_error(error_text(exc, self.session))
                return
        if self.session.auth_required and not self.session.authenticated and name not in _NOAUTH_OK:
            self._fail_multi()
            self.w_error("NOAUTH Authentication required.")
            return
        if self.multi is not None and name not in _MULTI_IMMEDIATE:
            self.multi.append(args[:])
            args.clear()  # the queued copy owns any reservations now
            self.w(R.QUEUED)
            return
        await self._run(method, args)

    def _fail_multi(self) -> None:
        if self.multi is not None:
            self.multi_failed = True

    async def _run(self, method: str, args: list[Any]) -> None:
        self.node.metrics.ops["RESP_" + method[2:].upper()] += 1
        try:
            r = getattr(self, method)(args)
            if r is not None:
                await r
        except CommandError as exc:
            self.w_error(exc.text)
        except MemKVError as exc:
            self.node.metrics.errors[type(exc).__name__] += 1
            self.w_error(error_text(exc, self.session))
        except (PeerGone, trio.Cancelled):
            raise
        except Exception as exc:  # a bug costs one command, never the node
            log.exception("RESP command %r failed", args[:1])
            self.w_error(f"ERR internal error: {type(exc).__name__}: {exc}")

    # -- helpers
    def _key(self, k: Any) -> bytes:
        if not isinstance(k, bytes):
            raise _err_syntax()
        if len(k) > self.node.limits.max_key:
            raise KeyTooLarge(f"key of {len(k)} bytes is over the limit of {self.node.limits.max_key}")
        return k

    def _need(self, level: str) -> str:
        ns = self.ns
        self.session.require(ns, level)
        return ns

    def _remote(self) -> RemoteBackend:
        if self.server.remote is None:
            raise Moved("key is owned by another node")
        return self.server.remote

    # -- connection commands
    def c_ping(self, args: list[Any]) -> None:
        if len(args) > 2:
            raise _err_args(b"ping")
        if len(args) == 2:
            self.w(R.bulk(bytes(args[1])))
        else:
            self.w(R.PONG)

    def c_echo(self, args: list[Any]) -> None:
        self.w(R.bulk(bytes(args[1])))

    def c_quit(self, args: list[Any]) -> None:
        self.w(R.OK)
        self.quit = True

    def c_reset(self, args: list[Any]) -> None:
        self.abort_reservations()
        self.multi = None
        self.db = 0
        self.proto = 2
        self.name = b""
        self.session = Session(auth_required=bool(self.node.config.tenants), peer=self.peer)
        self.w(R.simple("RESET"))

    def _login(self, user: bytes | None, password: bytes) -> None:
        tenants = self.node.config.tenants
        if not tenants:
            raise CommandError("ERR AUTH <password> called without any password configured for the default "
                               "user. Are you sure your configuration is correct?")
        found = None
        if user is not None and user != b"default":
            t = tenants.get(user.decode("utf-8", "replace"))
            if t is not None and hmac.compare_digest(t.token.encode(), password):
                found = t
        else:  # AUTH token: the tenant whose token it is
            for t in tenants.values():
                if hmac.compare_digest(t.token.encode(), password):
                    found = t
        if found is None:
            self.node.metrics.auth_failures += 1
            raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
        self.session.login(found)
        self.session.tenant_cfg = found  # type: ignore[attr-defined]  # revocation check (security.guard)

    def c_auth(self, args: list[Any]) -> None:
        if len(args) == 2:
            self._login(None, bytes(args[1]))
        elif len(args) == 3:
            self._login(bytes(args[1]), bytes(args[2]))
        else:
            raise _err_syntax()
        self.w(R.OK)

    def c_hello(self, args: list[Any]) -> None:
        proto = self.proto
        i = 1
        if len(args) > 1:
            try:
                proto = int(bytes(args[1]))
            except ValueError:
                raise CommandError("ERR Protocol version is not an integer or out of range") from None
            if proto not in (2, 3):
                raise CommandError("NOPROTO unsupported protocol version")
            i = 2
        while i < len(args):
            opt = bytes(args[i]).upper()
            if opt == b"AUTH" and i + 2 < len(args):
                self._login(bytes(args[i + 1]), bytes(args[i + 2]))
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(args):
                self._setname(bytes(args[i + 1]))
                i += 2
            else:
                raise CommandError(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'")
        if self.session.auth_required and not self.session.authenticated:
            raise CommandError("NOAUTH HELLO must be called with the client already authenticated, otherwise "
                               "the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the "
                               "client and select the RESP protocol version at the same time")
        self.proto = proto
        info = {
            "server": "redis", "version": "7.0.0-memkv", "proto": proto, "id": self.id, "mode": "standalone",
            "role": "master", "modules": [],
        }
        self.w(R.encode(info, proto))

    def _setname(self, name: bytes) -> None:
        if any(c <= 32 or c >= 127 for c in name):
            raise CommandError("ERR Client names cannot contain spaces, newlines or special characters.")
        self.name = name

    def c_client(self, args: list[Any]) -> None:
        sub = bytes(args[1]).upper()
        if sub == b"SETNAME" and len(args) == 3:
            self._setname(bytes(args[2]))
            self.w(R.OK)
        elif sub == b"GETNAME" and len(args) == 2:
            self.w_value(self.name or None)
        elif sub == b"ID" and len(args) == 2:
            self.w(R.integer(self.id))
        elif sub == b"SETINFO" and len(args) == 4:
            self.lib[bytes(args[2]).decode("utf-8", "replace").lower()] = bytes(args[3])
            self.w(R.OK)
        elif sub == b"INFO" and len(args) == 2:
            self.w(R.verbatim(self._client_line() + "\n", self.proto))
        elif sub == b"LIST":
            self.w(R.verbatim(self._client_line() + "\n", self.proto))
        elif sub in (b"NO-EVICT", b"NO-TOUCH", b"REPLY", b"TRACKING"):
            self.w(R.OK)
        else:
            raise CommandError(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. Try CLIENT HELP.")

    def _client_line(self) -> str:
        return (f"id={self.id} addr={self.peer} name={self.name.decode(errors='replace')} db={self.db} "
                f"user={self.session.tenant or 'default'} resp={self.proto}")

    def c_select(self, args: list[Any]) -> None:
        db = _int(args[1])
        if not 0 <= db < len(self.server.dbs):
            raise CommandError("ERR DB index is out of range")
        self.db = db
        self.w(R.OK)

    def c_command(self, args: list[Any]) -> None:
        sub = bytes(args[1]).upper() if len(args) > 1 else b""
        if sub == b"COUNT":
            self.w(R.integer(len(COMMANDS)))
        elif sub == b"DOCS":
            self.w(R.map_head(0, self.proto))
        elif sub == b"INFO":
            names = [bytes(a).upper() for a in args[2:]]
            self.w(R.array_head(len(names)))
            for n in names:
                self._command_info(n) if n in COMMANDS else self.w(R.NULL_ARRAY2 if self.proto < 3 else R.NULL3)
        elif sub == b"LIST":
            self.w(R.encode([n.lower() for n in COMMANDS], self.proto))
        elif not sub:
            self.w(R.array_head(len(COMMANDS)))
            for n in COMMANDS:
                self._command_info(n)
        else:
            raise CommandError(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. Try COMMAND HELP.")

    def _command_info(self, name: bytes) -> None:
        _m, arity, flags, first, last, step = COMMANDS[name]
        self.w(R.array_head(10))
        self.w(R.bulk(name.lower()))
        self.w(R.integer(arity))
        self.w(R.array_head(len(flags)) + b"".join(R.simple(f) for f in flags))
        self.w(R.integer(first) + R.integer(last) + R.integer(step))
        self.w(R.EMPTY_ARRAY * 4)

    def c_config(self, args: list[Any]) -> None:
        sub = bytes(args[1]).upper()
        if sub == b"GET":
            pairs: dict[bytes, bytes] = {}
            for pat in args[2:]:
                match = _glob(bytes(pat).lower())
                for k, v in self._config().items():
                    if match(k):
                        pairs[k] = v
            self.w(R.encode(pairs, self.proto))
        elif sub in (b"SET", b"RESETSTAT", b"REWRITE"):
            self.w(R.OK)
        else:
            raise CommandError(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. Try CONFIG HELP.")

    def _config(self) -> dict[bytes, bytes]:
        return {b"save": b"", b"appendonly": b"no", b"databases": str(len(self.server.dbs)).encode(),
                b"maxmemory": str(self.store.region.size).encode(), b"maxmemory-policy": b"allkeys-lru",
                b"proto-max-bulk-len": str(self.server.limits.max_bulk).encode()}

    def c_time(self, args: list[Any]) -> None:
        t = time.time()
        self.w(R.encode([str(int(t)).encode(), str(int((t % 1) * 1e6)).encode()], self.proto))

    def c_info(self, args: list[Any]) -> None:
        st = self.store.stats()
        srv = self.server
        want = {bytes(a).lower() for a in args[1:]} or {b"default"}
        everything = bool(want & {b"all", b"everything", b"default"})
        sections: list[tuple[bytes, list[str]]] = [
            (b"server", ["redis_version:7.0.0", "memkv_version:0.1.0", "redis_mode:standalone",
                         f"process_id:{os.getpid()}", f"tcp_port:{srv.port}", f"run_id:{self.node.node_id}",
                         f"uptime_in_seconds:{int(time.time() - srv.started_at)}"]),
            (b"clients", [f"connected_clients:{srv.clients}"]),
            (b"memory", [f"used_memory:{st['region']['used']}", f"maxmemory:{st['region']['size']}",
                         "maxmemory_policy:allkeys-lru",
                         f"mem_fragmentation_ratio:{1 + st['region']['fragmentation']:.2f}"]),
            (b"stats", [f"total_connections_received:{srv.clients_total}",
                        f"total_commands_processed:{srv.commands}",
                        f"memkv_streamed_values:{srv.streamed}",
                        f"keyspace_hits:{sum(n['hits'] for n in st['namespaces'].values())}",
                        f"keyspace_misses:{sum(n['misses'] for n in st['namespaces'].values())}",
                        f"evicted_keys:{st['evictions']}", f"expired_keys:{st['expirations']}"]),
            (b"keyspace", [f"db{i}:keys={st['namespaces'].get(ns, {}).get('entries', 0)},expires=0,avg_ttl=0"
                           f",namespace={ns}" for i, ns in enumerate(srv.dbs)]),
        ]
        out = []
        for name, lines in sections:
            if everything or name in want:
                out.append(f"# {name.decode().capitalize()}\r\n" + "".join(line + "\r\n" for line in lines))
        self.w(R.verbatim("\r\n".join(out), self.proto))

    # -- key commands
    def c_dbsize(self, args: list[Any]) -> None:
        ns = self._need("r")
        self.w(R.integer(self.store.count(namespace=ns, tenant=self.session.tenant)))

    def c_get(self, args: list[Any]) -> Awaitable[None] | None:
        ns = self._need("r")
        key = self._key(args[1])
        if not self._local(key, False):
            return self._remote_get([key], single=True)
        e = self.store.get(key, namespace=ns, tenant=self.session.tenant)
        if e is None:
            self.w_null()
        else:
            self.w_entry(e)
        return None

    async def _remote_get(self, keys: list[bytes], single: bool) -> None:
        vals = await self._remote().get_many(self.session, self.ns, keys)
        if not single:
            self.w(R.array_head(len(vals)))
        for v in vals:
            self.w_value(v)

    def c_mget(self, args: list[Any]) -> Awaitable[None] | None:
        ns = self._need("r")
        keys = [self._key(k) for k in args[1:]]
        local = [self._local(k, False) for k in keys]
        if not all(local):
            return self._mget_mixed(ns, keys, local)
        self.w(R.array_head(len(keys)))
        get, tenant = self.store.get, self.session.tenant
        for k in keys:
            e = get(k, namespace=ns, tenant=tenant)
            if e is None:
                self.w_null()
            else:
                self.w_entry(e)
        return None

    async def _mget_mixed(self, ns: str, keys: list[bytes], local: list[bool]) -> None:
        remote_keys = [k for k, loc in zip(keys, local, strict=True) if not loc]
        remote_vals = iter(await self._remote().get_many(self.session, ns, remote_keys))
        self.w(R.array_head(len(keys)))
        for k, loc in zip(keys, local, strict=True):
            if loc:
                e = self.store.get(k, namespace=ns, tenant=self.session.tenant)
                if e is None:
                    self.w_null()
                else:
                    self.w_entry(e)
            else:
                self.w_value(next(remote_vals))

    def _parse_set_opts(self, args: list[Any], start: int) -> tuple[float | None, bool, bool, bool, bool]:
        """(ttl seconds | None, nx, xx, keepttl, get) from SET options."""
        ttl: float | None = None
        nx = xx = keep = get = False
        i = start
        while i < len(args):
            opt = bytes(args[i]).upper() if isinstance(args[i], bytes) else b""
            if opt in (b"EX", b"PX", b"EXAT", b"PXAT") and i + 1 < len(args) and ttl is None and not keep:
                n = _int(args[i + 1])
                if opt == b"EX":
                    t = float(n)
                elif opt == b"PX":
                    t = n / 1000.0
                elif opt == b"EXAT":
                    t = n - time.time()
                else:
                    t = n / 1000.0 - time.time()
                if n <= 0 or n > 1 << 50:
                    raise CommandError("ERR invalid expire time in 'set' command")
                ttl = max(t, 1e-6)
                i += 2
            elif opt == b"NX" and not xx:
                nx = True
                i += 1
            elif opt == b"XX" and not nx:
                xx = True
                i += 1
            elif opt == b"KEEPTTL" and ttl is None:
                keep = True
                i += 1
            elif opt == b"GET":
                get = True
                i += 1
            else:
                raise _err_syntax()
        return ttl, nx, xx, keep, get

    def c_set(self, args: list[Any]) -> Awaitable[None] | None:
        ttl, nx, xx, keep, get = self._parse_set_opts(args, 3)
        return self._set(args[1], args[2], ttl, nx=nx, xx=xx, keep=keep, get=get, reply=True)

    def c_setnx(self, args: list[Any]) -> Awaitable[None] | None:
        return self._set(args[1], args[2], None, nx=True, reply=True, as_int=True)

    def c_setex(self, args: list[Any]) -> Awaitable[None] | None:
        n = _int(args[2])
        if n <= 0:
            raise CommandError("ERR invalid expire time in 'setex' command")
        return self._set(args[1], args[3], float(n), reply=True)

    def c_psetex(self, args: list[Any]) -> Awaitable[None] | None:
        n = _int(args[2])
        if n <= 0:
            raise CommandError("ERR invalid expire time in 'psetex' command")
        return self._set(args[1], args[3], n / 1000.0, reply=True)

    def _set(self, key_arg: Any, value: Any, ttl: float | None, *, nx: bool = False, xx: bool = False,
             keep: bool = False, get: bool = False, reply: bool = True, as_int: bool = False
             ) -> Awaitable[None] | None:
        ns = self._need("rw")
        key = self._key(key_arg)
        if not self._local(key, True):
            if isinstance(value, Streamed):  # cannot happen: only local keys are streamed
                raise InvalidArgument("streamed value for a remote key")
            if nx or xx or keep or get:
                raise CommandError("ERR SET NX/XX/KEEPTTL/GET on a key owned by another node is not supported")
            return self._remote_set(ns, key, value, ttl, as_int)
        tenant = self.session.tenant
        old = self.store.peek(key, namespace=ns, tenant=tenant)
        old_value = bytes(self.store.view(old)) if get and old is not None else None
        if (nx and old is not None) or (xx and old is None):
            if isinstance(value, Streamed) and value.res is not None:
                self.store.abort(value.res)
                value.res = None
            if as_int:
                self.w(R.ZERO)
            elif get:
                self.w_value(old_value)
            else:
                self.w_null()
            return None
        if keep and old is not None and old.expires is not None:
            left = old.expires - self.store.clock()
            ttl = max(left, 1e-6)
        sec = self.sec
        no_store = sec is not None and sec.no_store_for(self.session)
        if no_store:
            ttl = sec.cap_ttl(ttl)
        if isinstance(value, Streamed):
            if value.error is not None:
                raise value.error
            res, value.res = value.res, None
            assert res is not None
            res.ttl = ttl
            res.checksum = _checksum(res.view)
            if sec is None:
                entry = self.store.commit(res)
            else:
                with sec.storing(no_store):
                    entry = self.store.commit(res)
        elif sec is None:
            entry = self.store.put(key, value, namespace=ns, tenant=tenant, ttl=ttl)
        else:
            with sec.storing(no_store):
                entry = self.store.put(key, value, namespace=ns, tenant=tenant, ttl=ttl)
        if sec is not None:  # the audit log, as for a binary PUT
            sec.audit_write("put", self.session, ns, key, no_store=no_store, len=entry.length,
                            cs=entry.checksum, gen=entry.generation, via="resp")
        if as_int:
            self.w(R.ONE)
        elif get:
            self.w_value(old_value)
        elif reply:
            self.w(R.OK)
        return None

    async def _remote_set(self, ns: str, key: bytes, value: Any, ttl: float | None, as_int: bool) -> None:
        await self._remote().put(self.session, ns, key, value, ttl)
        self.w(R.ONE if as_int else R.OK)

    async def c_mset(self, args: list[Any]) -> None:
        if len(args) % 2 == 0:
            raise _err_args(b"mset")
        self._need("rw")
        first: MemKVError | CommandError | None = None
        for i in range(1, len(args), 2):
            try:
                r = self._set(args[i], args[i + 1], None, reply=False)
                if r is not None:
                    await r
            except (MemKVError, CommandError) as exc:
                if first is None:
                    first = exc
        if isinstance(first, CommandError):
            raise first
        if first is not None:
            raise first
        self.w(R.OK)

    async def c_del(self, args: list[Any]) -> None:
        ns = self._need("rw")
        n = 0
        for k in args[1:]:
            key = self._key(k)
            if self._local(key, True):
                if self.store.delete(key, namespace=ns, tenant=self.session.tenant):
                    n += 1
                    if self.sec is not None:
                        self.sec.audit_write("delete", self.session, ns, key, via="resp")
            else:
                n += await self._remote().delete(self.session, ns, key)
        self.w(R.integer(n))

    async def c_exists(self, args: list[Any]) -> None:
        ns = self._need("r")
        keys = [self._key(k) for k in args[1:]]
        local = [self._local(k, False) for k in keys]
        n = sum(1 for k, loc in zip(keys, local, strict=True)
                if loc and self.store.exists(k, namespace=ns, tenant=self.session.tenant))
        remote = [k for k, loc in zip(keys, local, strict=True) if not loc]
        if remote:
            n += sum(await self._remote().exists_many(self.session, ns, remote))
        self.w(R.integer(n))

    def _local_entry(self, key_arg: Any, level: str) -> tuple[str, bytes, Any]:
        ns = self._need(level)
        key = self._key(key_arg)
        if not self._local(key, level != "r"):
            raise CommandError("ERR this command is not forwarded to the node owning the key; "
                               "connect to that node's RESP port")
        return ns, key, self.store.peek(key, namespace=ns, tenant=self.session.tenant)

    def c_strlen(self, args: list[Any]) -> Awaitable[None] | None:
        ns = self._need("r")
        key = self._key(args[1])
        if not self._local(key, False):
            return self._remote_strlen(key)
        e = self.store.peek(key, namespace=ns, tenant=self.session.tenant)
        self.w(R.integer(0 if e is None else e.length))
        return None

    async def _remote_strlen(self, key: bytes) -> None:
        v = (await self._remote().get_many(self.session, self.ns, [key]))[0]
        self.w(R.integer(0 if v is None else len(v)))

    async def c_type(self, args: list[Any]) -> None:
        ns = self._need("r")
        key = self._key(args[1])
        if self._local(key, False):
            found = self.store.exists(key, namespace=ns, tenant=self.session.tenant)
        else:
            found = (await self._remote().exists_many(self.session, ns, [key]))[0]
        self.w(R.simple("string" if found else "none"))

    def _expire(self, args: list[Any], scale: float) -> None:
        ns, key, e = self._local_entry(args[1], "rw")
        n = _int(args[2])
        nx = xx = gt = lt = False
        for a in args[3:]:
            opt = bytes(a).upper()
            nx |= opt == b"NX"
            xx |= opt == b"XX"
            gt |= opt == b"GT"
            lt |= opt == b"LT"
            if opt not in (b"NX", b"XX", b"GT", b"LT"):
                raise CommandError(f"ERR Unsupported option {opt.decode(errors='replace')}")
        if e is None:
            self.w(R.ZERO)
            return
        ttl = n * scale
        cur = math.inf if e.expires is None else e.expires - self.store.clock()
        if (nx and e.expires is not None) or (xx and e.expires is None) or (gt and not ttl > cur) or (
                lt and not ttl < cur):
            self.w(R.ZERO)
            return
        self.store.set_expiry(key, ttl if ttl > 0 else 0.0, namespace=ns, tenant=self.session.tenant)
        self.w(R.ONE)

    def c_expire(self, args: list[Any]) -> None:
        self._expire(args, 1.0)

    def c_pexpire(self, args: list[Any]) -> None:
        self._expire(args, 0.001)

    def c_persist(self, args: list[Any]) -> None:
        ns, key, e = self._local_entry(args[1], "rw")
        if e is None or e.expires is None:
            self.w(R.ZERO)
            return
        self.store.set_expiry(key, None, namespace=ns, tenant=self.session.tenant)
        self.w(R.ONE)

    def _ttl(self, args: list[Any], scale: float) -> None:
        ns, key, _e = self._local_entry(args[1], "r")
        left = self.store.ttl_left(key, namespace=ns, tenant=self.session.tenant)
        if left is None:
            self.w(R.integer(-2))
        elif left == math.inf:
            self.w(R.integer(-1))
        else:
            self.w(R.integer(int(round(left * scale))))

    def c_ttl(self, args: list[Any]) -> None:
        self._ttl(args, 1.0)

    def c_pttl(self, args: list[Any]) -> None:
        self._ttl(args, 1000.0)

    def c_scan(self, args: list[Any]) -> None:
        ns = self._need("r")
        cursor = _int(args[1])
        count, match, i = 10, None, 2
        while i < len(args):
            opt = bytes(args[i]).upper()
            if opt == b"COUNT" and i + 1 < len(args):
                count = _int(args[i + 1])
                if count < 1:
                    raise _err_syntax()
            elif opt == b"MATCH" and i + 1 < len(args):
                match = _glob(bytes(args[i + 1]))
            elif opt == b"TYPE" and i + 1 < len(args):
                if bytes(args[i + 1]).lower() != b"string":
                    match = lambda k: False  # noqa: E731
            else:
                raise _err_syntax()
            i += 2
        nxt, keys = self.store.scan(namespace=ns, tenant=self.session.tenant, after=max(cursor, 0),
                                    count=count, match=match)
        self.w(R.array_head(2))
        self.w(R.bulk(str(nxt)))
        self.w(R.encode(keys, self.proto))

    def c_keys(self, args: list[Any]) -> None:
        ns = self._need("r")
        _, keys = self.store.scan(namespace=ns, tenant=self.session.tenant, after=0, count=1 << 62,
                                  match=_glob(bytes(args[1])))
        self.w(R.encode(keys, self.proto))

    def c_flushdb(self, args: list[Any]) -> None:
        ns = self._need("rw")
        for a in args[1:]:
            if bytes(a).upper() not in (b"ASYNC", b"SYNC"):
                raise _err_syntax()
        _, keys = self.store.scan(namespace=ns, tenant=self.session.tenant, after=0, count=1 << 62)
        for k in keys:
            if self.store.delete(k, namespace=ns, tenant=self.session.tenant) and self.sec is not None:
                self.sec.audit_write("delete", self.session, ns, k, via="resp")
        self.w(R.OK)

    # -- transactions (local commands run without a scheduling point in between)
    def c_multi(self, args: list[Any]) -> None:
        if self.multi is not None:
            raise CommandError("ERR MULTI calls can not be nested")
        self.multi = []
        self.multi_failed = False
        self.w(R.OK)

    def c_discard(self, args: list[Any]) -> None:
        if self.multi is None:
            raise CommandError("ERR DISCARD without MULTI")
        for cmd in self.multi:
            self._release_args(cmd)
        self.multi = None
        self.w(R.OK)

    async def c_exec(self, args: list[Any]) -> None:
        if self.multi is None:
            raise CommandError("ERR EXEC without MULTI")
        queued, self.multi = self.multi, None
        if self.multi_failed:
            for cmd in queued:
                self._release_args(cmd)
            raise CommandError("EXECABORT Transaction discarded because of previous errors.")
        self.w(R.array_head(len(queued)))
        for cmd in queued:
            try:
                await self._run(COMMANDS[bytes(cmd[0]).upper()][0], cmd)
            finally:
                self._release_args(cmd)
