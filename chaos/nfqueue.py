"""Packet delay, jitter, loss and reordering in user space, through the kernel's NFQUEUE.

What ``tc qdisc ... netem`` does, for a kernel without it (this one: CONFIG_NET_SCH_NETEM
is not set and there are no loadable modules, so ``tc qdisc add dev lo root netem delay
50ms`` answers "Specified qdisc kind is unknown"). iptables rules (:mod:`chaos.netfault`)
put a mark on every packet of an impaired link and send marked packets to NFQUEUE; this
process receives each one's id over netfilter's netlink socket (``nfnetlink_queue``, built
into the kernel), and gives the kernel its verdict later: ACCEPT after the link's delay
(+/- jitter; a ``reorder`` fraction goes at once, overtaking the delayed ones), or DROP
with probability ``loss``. The packets themselves never leave the kernel (copy mode
META: only the id and the mark come up), so TCP sees real delay, loss and reordering and
does its own retransmissions.

    python -m chaos.nfqueue --queue 7 --seed 1     # then JSON lines on stdin:
    {"mark": 3, "delay_ms": 40, "jitter_ms": 20, "loss": 0.02, "reorder": 0.1}
    {"mark": 3}                                    # the link is healed: no delay, no loss

Prints one JSON line of counters per ``{"stats": true}`` line and when stdin closes.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK = 1, 2, 3
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _msg(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def parse_attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4:
            break
        out[kind & 0x7FFF] = data[off + 4:off + n]
        off += (n + 3) & ~3
    return out


@dataclass
class Link:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    reorder: float = 0.0


class Queue:
    """One NFQUEUE number, bound on a netlink socket; verdicts scheduled on a heap."""

    def __init__(self, num: int, seed: int) -> None:
        self.num = num
        self.rnd = random.Random(seed)
        self.links: dict[int, Link] = {}
        self.heap: list[tuple[float, int, int, int]] = []  # (due, seq, packet id, verdict)
        self.seq = 0
        self.stats = {"packets": 0, "delayed": 0, "dropped": 0, "reordered": 0, "unknown_mark": 0}
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", 65536)))
        # fail open: a full queue lets packets through rather than dropping them (loss is ours to choose)
        self._config(_attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN))
                     + _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)))

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_CONFIG, self.num, attrs, NLM_F_REQUEST | NLM_F_ACK, self.seq))
        data = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", data, 0)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, 16)
            if err:
                raise OSError(-err, f"nfqueue {self.num} config: {os.strerror(-err)}")

    def verdict(self, packet_id: int, verdict: int) -> None:
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))
        self.sock.send(_msg(NFQNL_MSG_VERDICT, self.num, attrs))

    def on_packet(self, packet_id: int, mark: int, now: float) -> None:
        self.stats["packets"] += 1
        link = self.links.get(mark)
        if link is None:  # healed meanwhile (the rule goes a moment later): straight through
            self.stats["unknown_mark"] += 1
            self.verdict(packet_id, NF_ACCEPT)
            return
        if link.loss and self.rnd.random() < link.loss:
            self.stats["dropped"] += 1
            self.verdict(packet_id, NF_DROP)
            return
        if link.reorder and self.rnd.random() < link.reorder:
            self.stats["reordered"] += 1
            self.verdict(packet_id, NF_ACCEPT)
            return
        d = link.delay_ms + (self.rnd.uniform(-link.jitter_ms, link.jitter_ms) if link.jitter_ms else 0.0)
        if d <= 0:
            self.verdict(packet_id, NF_ACCEPT)
            return
        self.stats["delayed"] += 1
        self.seq += 1
        heapq.heappush(self.heap, (now + d / 1000.0, self.seq, packet_id, NF_ACCEPT))

    def release_due(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            _, _, pid, v = heapq.heappop(self.heap)
            self.verdict(pid, v)

    def receive(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except OSError as exc:  # ENOBUFS: the kernel could not hand us some packets (it let them pass)
            self.stats["overruns"] = self.stats.get("overruns", 0) + 1
            if exc.errno != errno.ENOBUFS:
                raise
            return
        now = time.monotonic()
        off = 0
        while off + 16 <= len(data):
            n, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
            if n < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = parse_attrs(data, off + 20, off + n)
                hdr = attrs.get(NFQA_PACKET_HDR)
                if hdr is not None:
                    (pid,) = struct.unpack_from(">I", hdr, 0)
                    mark = struct.unpack(">I", attrs[NFQA_MARK])[0] if NFQA_MARK in attrs else 0
                    self.on_packet(pid, mark, now)
            off += (n + 3) & ~3

    def flush(self) -> None:
        """Every held packet goes now (on exit: nothing stays queued in the kernel)."""
        while self.heap:
            _, _, pid, v = heapq.heappop(self.heap)
            self.verdict(pid, v)


def control(q: Queue, line: str, out: object) -> None:
    msg = json.loads(line)
    if msg.get("stats"):
        print(json.dumps(q.stats), file=out, flush=True)  # type: ignore[arg-type]
        return
    mark = int(msg["mark"])
    params = {k: float(msg[k]) for k in ("delay_ms", "jitter_ms", "loss", "reorder") if k in msg}
    if params and any(params.values()):
        q.links[mark] = Link(**params)
    else:
        q.links.pop(mark, None)
    print(json.dumps({"ok": mark}), file=out, flush=True)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.nfqueue", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = Queue(args.queue, args.seed)
    print(json.dumps({"ready": args.queue}), flush=True)
    stdin = sys.stdin.fileno()
    buf = b""
    try:
        while True:
            timeout = max(0.0, q.heap[0][0] - time.monotonic()) if q.heap else 1.0
            ready, _, _ = select.select([q.sock, stdin], [], [], timeout)
            if q.sock in ready:
                q.receive()
            if stdin in ready:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    if line.strip():
                        control(q, line.decode(), sys.stdout)
            q.release_due(time.monotonic())
    finally:
        q.flush()
        print(json.dumps(q.stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
