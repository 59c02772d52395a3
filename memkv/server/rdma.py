"""The node's RDMA responder: its region registered as one memory region.

Clients set up queue pairs through their TCP connection (LOCATE ``do="rdma"``)
and then post RDMA READs against ``rkey``/``addr``; the node's CPU takes no
part in those reads. Needs pyverbs (Debian's python3-pyverbs) and a device
(a NIC, or Soft-RoCE ``rdma_rxe``).
"""

from __future__ import annotations

from typing import Any

from memkv.engine.region import Region
from memkv.transport import Verbs, buffer_address


class RdmaResponder:
    def __init__(self, region: Region, device: str | None = None) -> None:
        import pyverbs.enums as e
        from pyverbs.mr import MR

        self.verbs = Verbs(device, cq_depth=16)
        self.addr = buffer_address(region.mmap)
        try:
            self.mr = MR(self.verbs.pd, region.size, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ,
                         address=self.addr)
        except BaseException:
            self.verbs.close()
            raise

    def accept(self, gid: str, qpn: int, mtu: int | None) -> tuple[Any, dict[str, Any]]:
        qp = self.verbs.make_qp(depth=4)
        try:
            self.verbs.connect(qp, gid, qpn, mtu)
        except BaseException:
            qp.close()
            raise
        return qp, {"qpn": qp.qp_num, "gid": str(self.verbs.gid), "rkey": self.mr.rkey, "addr": self.addr,
                    "mtu": int(self.verbs.mtu), "dev": self.verbs.device}

    def close(self) -> None:
        try:
            self.mr.close()
        finally:
            self.verbs.close()
