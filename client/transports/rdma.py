"""RDMA transport (pyverbs): RDMA READs of the node's region into a registered staging buffer.

One RC queue pair per (client, node), set up through the TCP connection
(LOCATE ``do="rdma"``). A read of many values posts one READ per value (or
per piece of a value larger than the staging buffer) before polling, then
copies the staging buffer into the callers' buffers. ``read`` is a generator
that yields whenever it has to wait for completions (``base.py``), so the
trio client and the blocking client drive the same code. Any failure raises
``RdmaError`` and marks the channel broken; the core falls back to TCP.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Generator
from typing import Any

from memkv.client.transports.base import ReadRequest
from memkv.protocol.checksum import checksum
from memkv.transport import Verbs, buffer_address

STAGE_BYTES = int(os.environ.get("MEMKV_RDMA_STAGE", str(16 << 20)))
SQ_DEPTH = 64
COMPLETION_TIMEOUT_S = 10.0


class RdmaError(Exception):
    pass


class RdmaChannel:
    """A ``OneSidedTransport`` (``base.py``): one queue pair to one node's region."""

    kind = "rdma"
    waits = True

    def __init__(self, stage_bytes: int = STAGE_BYTES) -> None:
        import pyverbs.enums as e
        from pyverbs.mr import MR

        self.verbs = Verbs(cq_depth=2 * SQ_DEPTH)
        try:
            self.qp = self.verbs.make_qp(depth=SQ_DEPTH)
            self.stage = mmap.mmap(-1, stage_bytes)
            self.stage_bytes = stage_bytes
            self.mr = MR(self.verbs.pd, stage_bytes, e.IBV_ACCESS_LOCAL_WRITE, address=buffer_address(self.stage))
        except BaseException:
            self.verbs.close()
            raise
        self.view = memoryview(self.stage)
        self.lock = threading.Lock()
        self.broken = False
        self.region_id = ""
        self.rkey = 0
        self.raddr = 0
        self.size = 0
        self._wr = 0
        self.reads = 0
        self.bytes = 0

    def hello(self) -> dict[str, Any]:
        return {"qpn": self.qp.qp_num, "gid": str(self.verbs.gid), "mtu": int(self.verbs.mtu)}

    def connect(self, reply: dict[str, Any], region_id: str, size: int) -> None:
        self.verbs.connect(self.qp, reply["gid"], int(reply["qpn"]), int(reply.get("mtu") or 0) or None)
        self.rkey = int(reply["rkey"])
        self.raddr = int(reply["addr"])
        self.region_id = region_id
        self.size = size

    def _rounds(self, reqs: list[ReadRequest]) -> list[list[ReadRequest]]:
        """Pieces (remote offset, length, destination) packed into rounds that fit the stage and the SQ."""
        rounds: list[list[ReadRequest]] = [[]]
        used = 0
        for off, n, dest, _sum in reqs:
            done = 0
            while done < n:
                piece = min(n - done, self.stage_bytes)
                if used + piece > self.stage_bytes or len(rounds[-1]) >= SQ_DEPTH:
                    rounds.append([])
                    used = 0
                rounds[-1].append((off + done, piece, dest[done:done + piece], False))
                used += piece
                done += piece
        return [r for r in rounds if r]

    def announcer(self, base: int) -> None:
        """An RDMA reader cannot announce its reads (it only reads the node's memory): the node keeps
        freed extents for the whole quarantine bound while it is connected."""
        return None

    def read(self, reqs: list[ReadRequest]) -> Generator[None, None, list[int]]:
        """RDMA READ each ``(offset, length, dest, sum)`` of the node's region into ``dest``, in order (one
        queue pair carries its READs out in order); the checksums asked for.

        One reader at a time per queue pair (tasks and threads share a client): a
        second one waits, yielding. A read abandoned half-way (its task cancelled)
        may leave completions in flight: the channel is then never used again."""
        while not self.lock.acquire(blocking=False):
            yield
        try:
            yield from self._read(reqs)
        except BaseException:
            self.broken = True
            raise
        finally:
            self.lock.release()
        return [checksum(dest[:n]) if want else 0 for _off, n, dest, want in reqs]

    def _read(self, reqs: list[ReadRequest]) -> Generator[None, None, None]:
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        if self.broken:
            raise RdmaError("channel broken")
        for rnd in self._rounds(reqs):
            pos = 0
            slots: list[tuple[int, int, memoryview]] = []
            try:
                for off, n, dest, _sum in rnd:
                    if off < 0 or off + n > self.size:
                        raise RdmaError("read outside the region")
                    self._wr += 1
                    sge = SGE(self.mr.buf + pos, n, self.mr.lkey)
                    wr = SendWR(wr_id=self._wr, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[sge],
                                send_flags=e.IBV_SEND_SIGNALED)
                    wr.set_wr_rdma(self.rkey, self.raddr + off)
                    self.qp.post_send(wr)
                    slots.append((pos, n, dest))
                    pos += n
            except RdmaError:
                self.broken = True
                raise
            except Exception as exc:
                self.broken = True
                raise RdmaError(f"post_send failed: {exc}") from exc
            left = len(slots)
            deadline = time.monotonic() + COMPLETION_TIMEOUT_S
            while left:
                try:
                    npolled, wcs = self.verbs.cq.poll(min(left, 32))
                except Exception as exc:
                    self.broken = True
                    raise RdmaError(f"poll failed: {exc}") from exc
                for wc in wcs[:npolled]:
                    if wc.status != e.IBV_WC_SUCCESS:
                        self.broken = True
                        raise RdmaError(f"RDMA READ completion status {wc.status}")
                left -= npolled
                if left:
                    if time.monotonic() > deadline:
                        self.broken = True
                        raise RdmaError("RDMA READ timed out")
                    yield
            view = self.view
            for pos, n, dest in slots:
                dest[:n] = view[pos:pos + n]
                self.bytes += n
            self.reads += len(slots)

    def close(self) -> None:
        try:
            self.mr.close()
        except Exception:
            pass
        try:
            self.qp.close()
        except Exception:
            pass
        self.verbs.close()
        try:
            self.view.release()
            self.stage.close()
        except (BufferError, ValueError):
            pass
