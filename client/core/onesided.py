"""One-sided reads (docs/transports.md): LOCATE, then copy the bytes yourself through a transport.

For a client whose transport is ``auto``, ``shm`` or ``rdma``, ``get``/
``get_into``/``get_many``/``get_many_into`` are this operation:

1. pick, once per node, a transport (``client/transports/``): shared memory
   when the node is on this host (same boot id and network namespace) and
   hands over its region; RDMA when pyverbs and a device are here and the node
   serves RDMA; else none (TCP);
2. ask each owner node for descriptors (``LOCATE``: offset, length, checksum,
   generation; the node leases the entries and quarantines their extents when
   freed) — one request per node for a whole batch; small values come back
   inline in that reply;
3. copy each value through the transport straight into the caller's buffer;
4. verify every value: its checksum, and that the copy finished within the
   descriptor's validity window (the node's quarantine: until then the extent
   cannot hold another generation's bytes). Whatever fails — a miss in the
   region, a mismatch, an RDMA error, a stale region — is read again over TCP
   in the same call, by the ordinary TCP operation (which reports corruption).

The transport is used only through its declared interface
(``client/transports/base.py``); setting one up (the Unix-socket hand-off,
queue-pair creation) is ``Blocking`` work for the executor. A read that needs
no request to the node at all — a client-readable index in the region, read
bucket first, then value — replaces step 2 here and uses the same ``read``
of region offsets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from memkv.client.buffers import byte_view, finish_bytes, new_bytes
from memkv.client.core import ops
from memkv.client.core.calls import SimpleCall
from memkv.client.core.dispatch import FAILOVER_ERRORS, call_node, gather
from memkv.client.core.requests import WAIT, Blocking, Op
from memkv.client.core.routing import Router, group_by_owner
from memkv.client.transports.base import OneSidedTransport
from memkv.client.url import NodeAddress
from memkv.errors import InvalidArgument, MemKVError, ProtocolError
from memkv.protocol.checksum import checksum
from memkv.protocol.codec import Frame
from memkv.protocol.opcodes import Op as Opcode
from memkv.transport import host_identity, pyverbs_available, rdma_devices

LEASE_S = 2.0
# Values up to this size come back inside the LOCATE reply: below it a second
# step (map + copy, or an RDMA READ) costs more than the bytes it saves.
INLINE_MAX = 128 * 1024
SAFETY = 0.5  # a copy must finish within this fraction of the descriptor's validity window


class LocateCall(SimpleCall):
    """LOCATE whose reply may carry small values inline, received into the caller's buffers."""

    def __init__(self, meta: dict[str, Any], dests: list[memoryview | None]) -> None:
        super().__init__(Opcode.LOCATE, meta)
        self.dests = dests
        self.inline: dict[int, tuple[memoryview, bytes | bytearray | None]] = {}  # position -> (view, own buffer)

    def destinations(self, frame: Frame) -> list[memoryview]:
        views: list[memoryview] = []
        self.inline = {}
        for j, d in enumerate(frame.meta.get("d") or []):
            if not (isinstance(d, list) and len(d) == 4 and d[0] == -1):
                continue
            n = int(d[1])
            want = self.dests[j] if j < len(self.dests) else None
            if want is not None and want.nbytes >= n:
                view, own = want[:n], None
            else:
                own, view = new_bytes(n)
            self.inline[j] = (view, own)
            views.append(view)
        return views

    def finish(self, frame: Frame, dests: list[memoryview]) -> Any:
        if not frame.payload_len:  # connections ask for destinations only when there are bytes
            self.destinations(frame)
        return frame.meta


def _open_shm(info: dict[str, Any]) -> OneSidedTransport | None:
    from memkv.client.transports.shm import ShmRegion

    try:
        return ShmRegion.open(info)
    except Exception:
        return None  # no hand-off (another mount namespace, a refusal): TCP


def _new_rdma_channel() -> Any:
    from memkv.client.transports.rdma import RdmaChannel

    try:
        return RdmaChannel()
    except Exception:
        return None


def _connect_rdma(ch: Any, reply: dict[str, Any], region_id: str, size: int) -> bool:
    try:
        ch.connect(reply, region_id, size)
        return True
    except Exception:
        _close(ch)
        return False


def _close(t: Any) -> None:
    try:
        t.close()
    except Exception:
        pass


class OneSidedReads:
    """Per client: the transport of each node, and counters of what reads did."""

    def __init__(self, mode: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in ("auto", "shm", "rdma"):
            raise InvalidArgument(f"no one-sided reads with transport {mode!r}")
        self.mode = mode
        self.clock = clock
        self.nodes: dict[NodeAddress, OneSidedTransport | None] = {}  # None: this node is read over TCP
        self._setting_up: set[NodeAddress] = set()
        self.counters = {"onesided": 0, "onesided_bytes": 0, "tcp": 0, "mismatch": 0, "rdma_errors": 0,
                         "locates": 0, "inline": 0}
        self.closed = False

    def transport_of(self, node: NodeAddress) -> str:
        t = self.nodes.get(node)
        return "tcp" if t is None else t.kind

    def close(self) -> None:
        self.closed = True
        nodes, self.nodes = self.nodes, {}
        for t in nodes.values():
            if t is not None:
                _close(t)

    def _forget(self, node: NodeAddress) -> None:
        t = self.nodes.pop(node, None)
        if t is not None:
            _close(t)

    # -- choosing a transport for a node
    def _setup(self, router: Router, node: NodeAddress) -> Op:
        if node in self._setting_up or self.closed:
            return
        self._setting_up.add(node)
        try:
            try:
                info = yield from call_node(router, node, SimpleCall(Opcode.LOCATE, {"do": "info"}))
            except ProtocolError:
                self.nodes[node] = None  # a node without one-sided reads
                return
            except MemKVError:
                return  # try again next time
            if not info.get("ok"):
                self.nodes[node] = None
                return
            t: Any = None
            if self.mode in ("auto", "shm") and info.get("host") == host_identity() and info.get("sock"):
                t = yield Blocking(_open_shm, info)
            if t is None and self.mode in ("auto", "rdma") and info.get("rdma") and pyverbs_available() \
                    and rdma_devices():
                t = yield from self._setup_rdma(router, node, info)
            if self.closed:
                if t is not None:
                    _close(t)
                return
            self.nodes[node] = t
        finally:
            self._setting_up.discard(node)

    def _setup_rdma(self, router: Router, node: NodeAddress, info: dict[str, Any]) -> Op:
        """A connected RDMA channel to ``node``, or None (then the node is read over TCP)."""
        ch = yield Blocking(_new_rdma_channel)
        if ch is None:
            return None
        try:
            reply = yield from call_node(router, node, SimpleCall(Opcode.LOCATE, {"do": "rdma", **ch.hello()}))
        except Exception:
            _close(ch)
            return None
        except BaseException:
            _close(ch)
            raise
        ok = yield Blocking(_connect_rdma, ch, reply, info["r"], int(info["size"]))
        return ch if ok else None

    # -- the read
    def read(self, router: Router, keys: list[Any], namespace: str, *, intos: list[Any] | None = None,
             single: bool = False, into: Any = None) -> Op:
        ks = [ops.as_key(k) for k in keys]
        if intos is not None and len(intos) != len(ks):
            raise InvalidArgument("get_many_into needs one buffer per key")
        if not ks:
            return []
        if single:
            dests_in = [byte_view(into, writable=True) if into is not None else None]
        elif intos is not None:
            dests_in = [byte_view(b, writable=True) for b in intos]
        else:
            dests_in = [None] * len(ks)
        if router.clustered and namespace in router.overwritable:
            # replicas of an overwritable namespace may disagree: the TCP path compares their
            # versions (client/core/repair.py); one-sided reads stay for write-once data (KV blocks)
            groups = {}
        else:
            groups = group_by_owner(router, ks)
        for node in groups:
            while node in self._setting_up:  # another task is setting this node up
                yield WAIT
            if node not in self.nodes:
                yield from self._setup(router, node)
        out: list[Any] = [None] * len(ks)
        tcp: list[int] = [] if groups else list(range(len(ks)))
        active = []
        for node, idx in groups.items():
            t = self.nodes.get(node)
            if t is None:
                tcp.extend(idx)
            else:
                active.append((node, idx, t))
        if active:
            yield from self._locate_and_copy(router, active, ks, namespace, dests_in, out, tcp)
        if tcp:
            tcp.sort()
            self.counters["tcp"] += len(tcp)
            if single:
                return (yield from ops.get(router, ks[0], namespace=namespace, into=into))
            res = yield from ops.get_many(router, [ks[i] for i in tcp], namespace=namespace,
                                          intos=[intos[i] for i in tcp] if intos is not None else None)
            for i, r in zip(tcp, res, strict=True):
                out[i] = r
        return out[0] if single else out

    def _locate_and_copy(self, router: Router, active: list[tuple[NodeAddress, list[int], OneSidedTransport]],
                         ks: list[bytes], namespace: str, dests_in: list[Any], out: list[Any],
                         tcp: list[int]) -> Op:
        calls = []
        for _node, idx, _t in active:
            m: dict[str, Any] = {"ks": [ks[i] for i in idx], "lease": LEASE_S, "inline": INLINE_MAX}
            if namespace != "shared":
                m["ns"] = namespace
            calls.append(LocateCall(m, [dests_in[i] for i in idx]))
        t0 = self.clock()
        try:
            replies = yield from gather([call_node(router, node, call)
                                         for (node, _idx, _t), call in zip(active, calls, strict=True)])
        except MemKVError as exc:
            if isinstance(exc, FAILOVER_ERRORS):
                for node, _idx, _t in active:
                    self._forget(node)
            for _node, idx, _t in active:
                tcp.extend(idx)
            return
        self.counters["locates"] += len(active)
        for (node, idx, t), call, rep in zip(active, calls, replies, strict=True):
            if rep.get("ow") and router.clustered:
                router.overwritable.add(namespace)
                tcp.extend(idx)
                continue
            yield from self._copy(node, t, idx, rep, call.inline, dests_in, out, tcp, t0)
            if router.clustered:
                missed = [i for i, d in zip(idx, rep.get("d") or (), strict=False) if d is None]
                if missed:  # a replica that missed a write: ask the others (repair.fallback_reads)
                    res = yield from ops.read_elsewhere(
                        router, [ks[i] for i in missed], node, namespace=namespace,
                        intos=[dests_in[i] for i in missed] if dests_in[missed[0]] is not None else None)
                    for i, v in zip(missed, res, strict=True):
                        out[i] = v

    def _copy(self, node: NodeAddress, t: OneSidedTransport, idx: list[int], rep: dict[str, Any],
              inline: dict[int, tuple[memoryview, bytes | bytearray | None]], dests_in: list[Any], out: list[Any],
              tcp: list[int], t0: float) -> Op:
        descs = rep.get("d") or []
        valid = float(rep.get("valid") or 0.0)
        if rep.get("r") != t.region_id or len(descs) != len(idx) or valid <= 0:
            if rep.get("r") != t.region_id:
                self._forget(node)  # the node restarted: new region
            tcp.extend(idx)
            return
        todo: list[tuple[int, int, int, bytes | bytearray | None]] = []  # (i, length, checksum, own buffer)
        reqs: list[tuple[int, int, memoryview]] = []
        for j, (i, d) in enumerate(zip(idx, descs, strict=True)):
            if d is None:
                out[i] = None  # a miss
                continue
            if j in inline:  # a small value that came back in the reply itself
                view, own = inline[j]
                if checksum(view) == d[2]:
                    self.counters["inline"] += 1
                    out[i] = finish_bytes(own) if own is not None and dests_in[i] is None else view.nbytes
                    if own is not None and dests_in[i] is not None:
                        tcp.append(i)  # the caller's buffer was too small: TCP raises the right error
                else:
                    self.counters["mismatch"] += 1
                    tcp.append(i)
                continue
            if d is False or not isinstance(d, list) or len(d) != 4:
                tcp.append(i)  # not in the region: over TCP
                continue
            off, n, cs, _gen = d
            want = dests_in[i]
            if want is None:
                buf, dest = new_bytes(n)
            elif want.nbytes < n:
                tcp.append(i)  # the TCP path raises the right error
                continue
            else:
                buf, dest = None, want[:n]
            todo.append((i, n, cs, buf))
            reqs.append((off, n, dest))
        if not todo:
            return
        try:
            sums = yield from _waiting(t.read(reqs))
        except (GeneratorExit, KeyboardInterrupt):
            raise
        except Exception:
            self.counters["rdma_errors" if t.kind == "rdma" else "mismatch"] += 1
            self._forget(node)
            tcp.extend(i for i, *_ in todo)
            return
        in_time = self.clock() - t0 <= valid * SAFETY
        for (i, n, cs, buf), got in zip(todo, sums, strict=True):
            if in_time and got == cs:
                out[i] = finish_bytes(buf) if buf is not None else n
                self.counters["onesided"] += 1
                self.counters["onesided_bytes"] += n
            else:
                self.counters["mismatch"] += 1
                tcp.append(i)


def _waiting(read: Any) -> Op:
    """Run a transport's read, turning its waits (it yields ``None``) into ``WAIT`` requests.
    Given up half-way (the caller cancelled), the read is closed at once, so that it can
    mark its transport unusable and let other readers in."""
    try:
        while True:
            read.send(None)
            yield WAIT
    except StopIteration as done:
        return done.value
    finally:
        read.close()
