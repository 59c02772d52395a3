"""Server side of one-sided reads: the client-readable index, the shared-memory
hand-off and the RDMA responder.

Readers find values themselves in the index the store keeps at the end of its
region (memkv/engine/readable_index.py, format memkv/protocol/index_format.py):
a GET over shared memory or RDMA sends nothing to the node. The node only
answers set-up and bookkeeping, on one opcode, ``Op.LOCATE``, with a ``do`` field:

* ``do="info"``: the node's host identity, region id and size, where the index
  is (``ix``: base offset, slots), the quarantine bound readers must finish
  within (``valid``), the *tags* of the namespaces this session may read
  (``tags``: namespace -> u32; entries of other tags are not this session's),
  which of those namespaces are overwritable (``ow``: in a cluster their
  replicas may disagree, so readers compare every replica's version),
  and, where one-sided reads are allowed for this session, the abstract Unix
  socket that hands out the region with a one-time ticket, and whether RDMA is
  served. The first such request starts the index (``Store.open_readable_index``).
* ``do="rdma"``: ``{"qpn", "gid", "mtu"}`` of the client's RC queue pair ->
  the node's QP number, GID, the region MR's ``rkey`` and address. The node's
  QP lives as long as the TCP connection's session.
* ``do="touch"``: ``{"t": [slot, seq, slot, seq, ...]}``: values a reader read
  without asking, batched (``Store.touch``: hits and the eviction policy see
  them). A pair whose slot changed since (another seq) or whose tag the session
  may not read is ignored.

Shared memory. The region's file is unlinked right after the node maps it
(``Region.detach_file``), so a SIGKILLed node leaves nothing in /dev/shm. A
same-host client gets a read-only file descriptor of the region through an
abstract Unix socket (no file either; it vanishes with the process) with
SCM_RIGHTS, after presenting a ticket obtained over its (authenticated) TCP
connection, and maps it read-only; with it, a writable descriptor of the
reader table and the number of its own slot there, in which it announces its
reads (memkv/engine/readers.py: freed extents come back as soon as no read
that may have found them is going on). An RDMA reader cannot announce: while
one is connected, freed extents wait out the whole quarantine.

Tenants. A region mapping (or the region MR) shows every value of every
tenant: whoever maps it can read every byte, whatever the tags say. So when
tenants are configured one-sided reads are off unless the node config sets
``onesided_tenants = true`` (tenants trusted to that extent); each session is
then given the tags of the namespaces it may read only (tenant-scoped ones:
its own scope), and the client library reads no other entries -- isolation
between honest clients, not against a hostile process. Without that setting
every read goes over TCP, where grants apply per request.
"""

from __future__ import annotations

import array
import logging
import os
import secrets
import socket
import struct
import weakref
from typing import Any

import trio

from memkv.engine.readers import ReaderTable
from memkv.engine.store import Store
from memkv.errors import InvalidArgument, NodeUnavailable
from memkv.protocol import codec as c
from memkv.protocol.index_format import FORMAT_VERSION, HEARTBEAT_S
from memkv.protocol.opcodes import Op
from memkv.server.binary import Reply
from memkv.server.extension import Extension, Operation
from memkv.server.requests import LOGIN, Access, Call, Request
from memkv.server.session import Session
from memkv.transport import host_identity, rdma_devices

log = logging.getLogger("memkv.onesided")

TICKET_TTL_S = 30.0
MAX_TOUCHES = 65536  # (slot, seq) pairs per touch request
_CRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


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
        self.touches = 0
        self.fds_sent = 0
        self.rdma_qps = 0
        # The hand-off socket listens from construction on, before the node's TCP port does: a
        # client told its name in a LOCATE reply must never find it not yet bound (it would read
        # over TCP for good). serve_fds accepts on it.
        self._handoff: socket.socket | None = None
        if store.region.ro_fd is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.sock_name)
            sock.listen(64)
            sock.setblocking(False)
            self._handoff = sock

    def extension(self) -> Extension:
        """LOCATE (``do`` = locate | info | rdma) and the task handing the region to same-host clients."""
        kinds: dict[str, tuple[str, Access]] = {"info": ("LOCATE_INFO", LOGIN), "rdma": ("LOCATE_RDMA", LOGIN),
                                                "touch": ("LOCATE_TOUCH", LOGIN)}

        def decode(meta: dict[str, Any], limits: c.Limits, payload_len: int) -> Request:
            do = meta.get("do")
            kind = kinds.get(do) if isinstance(do, str) else None
            if kind is None:
                raise InvalidArgument(f"LOCATE: unknown 'do' {do!r} (info | rdma | touch)")
            return Call(kind[0], kind[1], meta)

        return Extension("onesided", operations=(
            Operation("LOCATE_INFO", LOGIN, self.info, opcode=int(Op.LOCATE), decode=decode),
            Operation("LOCATE_RDMA", LOGIN, self.rdma_connect),
            Operation("LOCATE_TOUCH", LOGIN, self.touch),
        ), background=(self.serve_fds, self.heartbeat), stats=self.stats)

    # -- policy
    def allowed(self, session: Session) -> bool:
        if self.store.readable is None:
            return False  # no index (no quarantine: nothing would keep a reader's bytes in place)
        if session.auth_required:
            return self.tenants_trusted and session.authenticated
        return True

    def _readable_tags(self, session: Session) -> dict[int, str]:
        """tag -> namespace, for the namespaces this session may read (tenant-scoped ones: its own scope)."""
        index = self.store.readable
        assert index is not None
        out = {}
        for name, pol in self.store.namespaces.items():
            if session.may(name, "r"):
                out[index.tag_of(name, session.tenant if pol.tenant_scoped else "")] = name
        return out

    # -- the operations
    def info(self, session: Session, req: Call) -> Reply:
        ok = self.allowed(session)
        out: dict[str, Any] = {"host": host_identity(), "r": self.region_id, "size": self.store.region.size,
                               "valid": self.store.quarantine_s, "ok": ok, "rdma": ok and self.rdma_enabled}
        if ok:
            index = self.store.open_readable_index()
            assert index is not None
            out["ix"] = {"base": index.base, "slots": index.slots, "v": FORMAT_VERSION}
            out["tags"] = {name: tag for tag, name in self._readable_tags(session).items()}
            # (a GET reply marks these "ow"; a reader that never sends a GET learns it here)
            out["ow"] = sorted(name for name in out["tags"] if self.store.namespaces[name].overwrite)
        if ok and self._handoff is not None:
            ticket = secrets.token_bytes(16)
            now = self.clock.monotonic()
            self._tickets = {t: exp for t, exp in self._tickets.items() if exp > now}
            self._tickets[ticket] = now + TICKET_TTL_S
            out["sock"] = self.sock_name.encode()
            out["ticket"] = ticket
        return Reply(out)

    def touch(self, session: Session, req: Call) -> Reply:
        index = self.store.readable
        pairs = req.meta.get("t")
        if not isinstance(pairs, list) or len(pairs) % 2 or len(pairs) > 2 * MAX_TOUCHES:
            raise InvalidArgument(f"LOCATE touch: 't' must be a list of at most {MAX_TOUCHES} (slot, seq) pairs")
        if index is None or not self.allowed(session):
            return Reply({"n": 0})
        readable = self._readable_tags(session)
        n = 0
        for i in range(0, len(pairs), 2):
            slot, seq = pairs[i], pairs[i + 1]
            if type(slot) is not int or type(seq) is not int:
                raise InvalidArgument("LOCATE touch: slots and seqs are integers")
            e = index.entry_at(slot, seq)
            if e is not None and index.tag_at(slot) in readable:
                self.store.touch(e)
                n += 1
        self.touches += n
        return Reply({"n": n})

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
        # the QP lives as long as the connection (its session); while it does, freed extents wait out
        # the whole quarantine: an RDMA reader cannot announce its reads (memkv/engine/readers.py)
        readers = self.store.readers
        assert readers is not None  # allowed() checked the index exists
        readers.hold()
        weakref.finalize(session, _close_qp, qp, readers)
        self.rdma_qps += 1
        return Reply(reply)

    async def heartbeat(self) -> None:
        """Keep the index's heartbeat going: readers trust the index only while it moves
        (memkv/protocol/index_format.py), so a hung or dead node stops being read one-sided."""
        index = self.store.readable
        if index is None:
            return
        while True:
            index.heartbeat()
            await self.clock.sleep(HEARTBEAT_S)

    # -- the shared-memory hand-off: an abstract Unix socket, SCM_RIGHTS
    async def serve_fds(self) -> None:
        region = self.store.region
        if self._handoff is None:
            return
        sock = trio.socket.from_stdlib_socket(self._handoff)
        try:
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
        # the reader's slot in the reader table (memkv/engine/readers.py), owned by its process
        pid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[0]
        readers = self.store.readers
        slot = readers.claim(pid) if readers is not None else None
        if slot is None:
            await conn.send(b"NO")  # every slot held by a live reader: this one reads over TCP
            return
        msg = b"OK" + self.region_id.encode() + b"/" + str(slot).encode()
        fds = array.array("i", [region.ro_fd, readers.fd])
        await conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        self.fds_sent += 1

    def stats(self) -> dict[str, Any]:
        return {"touches": self.touches, "fds_sent": self.fds_sent, "index": self.store.readable.stats()
                if self.store.readable is not None else None,
                "rdma": self.rdma_enabled, "rdma_qps": self.rdma_qps, "rdma_error": self._rdma_error}


def _close_qp(qp: Any, readers: ReaderTable) -> None:
    readers.unhold()
    _close_quietly(qp)


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:
        pass
