"""Shared-memory transport: the node's region, mapped read-only by a client on the same host.

The node hands a read-only descriptor of its (unlinked) region file over an
abstract Unix socket (SCM_RIGHTS) to a client that shows a ticket it got over
its TCP connection; the client maps it read-only and copies values itself. No
node work on the data path: one memcpy from the mapping into the caller's
buffer, hashed chunk by chunk while the bytes are still in cache.

With the region come a writable descriptor of the node's reader table and the
number of this reader's slot in it: the core announces each read there
(``announcer``; memkv/protocol/index_format.py ``ReaderSlot``), which lets the
node reuse freed extents as soon as no read is going on, instead of after the
whole quarantine bound.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Generator

import xxhash

from memkv.client.transports.base import ReadRequest
from memkv.errors import NodeUnavailable
from memkv.protocol.index_format import ReaderSlot

_xxh3 = xxhash.xxh3_64_intdigest
CHUNK = 256 * 1024  # copy-then-hash unit: stays in L2 between the copy and the hash
POPULATE_MAX = int(os.environ.get("MEMKV_SHM_POPULATE_MAX", str(4 << 30)))


class ShmRegion:
    """A ``OneSidedTransport`` (``base.py``) over a read-only mapping of the node's region."""

    kind = "shm"
    waits = False  # a copy never waits: the core may call ``copy`` directly

    def __init__(self, sock_name: bytes, ticket: bytes, region_id: str, size: int, timeout: float = 2.0) -> None:
        name = sock_name.decode() if isinstance(sock_name, bytes) else sock_name
        fd, table_fd, self.slot = _receive_fds(name, ticket, region_id, timeout)
        try:
            self._table = mmap.mmap(table_fd, 0)  # the reader table: small, shared writable
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.close(table_fd)
        try:
            st = os.fstat(fd)
            if st.st_size < size:
                raise NodeUnavailable(f"region descriptor is {st.st_size} bytes, expected {size}")
            # Fill the page tables now (one pass at connect) rather than with a minor fault
            # per 4 KiB page on first reads; skipped for huge regions (page-table memory).
            flags = mmap.MAP_SHARED
            if size <= POPULATE_MAX:
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self._mmap = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.view = memoryview(self._mmap)
        self.region_id = region_id
        self.size = size
        self.broken = False
        self._announcer: ReaderSlot | None = None

    def announcer(self, base: int) -> ReaderSlot:
        """This reader's slot, for an index whose header is at ``base`` (one per transport)."""
        if self._announcer is None:
            self._announcer = ReaderSlot(memoryview(self._table), self.slot, self.view, base)
        return self._announcer

    @classmethod
    def open(cls, info: dict) -> ShmRegion:
        """From a LOCATE ``do="info"`` reply (blocking: the Unix-socket hand-off)."""
        return cls(info["sock"], info["ticket"], info["r"], int(info["size"]))

    def read(self, reqs: list[ReadRequest]) -> Generator[None, None, list[int]]:
        """Copy every request, in order; a memory copy never waits, so this generator never yields."""
        return self.copy(reqs)
        yield  # noqa: B901 - a generator, the shape of every transport's read

    def copy(self, reqs: list[ReadRequest]) -> list[int]:
        """``read`` without the generator (the core's shortcut for a transport that never waits)."""
        size, src = self.size, self.view
        out = []
        for off, n, dest, want in reqs:
            if off < 0 or off + n > size:
                raise NodeUnavailable("read outside the region")
            if want:
                out.append(self.copy_checksummed(off, n, dest))
            else:
                dest[:n] = src[off:off + n]
                out.append(0)
        return out

    def copy_checksummed(self, offset: int, length: int, dest: memoryview) -> int:
        """Copy ``length`` bytes at ``offset`` of the region into ``dest``; the xxh3 checksum of what was copied.

        The copy goes in cache-sized chunks, each hashed right after it lands
        while it is still in cache: one pass over memory instead of two.
        """
        src = self.view
        if length <= CHUNK:
            dest[:length] = src[offset:offset + length]
            return _xxh3(dest[:length])
        h = xxhash.xxh3_64()
        for start in range(0, length, CHUNK):
            end = min(start + CHUNK, length)
            dest[start:end] = src[offset + start:offset + end]
            h.update(dest[start:end])
        return h.intdigest()

    def close(self) -> None:
        if self._announcer is not None:
            self._announcer.release()  # the node may give the slot to another reader
        try:
            self._table.close()
        except (BufferError, ValueError):
            pass
        try:
            self.view.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass  # a slice is still alive somewhere: unmapped when it goes


def _receive_fds(name: str, ticket: bytes, region_id: str, timeout: float) -> tuple[int, int, int]:
    """The region's descriptor, the reader table's, and this reader's slot number."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(name)
            s.sendall(ticket)
            fds = array.array("i")
            msg, anc, _flags, _addr = s.recvmsg(64, socket.CMSG_SPACE(2 * fds.itemsize))
        except OSError as exc:
            raise NodeUnavailable(f"no shared-memory hand-off: {exc}") from exc
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        answer, _, slot = msg[2:].decode(errors="replace").partition("/")
        if not msg.startswith(b"OK") or len(fds) != 2 or answer != region_id or not slot.isdigit():
            for fd in fds:
                os.close(fd)
            if msg.startswith(b"OK") and answer != region_id:
                raise NodeUnavailable("shared-memory hand-off: another region answered")
            raise NodeUnavailable(f"shared-memory hand-off refused: {msg[:2]!r}")
        return fds[0], fds[1], int(slot)
