"""One-sided reads on the client (DESIGN.md §8): LOCATE, then copy the bytes yourself.

``OneSided`` is attached to a ``Client``/``SyncClient`` whose transport is
``auto``, ``shm`` or ``rdma``. For ``get``/``get_into``/``get_many``/
``get_many_into`` it

1. picks, once per node, a transport: shared memory when the node is on this
   host (same boot id and network namespace) and hands over its region; RDMA
   when pyverbs and a device are here and the node serves RDMA; else none (TCP);
2. asks each owner node for descriptors (``LOCATE``: offset, length, checksum,
   generation; the node leases the entries and quarantines their extents when
   freed) — one request per node for a whole batch;
3. copies each value (memcpy from the read-only mapping, or RDMA READs into a
   registered staging buffer) straight into the caller's buffer;
4. verifies every value: the checksum, and that the copy finished within the
   descriptor's validity window (the node's quarantine: until then the extent
   cannot hold another generation's bytes). Whatever fails — a miss in the
   region, a mismatch, an RDMA error, a stale region — is read again over TCP
   in the same call, through the ordinary code path (which reports corruption).

The logic is one generator per call (as in ``ops.py``); ``adrive`` (trio) and
``drive`` (blocking) run it. It yields ``Send``s (run by the client's own
executor, so routing, stamping and failover are the client's), ``Fallback``
(run a TCP operation) and ``WAIT`` (an RDMA completion is pending).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from memkv.client import ops
from memkv.client.buffers import byte_view, finish_bytes, new_bytes
from memkv.client.calls import SimpleCall
from memkv.client.ops import Send, as_key, group_by_owner
from memkv.client.url import NodeAddress
from memkv.engine.checksum import checksum
from memkv.errors import ConnectionLost, InvalidArgument, MemKVError, NodeUnavailable, ProtocolError, TimeoutError
from memkv.protocol.opcodes import Op
from memkv.transport import host_identity, pyverbs_available, rdma_devices

LEASE_S = 2.0
# Values up to this size come back inside the LOCATE reply: below it a second
# step (map + copy, or an RDMA READ) costs more than the bytes it saves.
INLINE_MAX = 128 * 1024
SAFETY = 0.5  # a copy must finish within this fraction of the descriptor's validity window
_DEAD = (ConnectionLost, NodeUnavailable, TimeoutError)


class LocateCall(SimpleCall):
    """LOCATE whose reply may carry small values inline, received into the caller's buffers."""

    def __init__(self, meta: dict[str, Any], dests: list[memoryview | None]) -> None:
        super().__init__(Op.LOCATE, meta)
        self.dests = dests
        self.inline: dict[int, tuple[memoryview, bytes | bytearray | None]] = {}

    def destinations(self, frame: Any) -> list[memoryview]:
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

    def finish(self, frame: Any, dests: list[memoryview]) -> Any:
        if not frame.payload_len:  # connections ask for destinations only when there are bytes
            self.destinations(frame)
        meta = dict(frame.meta)
        meta["_inline"] = self.inline
        return meta


@dataclass
class Fallback:
    op: ops.Op_


WAIT = object()


class OneSided:
    def __init__(self, mode: str) -> None:
        if mode not in ("auto", "shm", "rdma"):
            raise InvalidArgument(f"no one-sided reads with transport {mode!r}")
        self.mode = mode
        self.nodes: dict[NodeAddress, Any] = {}  # node -> ShmRegion | RdmaChannel | None (TCP)
        self._pending: set[NodeAddress] = set()
        self.counters = {"onesided": 0, "onesided_bytes": 0, "tcp": 0, "mismatch": 0, "rdma_errors": 0,
                         "locates": 0, "inline": 0}
        self.closed = False
        self.inline_max = INLINE_MAX
        self.overwritable: set[str] = set()  # namespaces a LOCATE reply said are overwritable

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
    def _setup(self, node: NodeAddress) -> Generator[Any, Any, None]:
        if node in self._pending or self.closed:
            return
        self._pending.add(node)
        try:
            try:
                info = yield Send(SimpleCall(Op.LOCATE, {"do": "info"}), node=node)
            except ProtocolError:
                self.nodes[node] = None  # a node without one-sided reads
                return
            except MemKVError:
                return  # try again next time
            t: Any = None
            if not info.get("ok"):
                self.nodes[node] = None
                return
            if self.mode in ("auto", "shm") and info.get("host") == host_identity() and info.get("sock"):
                from memkv.client.transport_shm import ShmRegion

                try:
                    t = ShmRegion(info["sock"], info["ticket"], info["r"], int(info["size"]))
                except Exception:
                    t = None
            if t is None and self.mode in ("auto", "rdma") and info.get("rdma") and pyverbs_available() \
                    and rdma_devices():
                from memkv.client.transport_rdma import RdmaChannel

                ch = None
                try:
                    ch = RdmaChannel()
                    reply = yield Send(SimpleCall(Op.LOCATE, {"do": "rdma", **ch.hello()}), node=node)
                    ch.connect(reply, info["r"], int(info["size"]))
                    t, ch = ch, None
                except Exception:
                    t = None
                finally:
                    if ch is not None:
                        _close(ch)
            if self.closed:
                if t is not None:
                    _close(t)
                return
            self.nodes[node] = t
        finally:
            self._pending.discard(node)

    # -- the read
    def read(self, router: Any, keys: list[Any], namespace: str, *, intos: list[Any] | None = None,
             single: bool = False, into: Any = None) -> Generator[Any, Any, Any]:
        ks = [as_key(k) for k in keys]
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
        if namespace in self.overwritable and getattr(router, "clustered", False):
            # replicas of an overwritable namespace may disagree: the TCP path compares their
            # versions (ops._newest_reads); one-sided reads stay for write-once data (KV blocks)
            groups = {}
        else:
            groups = group_by_owner(router, ks)
        for node in groups:
            while node in self._pending:  # another task is setting this node up
                yield WAIT
            if node not in self.nodes:
                yield from self._setup(node)
        out: list[Any] = [None] * len(ks)
        tcp: list[int] = [] if groups else list(range(len(ks)))
        active = [(node, idx, self.nodes.get(node)) for node, idx in groups.items()]
        for _node, idx, t in active:
            if t is None:
                tcp.extend(idx)
        active = [a for a in active if a[2] is not None]
        if active:
            sends = []
            for _node, idx, _t in active:
                m: dict[str, Any] = {"ks": [ks[i] for i in idx], "lease": LEASE_S, "inline": self.inline_max}
                if namespace != "shared":
                    m["ns"] = namespace
                sends.append(Send(LocateCall(m, [dests_in[i] for i in idx]), ks[idx[0]], node=_node))
            t0 = time.monotonic()
            try:
                replies = yield sends
            except MemKVError as exc:
                if isinstance(exc, _DEAD):
                    for node, _idx, _t in active:
                        self._forget(node)
                replies = None
            if replies is None:
                for _node, idx, _t in active:
                    tcp.extend(idx)
            else:
                self.counters["locates"] += len(active)
                for (node, idx, t), rep in zip(active, replies, strict=True):
                    if rep.get("ow") and getattr(router, "clustered", False):
                        self.overwritable.add(namespace)
                        tcp.extend(idx)
                        continue
                    yield from self._copy(node, t, idx, rep, ks, dests_in, out, tcp, t0)
                    if getattr(router, "clustered", False):
                        missed = [i for i, d in zip(idx, rep.get("d") or (), strict=False) if d is None]
                        if missed:  # a replica that missed a write: ask the others (ops._fallback_reads)
                            res = yield Fallback(ops.read_elsewhere(
                                router, [ks[i] for i in missed], node, namespace=namespace,
                                intos=[dests_in[i] for i in missed] if dests_in[missed[0]] is not None else None))
                            for i, v in zip(missed, res, strict=True):
                                out[i] = v
        if tcp:
            tcp.sort()
            self.counters["tcp"] += len(tcp)
            if single:
                return (yield Fallback(ops.get(ks[0], namespace=namespace, into=into, router=router)))
            res = yield Fallback(ops.get_many(router, [ks[i] for i in tcp], namespace=namespace,
                                              intos=[intos[i] for i in tcp] if intos is not None else None))
            for i, r in zip(tcp, res, strict=True):
                out[i] = r
        return out[0] if single else out

    def _copy(self, node: NodeAddress, t: Any, idx: list[int], rep: dict[str, Any], ks: list[bytes],
              dests_in: list[Any], out: list[Any], tcp: list[int], t0: float) -> Generator[Any, Any, None]:
        descs = rep.get("d") or []
        valid = float(rep.get("valid") or 0.0)
        if rep.get("r") != t.region_id or len(descs) != len(idx) or valid <= 0:
            if rep.get("r") != t.region_id:
                self._forget(node)  # the node restarted: new region
            tcp.extend(idx)
            return
        todo: list[tuple[int, int, int, memoryview, bytes | bytearray | None]] = []  # (i, n, cs, dest, own buffer)
        reqs: list[tuple[int, int, memoryview]] = []
        inline = rep.get("_inline") or {}
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
                buf = None
                dest = want[:n]
            todo.append((i, n, cs, dest, buf))
            reqs.append((off, n, dest))
        if not todo:
            return
        sums: list[int] = []
        try:
            if t.kind == "rdma":
                while not t.lock.acquire(blocking=False):
                    yield WAIT
                try:
                    for _ in t.read(reqs):
                        yield WAIT
                except BaseException:
                    t.broken = True  # completions may still be in flight: never reuse this QP
                    raise
                finally:
                    t.lock.release()
            else:
                sums = [t.copy_checksummed(off, n, dest) for off, n, dest in reqs]
        except (GeneratorExit, KeyboardInterrupt):
            raise
        except Exception:
            self.counters["rdma_errors" if t.kind == "rdma" else "mismatch"] += 1
            self._forget(node)
            tcp.extend(i for i, *_ in todo)
            return
        in_time = time.monotonic() - t0 <= valid * SAFETY
        if t.kind == "rdma":
            sums = [checksum(dest) for _i, _n, _cs, dest, _buf in todo]
        for (i, n, cs, _dest, buf), got in zip(todo, sums, strict=True):
            if in_time and got == cs:
                out[i] = finish_bytes(buf) if buf is not None else n
                self.counters["onesided"] += 1
                self.counters["onesided_bytes"] += n
            else:
                self.counters["mismatch"] += 1
                tcp.append(i)

    # -- drivers
    async def aread(self, client: Any, keys: list[Any], namespace: str, **kw: Any) -> Any:
        return await adrive(client, self.read(client.router, keys, namespace, **kw))

    def sread(self, client: Any, keys: list[Any], namespace: str, **kw: Any) -> Any:
        return drive(client, self.read(client.router, keys, namespace, **kw))


def _close(t: Any) -> None:
    try:
        t.close()
    except Exception:
        pass


async def adrive(client: Any, gen: Generator[Any, Any, Any]) -> Any:
    import trio

    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            req = gen.throw(error) if error is not None else gen.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if req is WAIT:
            await trio.sleep(0)
            continue
        try:
            if isinstance(req, Fallback):
                value = await client._drive(req.op)
            elif isinstance(req, list):
                value = await client._exec_many(req)
            else:
                value = await client._exec(req)
        except MemKVError as exc:
            error = exc


def drive(client: Any, gen: Generator[Any, Any, Any]) -> Any:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            req = gen.throw(error) if error is not None else gen.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if req is WAIT:
            time.sleep(0)
            continue
        try:
            if isinstance(req, Fallback):
                value = client._drive(req.op)
            elif isinstance(req, list):
                value = client._exec_many(req)
            else:
                value = client._exec(req)
        except MemKVError as exc:
            error = exc
