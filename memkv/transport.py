"""Pieces of the one-sided transports shared by the node and the client (docs/transports.md).

* ``host_identity()`` — who may use shared memory: two processes with the same
  boot id and the same network namespace can reach each other's abstract Unix
  sockets, which is how a node hands its region to a same-host client.
* ``buffer_address()`` — the address of a writable buffer (for ``ibv_reg_mr``).
* ``verbs`` — lazy access to pyverbs (optional: Debian's python3-pyverbs); the
  helpers below open a device, pick the RoCEv2 GID and bring an RC queue pair
  to RTS. Nothing here imports pyverbs until it is used.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
from typing import Any

PORT = 1  # HCA port


@functools.lru_cache(maxsize=1)
def host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{boot}/{netns}"


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a writable buffer (mmap, bytearray)."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c  # releases the buffer export at once


@functools.lru_cache(maxsize=1)
def pyverbs_available() -> bool:
    try:
        import pyverbs.device  # noqa: F401
    except Exception:
        return False
    return True


def rdma_devices() -> list[str]:
    """Names of the RDMA devices pyverbs sees ([] without pyverbs or devices)."""
    if not pyverbs_available():
        return []
    try:
        import pyverbs.device as d

        return [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in d.get_device_list()]
    except Exception:
        return []


def pick_gid(ctx: Any) -> tuple[int, Any]:
    """(index, GID) of the IPv4-mapped (RoCEv2) GID of port 1, else the first valid one."""
    tbl = ctx.query_port(PORT).gid_tbl_len
    first = None
    for i in range(tbl):
        try:
            g = ctx.query_gid(PORT, i)
        except Exception:
            continue
        s = str(g)
        if s == "0000:0000:0000:0000:0000:0000:0000:0000":
            continue
        if first is None:
            first = (i, g)
        if s.startswith("0000:0000:0000:0000:0000:ffff:"):
            return i, g
    if first is None:
        raise RuntimeError("no valid GID on port 1")
    return first


class Verbs:
    """One device context: PD, CQ and the port facts, for either side."""

    def __init__(self, device: str | None = None, cq_depth: int = 256) -> None:
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.pd import PD

        names = rdma_devices()
        if not names:
            raise RuntimeError("no RDMA device")
        self.device = device or os.environ.get("MEMKV_RDMA_DEVICE") or names[0]
        self.ctx = Context(name=self.device)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, cq_depth, None, None, 0)
        self.gid_index, self.gid = pick_gid(self.ctx)
        self.mtu = self.ctx.query_port(PORT).active_mtu

    def make_qp(self, depth: int = 64) -> Any:
        import pyverbs.enums as e
        from pyverbs.qp import QP, QPCap, QPInitAttr

        cap = QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        return QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))

    def connect(self, qp: Any, remote_gid: str, remote_qpn: int, mtu: int | None = None) -> None:
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        attr = QPAttr()
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
        attr.port_num = PORT
        attr.pkey_index = 0
        attr.path_mtu = min(int(self.mtu), int(mtu)) if mtu else self.mtu
        attr.dest_qp_num = remote_qpn
        attr.rq_psn = 0
        attr.sq_psn = 0
        attr.max_dest_rd_atomic = 16
        attr.max_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.ah_attr = AHAttr(port_num=PORT, is_global=1,
                              gr=GlobalRoute(dgid=GID(remote_gid), sgid_index=self.gid_index))
        qp.to_rts(attr)

    def close(self) -> None:
        for obj in (self.cq, self.pd, self.ctx):
            try:
                obj.close()
            except Exception:
                pass
