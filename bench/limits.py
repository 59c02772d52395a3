"""What this machine allows: memcpy bandwidth and raw Python loopback TCP bandwidth.

These are the ceilings the store is compared against: a GET cannot beat one
copy through the kernel's loopback, and a copy cannot beat memcpy.

Run alone: ``python -m bench.limits [--quick]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

MiB = 1 << 20


@dataclass
class LimitRun:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


class CopyBuffers:
    """``n_bufs`` source and destination buffers of ``buf_size`` (256 MiB each by default: > LLC)."""

    def __init__(self, buf_size: int = 4 * MiB, n_bufs: int = 64) -> None:
        self.buf_size = buf_size
        self.n_bufs = n_bufs
        # np.full writes every page (np.zeros would map them lazily and time the page faults)
        self.src = np.full((n_bufs, buf_size), 1, dtype=np.uint8)
        self.dst = np.full((n_bufs, buf_size), 2, dtype=np.uint8)
        np.copyto(self.dst, self.src)  # one warm pass


def memcpy_once(bufs: CopyBuffers, nbytes_total: int) -> LimitRun:
    """numpy copies of 4 MiB buffers, rotating over all of them so that little is cache-hot."""
    nb = bufs.n_bufs
    n = max(nb, nbytes_total // bufs.buf_size)
    src, dst = bufs.src, bufs.dst
    t0 = time.perf_counter()
    for i in range(n):
        np.copyto(dst[i % nb], src[(i * 7 + 3) % nb])
    dt = time.perf_counter() - t0
    return LimitRun(n * bufs.buf_size, dt)


def _tcp_receiver(port: int, msg_size: int, n_msgs: int, ack_each: bool) -> None:
    """Child process: receive ``n_msgs`` messages of ``msg_size`` into one preallocated buffer."""
    buf = bytearray(msg_size)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n_msgs):
            got = 0
            while got < msg_size:
                n = s.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
            if ack_each:
                s.sendall(b"k")
        if not ack_each:
            s.sendall(b"k")


def tcp_once(nbytes_total: int, msg_size: int = 4 * MiB, ack_each: bool = False) -> LimitRun:
    """Sender (this process) ``sendall``s a memoryview; receiver (another process) ``recv_into``s.

    ``ack_each=False``: streaming, one ack at the end. ``ack_each=True``: request/response-like,
    each message is acknowledged before the next is sent (what one synchronous GET looks like).
    """
    n_msgs = max(4, nbytes_total // msg_size)
    payload = memoryview(np.random.default_rng(0).integers(0, 256, msg_size, dtype=np.uint8).tobytes())
    ctx = mp.get_context("spawn")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        child = ctx.Process(target=_tcp_receiver, args=(port, msg_size, n_msgs, ack_each), daemon=True)
        child.start()
        lsock.settimeout(60)
        conn, _ = lsock.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ack = bytearray(1)
        t0 = time.perf_counter()
        for _ in range(n_msgs):
            conn.sendall(payload)
            if ack_each and conn.recv_into(ack) != 1:
                raise ConnectionError("receiver closed early")
        if not ack_each and conn.recv_into(ack) != 1:
            raise ConnectionError("receiver closed early")
        dt = time.perf_counter() - t0
    child.join(30)
    return LimitRun(n_msgs * msg_size, dt)


def _summary(runs: list[LimitRun], **extra: object) -> dict[str, object]:
    med = statistics.median(r.gbps for r in runs)
    return {"gbps": med, "runs": [asdict(r) | {"gbps": r.gbps} for r in runs], **extra}


def measure_limits(quick: bool = False, repeats: int = 3) -> dict[str, dict[str, object]]:
    copy_total = (256 if quick else 2048) * MiB
    tcp_total = (256 if quick else 2048) * MiB
    pingpong_total = (128 if quick else 1024) * MiB
    bufs = CopyBuffers()
    copy_runs = [memcpy_once(bufs, copy_total) for _ in range(repeats)]
    del bufs
    tcp_once(64 * MiB)  # warm-up (process spawn, socket buffers), not counted
    return {
        "memcpy": _summary(
            copy_runs,
            what="numpy.copyto of 4 MiB buffers rotating over 64 src + 64 dst buffers (256 MiB each)",
        ),
        "tcp_stream": _summary(
            [tcp_once(tcp_total) for _ in range(repeats)],
            what="loopback TCP, 4 MiB messages, sendall(memoryview) -> recv_into(preallocated), "
            "one ack at the end (two processes)",
        ),
        "tcp_pingpong": _summary(
            [tcp_once(pingpong_total, ack_each=True) for _ in range(repeats)],
            what="loopback TCP, 4 MiB message then 1-byte ack, one at a time (a synchronous GET's floor)",
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for name, res in measure_limits(args.quick).items():
        runs = ", ".join(f"{r['gbps']:.2f}" for r in res["runs"])  # type: ignore[attr-defined]
        print(f"{name:14s} {res['gbps']:6.2f} GB/s  (runs: {runs})")


if __name__ == "__main__":
    main()
