"""Server side of one-sided reads: LOCATE, the shared-memory
hand-off and the RDMA responder.

One opcode, ``Op.LOCATE``, with a ``do`` field:

* ``do="locate"`` (default): ``{"ks": [keys], "ns", "lease"}`` ->
  ``{"r": region id, "d": [desc | None | False], "lease": s, "valid": s}``
  where ``desc = [offset, length, checksum, generation]``, ``None`` is a miss
  and ``False`` a value that exists but is not in the region (read it over
  TCP). Every located entry is leased for ``lease`` seconds (not evicted while
  the reader copies) and ``store.expose``d: when it is freed, its extent goes
  through the allocator's quarantine, so for ``valid`` seconds after the reply
  (the quarantine) the bytes at the descriptor are exactly those of that
  generation. A reader checks the checksum and that it finished within
  ``valid`` of sending the request, and falls back to TCP otherwise.
* ``do="info"``: the node's host identity, region id and size, the abstract Unix
  socket that hands out the region and a one-time ticket for it (only where
  one-sided reads are allowed for this session), and whether RDMA is served.
* ``do="rdma"``: ``{"qpn", "gid", "mtu"}`` of the client's RC queue pair ->
  the node's QP number, GID, the region MR's ``rkey`` and address. The node's
  QP lives as long as the TCP connection's session.

Shared memory. The region's file is unlinked right after the node maps it
(``Region.detach_file``), so a SIGKILLed node leaves nothing in /dev/shm. A
same-host client gets a read-only file descriptor of the region through an
abstract Unix socket (no file either; it vanishes with the process) with
SCM_RIGHTS, after presenting a ticket obtained over its (authenticated) TCP
connection, and maps it read-only.

Tenants. A region mapping (or the region MR) shows every value of every
tenant, so when tenants are configured one-sided reads are off unless the
node config sets ``onesided_tenants = true`` (all tenants trusted to that
extent); reads then go over TCP, where ACLs apply per request.
"""

from __future__ import annotations

import array
import logging
import os
import secrets
import socket
import weakref
from typing import Any

import trio

from memkv.engine.store import Store
from memkv.errors import InvalidArgument, NodeUnavailable
from memkv.protocol import codec as c
from memkv.protocol.opcodes import Op
from memkv.server.binary import Reply
from memkv.server.extension import Extension, Operation
from memkv.server.requests import LOGIN, READ, Access, Call, Request
from memkv.server.session import Session
from memkv.transport import host_identity, rdma_devices

log = logging.getLogger("memkv.onesided")

TICKET_TTL_S = 30.0
MAX_LEASE_S = 60.0


class OneSided:
    def __init__(self, store: Store, limits: c.Limits, *, tenants_trusted: bool = False) -> None:
        self.store = store
        self.limits = limits
        self.clock = store.clock
        self.tenants_trusted = tenants_trusted  # [node] onesided_tenants
        self.region_id = secrets.token_hex(8)
        self.sock_name = f"\0memkv-{os.getpid()}-{self.region_id}"
        self._tickets: dict[bytes, float] = {}
        self._rdma: Any = None  # RdmaResponder, created on first use
        self._rdma_error: str | None = None
        self.rdma_enabled = os.environ.get("MEMKV_RDMA", "1") != "0" and bool(rdma_devices())
        self.locates = 0
        self.located = 0
        self.fds_sent = 0
        self.rdma_qps = 0

    def extension(self) -> Extension:
        """LOCATE (``do`` = locate | info | rdma) and the task handing the region to same-host clients."""
        kinds: dict[str, tuple[str, Access]] = {"locate": ("LOCATE", READ), "info": ("LOCATE_INFO", LOGIN),
                                                "rdma": ("LOCATE_RDMA", LOGIN)}

        def decode(meta: dict[str, Any], limits: c.Limits, payload_len: int) -> Request:
            do = meta.get("do", "locate")
            kind = kinds.get(do) if isinstance(do, str) else None
            if kind is None:
                raise InvalidArgument(f"LOCATE: unknown 'do' {do!r}")
            if kind[0] == "LOCATE":  # namespace and keys for the stages (grant, routing)
                return Call(kind[0], kind[1], meta, c.get_str(meta, "ns", "shared", 128),
                            c.get_keys(meta, "ks", limits), meta.get("ep"))
            return Call(kind[0], kind[1], meta)

        return Extension("onesided", operations=(
            Operation("LOCATE", READ, self.locate, opcode=int(Op.LOCATE), decode=decode),
            Operation("LOCATE_INFO", LOGIN, self.info),
            Operation("LOCATE_RDMA", LOGIN, self.rdma_connect),
        ), background=(self.serve_fds,), stats=self.stats)

    # -- policy
    def allowed(self, session: Session) -> bool:
        if self.store.quarantine_s <= 0:
            return False  # nothing would keep a descriptor's bytes in place
        if session.auth_required:
            return self.tenants_trusted
        return True

    # -- the operations
    def info(self, session: Session, req: Call) -> Reply:
        ok = self.allowed(session)
        out: dict[str, Any] = {"host": host_identity(), "r": self.region_id, "size": self.store.region.size,
                               "valid": self.store.quarantine_s, "ok": ok, "rdma": ok and self.rdma_enabled}
        if ok and self.store.region.ro_fd is not None:
            ticket = secrets.token_bytes(16)
            now = self.clock.monotonic()
            self._tickets = {t: exp for t, exp in self._tickets.items() if exp > now}
            self._tickets[ticket] = now + TICKET_TTL_S
            out["sock"] = self.sock_name.encode()
            out["ticket"] = ticket
        return Reply(out)

    def locate(self, session: Session, req: Call) -> Reply:
        meta, ns, keys = req.meta, req.ns, req.keys
        if not self.allowed(session):
            return Reply({"r": self.region_id, "d": [False] * len(keys), "lease": 0.0, "valid": 0.0})
        lease = c.get_opt_float(meta, "lease")
        lease = 2.0 if lease is None else max(0.0, min(lease, MAX_LEASE_S))
        inline = c.get_int(meta, "inline", 0)
        store = self.store
        until = store.now() + lease
        descs: list[Any] = []
        views: list[memoryview] = []
        total = 0
        get = store.get
        for key in keys:
            e = get(key, namespace=ns, tenant=session.tenant)
            if e is None:
                descs.append(None)
            elif e.offset < 0:
                descs.append(False)
            elif e.length <= inline:
                # Small values travel in the reply: a one-sided copy would cost a
                # second step for a few bytes. Offset -1 marks them.
                descs.append([-1, e.length, e.checksum, e.generation])
                views.append(store.view(e))
                total += e.length
            else:
                store.expose(e)
                if e.lease_until < until:
                    e.lease_until = until
                descs.append([e.offset, e.length, e.checksum, e.generation])
        self.locates += 1
        self.located += len(keys)
        out = {"r": self.region_id, "d": descs, "lease": lease, "valid": store.quarantine_s}
        if store.namespaces[ns].overwrite:
            out["ow"] = True  # as GET: a cluster client compares replica versions, over TCP
        return Reply(out, views, total)

    def rdma_connect(self, session: Session, req: Call) -> Reply:
        meta = req.meta
        if not (self.allowed(session) and self.rdma_enabled):
            raise NodeUnavailable("this node serves no RDMA")
        if self._rdma is None:
            if self._rdma_error is not None:
                raise NodeUnavailable(f"RDMA unavailable: {self._rdma_error}")
            try:
                from memkv.server.rdma import RdmaResponder

                self._rdma = RdmaResponder(self.store.region)
            except Exception as exc:
                self._rdma_error = f"{type(exc).__name__}: {exc}"
                log.warning("RDMA disabled: %s", self._rdma_error)
                raise NodeUnavailable(f"RDMA unavailable: {self._rdma_error}") from exc
        qpn = c.get_int(meta, "qpn")
        gid = meta.get("gid")
        if not isinstance(gid, str):
            raise InvalidArgument("field 'gid' must be a string")
        mtu = meta.get("mtu")
        qp, reply = self._rdma.accept(gid, qpn, int(mtu) if isinstance(mtu, int) else None)
        # the QP lives as long as the connection (its session)
        weakref.finalize(session, _close_quietly, qp)
        self.rdma_qps += 1
        return Reply(reply)

    # -- the shared-memory hand-off: an abstract Unix socket, SCM_RIGHTS
    async def serve_fds(self) -> None:
        region = self.store.region
        if region.ro_fd is None:
            return
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.sock_name)
            sock.listen(64)
            while True:
                conn, _ = await sock.accept()
                with conn:
                    with trio.move_on_after(2):
                        await self._hand_fd(conn, region)
        finally:
            sock.close()
            if self._rdma is not None:
                _close_quietly(self._rdma)
                self._rdma = None

    async def _hand_fd(self, conn: Any, region: Any) -> None:
        ticket = b""
        while len(ticket) < 16:
            data = await conn.recv(16 - len(ticket))
            if not data:
                return
            ticket += data
        exp = self._tickets.pop(ticket, None)
        if exp is None or exp < self.clock.monotonic():
            await conn.send(b"NO")
            return
        msg = b"OK" + self.region_id.encode()
        fds = array.array("i", [region.ro_fd])
        await conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        self.fds_sent += 1

    def stats(self) -> dict[str, Any]:
        return {"locates": self.locates, "located": self.located, "fds_sent": self.fds_sent,
                "rdma": self.rdma_enabled, "rdma_qps": self.rdma_qps, "rdma_error": self._rdma_error}


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:
        pass
