"""Who may still be copying a freed extent: the node's side of the readers' announcements.

The allocator's quarantine keeps a freed extent away from new values for a
fixed bound (``quarantine_s``), because a one-sided reader that found the
value's entry just before it was withdrawn may still be copying its bytes. A
fixed bound makes sustained writes into a full region wait for it: every PUT
evicts, and the evicted bytes come back only ``quarantine_s`` later, so writes
run at ``room / quarantine_s`` (docs/benchmarks.md, the workers' PUT-full point).

Epoch-based reclamation (as in RCU and Fraser's EBR) ends the wait when no read
is going on. The node keeps a *grace epoch* ``G`` in the index header
(memkv/protocol/index_format.py) and a table of reader slots in a small shared
file that same-host readers map writable (``fd``). A reader

1. stores ``G`` (as it reads it) in its slot,
2. reads windows, values and the entries again,
3. stores ``IDLE``.

The node tags an extent freed after its entry was withdrawn with the current
``G`` (``tag``) and, when it wants room (``safe_below``), moves ``G`` on and
scans the slots: every extent tagged below the smallest epoch a slot holds is
free to reuse. A reader that announced ``e`` read ``G`` after every extent
tagged below ``e`` had been withdrawn, so it cannot have found those; a reader
idle in its slot has no read going. A slot whose epoch ended more than
``quarantine_s`` ago is ignored: that reader stalled or died, and it refuses a
read that took that long anyway (client/core/onesided.py). So the fixed bound
is now only what a stalled reader costs.

Two things keep the bound whole. Readers that cannot announce -- RDMA readers
read the region without a slot -- are counted (``hold``/``unhold``) and while
any is attached ``tag`` returns None: extents go through the full quarantine.
And an extent is not reused within ``MIN_GRACE_S`` of its free even when the
slots say so: a reader's store into its slot can sit in its core's store buffer
while its next loads run (x86 orders stores after later loads); store buffers
drain in well under a microsecond.

A hostile same-host reader can write any slot: it can hold every extent for the
full bound (writes slow down to what they were without this), or clear another
reader's slot, which leaves that reader with the checks it always makes: the
value's checksum and the entry's re-read (one-sided reads are off for
untrusted tenants: memkv/server/onesided.py).
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Callable

from memkv.protocol import index_format as f

SLOTS = 1024  # announcing readers (shared-memory hand-offs alive at once) per node
MIN_GRACE_S = 0.001


class ReaderTable:
    """Reader slots (a shared file) and the grace epoch (in the index header at ``header_at``)."""

    def __init__(self, view: memoryview, header_at: int, *, monotonic: Callable[[], float], quarantine_s: float,
                 slots: int = SLOTS) -> None:
        self.slots = slots
        self.quarantine_s = quarantine_s
        self._mono = monotonic
        self._g = view[header_at + f.GRACE_EPOCH_OFF:header_at + f.GRACE_EPOCH_OFF + 8].cast("Q")
        self.epoch = 1
        self._g[0] = self.epoch
        self.fd = os.memfd_create("memkv-readers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, slots * f.READER_SLOT)
            self._mm = mmap.mmap(self.fd, slots * f.READER_SLOT)
        except BaseException:
            os.close(self.fd)
            raise
        self._tbl = memoryview(self._mm).cast("Q")
        self._stride = f.READER_SLOT // 8
        self._owners: dict[int, tuple[int, str]] = {}  # slot -> (pid, its start time): who claimed it
        self._claimed: list[int] = []  # slots to scan (those ever claimed and not known released)
        self._ended: deque[float] = deque()  # when epoch ``_first_ended + i`` ended, oldest first
        self._first_ended = 1
        self.unannounced = 0  # readers attached now that cannot announce (RDMA)
        self.bumps = 0
        self.claims = 0
        self.refusals = 0

    # -- readers coming and going
    def claim(self, pid: int) -> int | None:
        """A slot for a new same-host reader (process ``pid``), or None when every slot is taken by a
        live reader (it then reads over TCP)."""
        s = None
        if len(self._owners) < self.slots:
            s = next(i for i in range(self.slots) if i not in self._owners)
        else:
            for i, (opid, start) in self._owners.items():
                if self._tbl[i * self._stride] == f.RELEASED or not start or _start_time(opid) != start:
                    s = i  # released, or its process is gone
                    break
        if s is None:
            self.refusals += 1
            return None
        self._owners[s] = (pid, _start_time(pid))
        self._tbl[s * self._stride] = f.IDLE
        if s not in self._claimed:
            self._claimed.append(s)
        self.claims += 1
        return s

    def local_slot(self, region: memoryview, base: int) -> f.ReaderSlot | None:
        """A slot for a reader in the node's own process (a TCP connection's hot-read thread,
        memkv/server/hot_reads.py), which announces its reads through it exactly as a same-host
        client does; None when every slot is taken. ``ReaderSlot.release`` gives it back."""
        s = self.claim(os.getpid())
        if s is None:
            return None
        return f.ReaderSlot(memoryview(self._mm), s, region, base)

    def hold(self) -> None:
        """A reader that cannot announce its reads (RDMA) attached: full quarantine until ``unhold``."""
        self.unannounced += 1

    def unhold(self) -> None:
        self.unannounced -= 1

    # -- the allocator's side
    def tag(self) -> int | None:
        """The epoch to tag an extent freed now with (its entry already withdrawn); None: keep it for the
        whole bound (a reader that cannot announce is attached)."""
        return None if self.unannounced else self.epoch

    def safe_below(self, newest_tag: int) -> int:
        """Extents tagged below the returned epoch are copied by nobody (see the module doc). Moves the
        epoch on first when ``newest_tag`` is the current one, so that new reads do not hold them."""
        now = self._mono()
        if newest_tag >= self.epoch:
            self._ended.append(now)
            self.epoch += 1
            self._g[0] = self.epoch
            self.bumps += 1
        ended, bound = self._ended, self.quarantine_s
        while ended and ended[0] + bound < now:
            ended.popleft()
            self._first_ended += 1
        oldest = self.epoch + 1
        tbl, stride, first = self._tbl, self._stride, self._first_ended
        for s in self._claimed:
            v = tbl[s * stride]
            if v == f.IDLE or v >= oldest:  # idle, released (the largest u64), or not older
                continue
            if v < first:
                continue  # its epoch ended over the bound ago: a stalled or dead reader
            oldest = v
        return oldest

    def stats(self) -> dict[str, int]:
        tbl, stride = self._tbl, self._stride
        reading = sum(1 for s in self._claimed if tbl[s * stride] not in (f.IDLE, f.RELEASED))
        return {"epoch": self.epoch, "slots": len(self._owners), "reading": reading, "claims": self.claims,
                "refused": self.refusals, "unannounced": self.unannounced, "bumps": self.bumps}

    def close(self) -> None:
        try:
            self._tbl.release()
            self._g.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/pid/stat): a pid reused by another process differs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    return stat[stat.rfind(b")") + 2:].split()[19].decode()
