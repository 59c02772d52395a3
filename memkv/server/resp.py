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

This module is the RESP parser and serialiser (memkv/protocol/resp.py) driven
over a socket, and the mapping of each Redis command onto the node's typed
requests (memkv/server/requests.py). Every request goes through the node's
pipeline (memkv/server/pipeline.py) -- the same stages and operations as the
binary protocol: authentication and revocation, rate limits, cluster routing
and forwarding of keys another node serves, grants, no-store, bytes in
flight, audit, flash promotion. Commands that only concern the connection
(ECHO, SELECT, CLIENT, ...) pass the pipeline as a PING (login and rate limit).

Data path: the connection is a plain non-blocking socket driven with trio's
``wait_readable``/``wait_writable`` (as :mod:`memkv.server.connection`). GET
values go region -> socket as memoryviews (``sendmsg``); a large SET/MSET value
is received straight into its region reservation (:class:`Streamed`, the
pipeline's ``begin_put``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import trio

from memkv.config import split_hostport
from memkv.errors import (
    AuthError,
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
from memkv.server.extension import Forwarder
from memkv.server.limits import Watched
from memkv.server.requests import (
    Count,
    Delete,
    Expire,
    Flush,
    Get,
    Keyspace,
    Login,
    Peek,
    Ping,
    Put,
    Request,
    Scan,
    Stats,
    TimeToLive,
)
from memkv.server.session import Session

if TYPE_CHECKING:
    from memkv.server.node import Node
    from memkv.server.operations import PutPlan, Written

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


@dataclass
class Streamed:
    """A large value received straight into its region reservation (``plan``), or the error that
    kept it out (its bytes were discarded; the command reports it)."""

    plan: PutPlan | None
    error: MemKVError | None = None
    length: int = 0


class RespServer:
    """The RESP listener of one node (built by the node when ``resp_port`` is configured)."""

    def __init__(self, node: Node, forwarder: Forwarder | None = None) -> None:
        self.node = node
        self.pipeline = node.pipeline
        self.tenants = node.tenants
        self.hard = node.hardening
        self.metrics = node.metrics
        self.clock = node.clock
        self.max_key = node.limits.max_key
        self.forwarder = forwarder
        self.port_wanted = node.config.resp_port or 0
        self.port = 0
        self.started = trio.Event()
        namespaces = node.store.namespaces
        names = [n for n in ("shared", "session") if n in namespaces]
        self.dbs: list[str] = names + sorted(n for n in namespaces if n not in names)
        self.maxmemory = node.store.region.size
        self.quarantine_s = node.store.quarantine_s
        self.limits = R.RespLimits(max_bulk=min(512 * 1024 * 1024, max(self.maxmemory, 1 << 20)))
        self.clients = 0
        self.clients_total = 0
        self.commands = 0
        self.streamed = 0  # large values received straight into the region
        self.next_client_id = 0
        self.started_at = self.clock.wall()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host = split_hostport(self.node.config.listen)[0]
        listener = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET,
                                      trio.socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, self.port_wanted))
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
                    if not self.hard.admit():  # [limits] max_connections (node-wide)
                        nursery.start_soon(self.hard.refuse, raw, b"-ERR max number of clients reached\r\n")
                        continue
                    nursery.start_soon(self._run, raw, f"{addr[0]}:{addr[1]}")
        finally:
            listener.close()
            if self.forwarder is not None:
                with trio.CancelScope(shield=True):
                    await self.forwarder.aclose()

    async def _run(self, sock: socket.socket, peer: str) -> None:
        self.clients += 1
        self.clients_total += 1
        self.next_client_id += 1
        conn = RespConnection(self, sock, peer, self.next_client_id)
        hard = self.hard
        try:
            with sock:
                with trio.CancelScope() as scope:
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
            conn.abort_pending()
            self.clients -= 1
            hard.unregister(conn)
            hard.closed()


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
        self.pipeline = server.pipeline
        self.sock = sock
        self.peer = peer
        self.id = client_id
        self.reader = R.CommandReader(server.limits)
        self.session = self._new_session()
        self.db = 0
        self.proto = 2
        self.name = b""
        self.lib: dict[str, bytes] = {}
        self.multi: list[list[Any]] | None = None
        self.multi_failed = False
        self.out: list[Buffer] = []
        self.out_bytes = 0
        self.out_entries: list[Any] = []  # entries whose region bytes are queued in ``out``
        self.durable = 0  # the flash write the queued replies must wait for (group commit)
        self.quit = False
        self.quarantine_s = server.quarantine_s
        self.hard = server.hard  # [limits] (memkv/server/limits.py)
        self.cmd_bytes = 0  # bytes received for the command being parsed (in-flight in the parser)
        self.streaming = 0  # bytes of values streamed into reservations for the command being parsed

    def _new_session(self) -> Session:
        return Session(auth_required=bool(self.server.tenants), peer=self.peer, front="resp")

    @property
    def ns(self) -> str:
        return self.server.dbs[self.db]

    # -- the pipeline
    async def call(self, req: Request) -> Any:
        """Run one request through the node's pipeline (its stages, then its operation)."""
        result = self.pipeline.run(self.session, req)
        if type(result) is CoroutineType:
            result = await result
        if req.durable > self.durable:
            self.durable = req.durable
        return result

    async def put(self, req: Put, values: list[Any]) -> list[Written]:
        out = await self.pipeline.put(self.session, req, values)
        if req.durable > self.durable:
            self.durable = req.durable
        return out

    def finish(self, plan: PutPlan) -> list[Written]:
        out = self.pipeline.finish_put(self.session, plan)
        if plan.request.durable > self.durable:
            self.durable = plan.request.durable
        return out

    # -- output
    def w(self, data: Buffer) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def w_error(self, text: str) -> None:
        self.w(b"-" + text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\r\n")

    def w_null(self) -> None:
        self.w(R.NULL3 if self.proto >= 3 else R.NULL2)

    def w_hit(self, hit: tuple[memoryview, Any] | None) -> None:
        """Queue a GET result as a bulk string (region bytes are sent from the region)."""
        if hit is None:
            self.w_null()
            return
        view, entry = hit
        self.out.append(R.bulk_head(len(view)))
        self.out.append(view)
        self.out.append(R.CRLF)
        self.out_bytes += len(view) + 16
        if entry is not None and entry.offset >= 0:  # region bytes (not a copy): watched while queued
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
        if self.durable:  # writes in a durable namespace: their replies go once they are on disk
            seq, self.durable = self.durable, 0
            try:
                await self.pipeline.durable(seq)
            except MemKVError as exc:
                # The queued replies say OK for a write that is not on disk: never send them.
                log.error("RESP client %s: a durable write failed (%s); closing", self.peer, exc)
                raise PeerGone from exc
        bufs, self.out, self.out_bytes = self.out, [], 0
        t0 = 0.0
        now = self.server.clock.monotonic
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = self.sock.sendmsg(chunk)
            except BlockingIOError:
                if not t0:
                    t0 = now()
                elif now() - t0 > self.quarantine_s / 2 and self._stale():
                    # A value being sent was freed and its quarantine may run out before the
                    # slow reader gets it: close rather than risk sending recycled bytes.
                    log.warning("RESP client %s too slow for a value that was freed; closing", self.peer)
                    raise PeerGone from None
                await self._wait_writable()  # no progress for write_timeout: the reaper closes it
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

    def abort_pending(self) -> None:
        """The connection is gone: give back the room of values streamed for unfinished commands."""
        if self.multi:
            for cmd in self.multi:
                self._release_args(cmd)

    def _release_args(self, args: list[Any]) -> None:
        for a in args:
            if isinstance(a, Streamed) and a.plan is not None:
                self.pipeline.abort_put(self.session, a.plan)
                a.plan = None

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
                    self.cmd_bytes += n
                    if self.cmd_bytes + self.out_bytes + self.streaming > hard.max_inflight:
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
                self.streaming = 0
                try:
                    await self.dispatch(ev)
                finally:
                    self._release_args(ev)
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
        key_at = _STREAMABLE.get(name, lambda i: -1)(len(ev.args))
        key = ev.args[key_at] if key_at > 0 else None
        if not isinstance(key, bytes) or self.multi is not None:
            reader.buffer_large()
            return
        ph = Streamed(None, length=ev.length)
        self._phase_payload(ev.length)
        try:
            if len(key) > self.server.max_key:
                raise KeyTooLarge(f"key of {len(key)} bytes is over the limit of {self.server.max_key}")
            # [limits]: this command's streamed values together (the stage checks each one)
            self.hard.check_put(self.streaming + ev.length)
            plan = self.pipeline.begin_put(self.session, Put(self.ns, [key], [ev.length], [None], single=True))
            if plan is None:  # another node serves the key: buffer the value, the command forwards it
                reader.buffer_large()
                return
            ph.plan = plan
            self.streaming += ev.length
        except MemKVError as exc:
            ph.error = exc
        try:
            if ph.plan is not None:
                view = ph.plan.views()[0]
                assert view is not None
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
            if ph.plan is not None:
                self.pipeline.abort_put(self.session, ph.plan)
            raise
        reader.finish_large(ph)
        self.server.metrics.bytes_in += ev.length
        if ph.plan is not None:
            self.server.streamed += 1

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
        if self.multi is not None and name not in _MULTI_IMMEDIATE:
            try:  # a queued command is admitted now (login, rate limit), and run at EXEC
                await self.call(Ping())
            except MemKVError as exc:
                self._fail_multi()
                self._error(exc)
                return
            self.multi.append(args[:])
            args.clear()  # the queued copy owns any reservations now
            self.w(R.QUEUED)
            return
        await self._run(method, args)

    def _fail_multi(self) -> None:
        if self.multi is not None:
            self.multi_failed = True

    def _error(self, exc: MemKVError) -> None:
        self.server.metrics.errors[type(exc).__name__] += 1
        self.w_error(error_text(exc, self.session))

    async def _run(self, method: str, args: list[Any]) -> None:
        self.server.metrics.ops["RESP_" + method[2:].upper()] += 1
        try:
            r = getattr(self, method)(args)
            if r is not None:
                await r
        except CommandError as exc:
            self.w_error(exc.text)
        except MemKVError as exc:
            self._error(exc)
        except (PeerGone, trio.Cancelled):
            raise
        except Exception as exc:  # a bug costs one command, never the node
            log.exception("RESP command %r failed", args[:1])
            self.w_error(f"ERR internal error: {type(exc).__name__}: {exc}")

    def _key(self, k: Any) -> bytes:
        if not isinstance(k, bytes):
            raise _err_syntax()
        if len(k) > self.server.max_key:
            raise KeyTooLarge(f"key of {len(k)} bytes is over the limit of {self.server.max_key}")
        return k

    # -- connection commands (they pass the pipeline as a PING: login, revocation, rate limit)
    async def c_ping(self, args: list[Any]) -> None:
        if len(args) > 2:
            raise _err_args(b"ping")
        await self.call(Ping())
        if len(args) == 2:
            self.w(R.bulk(bytes(args[1])))
        else:
            self.w(R.PONG)

    async def c_echo(self, args: list[Any]) -> None:
        await self.call(Ping())
        self.w(R.bulk(bytes(args[1])))

    def c_quit(self, args: list[Any]) -> None:
        self.w(R.OK)
        self.quit = True

    def c_reset(self, args: list[Any]) -> None:
        self.abort_pending()
        self.multi = None
        self.db = 0
        self.proto = 2
        self.name = b""
        self.session = self._new_session()
        self.w(R.simple("RESET"))

    async def _login(self, user: bytes | None, password: bytes) -> None:
        tenant = None if user is None else user.decode("utf-8", "replace")
        try:
            await self.call(Login(tenant, password))
        except AuthError:
            self.server.metrics.auth_failures += 1
            raise CommandError("WRONGPASS invalid username-password pair or user is disabled.") from None

    async def c_auth(self, args: list[Any]) -> None:
        if len(args) == 2:
            await self._login(None, bytes(args[1]))
        elif len(args) == 3:
            await self._login(bytes(args[1]), bytes(args[2]))
        else:
            raise _err_syntax()
        self.w(R.OK)

    async def c_hello(self, args: list[Any]) -> None:
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
                await self._login(bytes(args[i + 1]), bytes(args[i + 2]))
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

    async def c_client(self, args: list[Any]) -> None:
        await self.call(Ping())
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
        elif sub in (b"INFO", b"LIST") and len(args) >= 2 and (sub == b"LIST" or len(args) == 2):
            self.w(R.verbatim(self._client_line() + "\n", self.proto))
        elif sub in (b"NO-EVICT", b"NO-TOUCH", b"REPLY", b"TRACKING"):
            self.w(R.OK)
        else:
            raise CommandError(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. Try CLIENT HELP.")

    def _client_line(self) -> str:
        return (f"id={self.id} addr={self.peer} name={self.name.decode(errors='replace')} db={self.db} "
                f"user={self.session.tenant or 'default'} resp={self.proto}")

    async def c_select(self, args: list[Any]) -> None:
        await self.call(Ping())
        db = _int(args[1])
        if not 0 <= db < len(self.server.dbs):
            raise CommandError("ERR DB index is out of range")
        self.db = db
        self.w(R.OK)

    async def c_command(self, args: list[Any]) -> None:
        await self.call(Ping())
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

    async def c_config(self, args: list[Any]) -> None:
        await self.call(Ping())
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
                b"maxmemory": str(self.server.maxmemory).encode(), b"maxmemory-policy": b"allkeys-lru",
                b"proto-max-bulk-len": str(self.server.limits.max_bulk).encode()}

    async def c_time(self, args: list[Any]) -> None:
        await self.call(Ping())
        t = self.server.clock.wall()
        self.w(R.encode([str(int(t)).encode(), str(int((t % 1) * 1e6)).encode()], self.proto))

    async def c_info(self, args: list[Any]) -> None:
        st = await self.call(Stats())
        # the keyspace exactly as DBSIZE counts it, for the namespaces this session may read
        counts = dict(await self.call(Keyspace(self.server.dbs)))
        srv = self.server
        want = {bytes(a).lower() for a in args[1:]} or {b"default"}
        everything = bool(want & {b"all", b"everything", b"default"})
        server = (b"server", ["redis_version:7.0.0", "memkv_version:0.1.0", "redis_mode:standalone",
                              f"process_id:{os.getpid()}", f"tcp_port:{srv.port}", f"run_id:{st['node_id']}",
                              f"uptime_in_seconds:{int(srv.clock.wall() - srv.started_at)}"])
        keyspace = (b"keyspace", [f"db{i}:keys={counts[ns]},expires=0,avg_ttl=0,namespace={ns}"
                                  for i, ns in enumerate(srv.dbs) if ns in counts])
        if self.session.observes_all:
            sections: list[tuple[bytes, list[str]]] = [
                server,
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
                keyspace,
            ]
        else:  # a tenant's own figures only (Node.tenant_stats): nothing counts other tenants
            own = st["tenants"][self.session.tenant]
            sections = [
                server,
                (b"memory", [f"used_memory:{own['bytes']}", f"maxmemory:{st['region']['size']}",
                             "maxmemory_policy:allkeys-lru"]),
                (b"stats", [f"keyspace_hits:{own['hits']}", f"keyspace_misses:{own['misses']}"]),
                keyspace,
            ]
        out = []
        for name, lines in sections:
            if everything or name in want:
                out.append(f"# {name.decode().capitalize()}\r\n" + "".join(line + "\r\n" for line in lines))
        self.w(R.verbatim("\r\n".join(out), self.proto))

    # -- key commands
    async def c_dbsize(self, args: list[Any]) -> None:
        self.w(R.integer(await self.call(Count(self.ns))))

    async def c_get(self, args: list[Any]) -> None:
        self.w_hit((await self.call(Get(self.ns, [self._key(args[1])], expose=True)))[0])

    async def c_mget(self, args: list[Any]) -> None:
        hits = await self.call(Get(self.ns, [self._key(k) for k in args[1:]], expose=True))
        self.w(R.array_head(len(hits)))
        for hit in hits:
            self.w_hit(hit)

    def _set_options(self, args: list[Any], start: int) -> tuple[float | None, str | None, bool, bool]:
        """(ttl seconds | None, condition "nx" | "xx" | None, keepttl, get) from SET options."""
        ttl: float | None = None
        cond: str | None = None
        keep = get = False
        i = start
        while i < len(args):
            opt = bytes(args[i]).upper() if isinstance(args[i], bytes) else b""
            if opt in (b"EX", b"PX", b"EXAT", b"PXAT") and i + 1 < len(args) and ttl is None and not keep:
                n = _int(args[i + 1])
                now = self.server.clock.wall()
                t = {b"EX": float(n), b"PX": n / 1000.0, b"EXAT": n - now, b"PXAT": n / 1000.0 - now}[opt]
                if n <= 0 or n > 1 << 50:
                    raise CommandError("ERR invalid expire time in 'set' command")
                ttl = max(t, 1e-6)
                i += 2
            elif opt in (b"NX", b"XX") and cond in (None, opt.decode().lower()):
                cond = opt.decode().lower()
                i += 1
            elif opt == b"KEEPTTL" and ttl is None:
                keep = True
                i += 1
            elif opt == b"GET":
                get = True
                i += 1
            else:
                raise _err_syntax()
        return ttl, cond, keep, get

    async def c_set(self, args: list[Any]) -> None:
        ttl, cond, keep, get = self._set_options(args, 3)
        (entry, _err, old), = await self._store([(args[1], args[2])], ttl, cond=cond, keep=keep, get=get)
        if get:
            self.w_value(old)
        elif cond is not None and entry is None:
            self.w_null()
        else:
            self.w(R.OK)

    async def c_setnx(self, args: list[Any]) -> None:
        (entry, _err, _old), = await self._store([(args[1], args[2])], None, cond="nx")
        self.w(R.ZERO if entry is None else R.ONE)

    async def c_setex(self, args: list[Any]) -> None:
        n = _int(args[2])
        if n <= 0:
            raise CommandError("ERR invalid expire time in 'setex' command")
        await self._store([(args[1], args[3])], float(n))
        self.w(R.OK)

    async def c_psetex(self, args: list[Any]) -> None:
        n = _int(args[2])
        if n <= 0:
            raise CommandError("ERR invalid expire time in 'psetex' command")
        await self._store([(args[1], args[3])], n / 1000.0)
        self.w(R.OK)

    async def c_mset(self, args: list[Any]) -> None:
        if len(args) % 2 == 0:
            raise _err_args(b"mset")
        out = await self._store([(args[i], args[i + 1]) for i in range(1, len(args), 2)], None, each=True)
        first = next((err for _e, err, _o in out if err is not None), None)
        if first is not None:
            raise first  # MSET reports the first failing key's error (the others are written)
        self.w(R.OK)

    async def _store(self, pairs: list[tuple[Any, Any]], ttl: float | None, *, cond: str | None = None,
                     keep: bool = False, get: bool = False, each: bool = False) -> list[Written]:
        """Write ``pairs`` in order. Values streamed into reservations (``Streamed``) are committed
        with these options; runs of values in hand go as one put. A single write raises its error;
        with ``each`` every pair's error is reported in its result."""
        out: list[Written] = []
        batch: list[tuple[bytes, Any]] = []

        async def send_batch() -> None:
            if not batch:
                return
            keys = [k for k, _ in batch]
            values = [memoryview(v).cast("B") for _, v in batch]
            # checksums: computed by the put once the bytes are in the region (None)
            req = Put(self.ns, keys, [v.nbytes for v in values], [None] * len(values), ttl=ttl,
                      cond=cond, keep_ttl=keep, get_old=get, single=not each)
            try:
                out.extend(await self.put(req, values))
            except MemKVError as exc:
                if not each:
                    raise
                out.extend((None, exc, None) for _ in batch)
            batch.clear()

        for key_arg, value in pairs:
            try:
                if isinstance(value, Streamed):
                    await send_batch()
                    out.append(self._finish_streamed(value, ttl, cond, keep, get))
                elif not isinstance(value, bytes):
                    raise _err_syntax()
                else:
                    batch.append((self._key(key_arg), value))
            except MemKVError as exc:
                if not each:
                    raise
                await send_batch()
                out.append((None, exc, None))
        await send_batch()
        return out

    def _finish_streamed(self, value: Streamed, ttl: float | None, cond: str | None, keep: bool,
                         get: bool) -> Written:
        if value.error is not None:
            raise value.error
        plan, value.plan = value.plan, None
        assert plan is not None
        req = plan.request  # the options came after the value
        req.ttl, req.cond, req.keep_ttl, req.get_old = ttl, cond, keep, get
        return self.finish(plan)[0]

    async def c_del(self, args: list[Any]) -> None:
        deleted = await self.call(Delete(self.ns, [self._key(k) for k in args[1:]]))
        self.w(R.integer(sum(1 for d in deleted if d)))

    async def c_exists(self, args: list[Any]) -> None:
        found = await self.call(Peek(self.ns, [self._key(k) for k in args[1:]]))
        self.w(R.integer(sum(1 for e in found if e is not None)))

    async def c_strlen(self, args: list[Any]) -> None:
        e = (await self.call(Peek(self.ns, [self._key(args[1])], lengths=True)))[0]
        self.w(R.integer(0 if e is None else e.length))

    async def c_type(self, args: list[Any]) -> None:
        e = (await self.call(Peek(self.ns, [self._key(args[1])])))[0]
        self.w(R.simple("string" if e is not None else "none"))

    async def _expire(self, args: list[Any], scale: float) -> None:
        key = self._key(args[1])
        n = _int(args[2])
        when = set()
        for a in args[3:]:
            opt = bytes(a).upper()
            if opt not in (b"NX", b"XX", b"GT", b"LT"):
                raise CommandError(f"ERR Unsupported option {opt.decode(errors='replace')}")
            when.add(opt.decode().lower())
        changed = await self.call(Expire(self.ns, key, n * scale, frozenset(when)))
        self.w(R.ONE if changed else R.ZERO)

    async def c_expire(self, args: list[Any]) -> None:
        await self._expire(args, 1.0)

    async def c_pexpire(self, args: list[Any]) -> None:
        await self._expire(args, 0.001)

    async def c_persist(self, args: list[Any]) -> None:
        changed = await self.call(Expire(self.ns, self._key(args[1]), None, persist=True))
        self.w(R.ONE if changed else R.ZERO)

    async def _ttl(self, args: list[Any], scale: float) -> None:
        left = (await self.call(TimeToLive(self.ns, [self._key(args[1])])))[0]
        if left is None:
            self.w(R.integer(-2))
        elif left == math.inf:
            self.w(R.integer(-1))
        else:
            self.w(R.integer(int(round(left * scale))))

    async def c_ttl(self, args: list[Any]) -> None:
        await self._ttl(args, 1.0)

    async def c_pttl(self, args: list[Any]) -> None:
        await self._ttl(args, 1000.0)

    async def c_scan(self, args: list[Any]) -> None:
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
        nxt, keys = await self.call(Scan(self.ns, cursor, count, match))
        self.w(R.array_head(2))
        self.w(R.bulk(str(nxt)))
        self.w(R.encode(keys, self.proto))

    async def c_keys(self, args: list[Any]) -> None:
        _, keys = await self.call(Scan(self.ns, 0, 1 << 62, _glob(bytes(args[1]))))
        self.w(R.encode(keys, self.proto))

    async def c_flushdb(self, args: list[Any]) -> None:
        for a in args[1:]:
            if bytes(a).upper() not in (b"ASYNC", b"SYNC"):
                raise _err_syntax()
        await self.call(Flush(self.ns))
        self.w(R.OK)

    # -- transactions (local commands run without a scheduling point in between)
    def c_discard_all(self) -> None:
        for cmd in self.multi or []:
            self._release_args(cmd)
        self.multi = None

    async def c_multi(self, args: list[Any]) -> None:
        await self.call(Ping())
        if self.multi is not None:
            raise CommandError("ERR MULTI calls can not be nested")
        self.multi = []
        self.multi_failed = False
        self.w(R.OK)

    async def c_discard(self, args: list[Any]) -> None:
        await self.call(Ping())
        if self.multi is None:
            raise CommandError("ERR DISCARD without MULTI")
        for cmd in self.multi:
            self._release_args(cmd)
        self.multi = None
        self.w(R.OK)

    async def c_exec(self, args: list[Any]) -> None:
        if self.multi is None:
            raise CommandError("ERR EXEC without MULTI")
        try:
            await self.call(Ping())
        except MemKVError:
            self.c_discard_all()
            raise
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
