"""One-sided reads (docs/transports.md): find the value in the node's own index, copy it yourself, verify.

For a client whose transport is ``auto``, ``shm`` or ``rdma``, ``get``/
``get_into``/``get_many``/``get_many_into`` are this operation. On a hit it
sends **no request to the node**:

1. once per node, set up a transport (``client/transports/``): shared memory
   when the node is on this host (same boot id and network namespace) and
   hands over its region, RDMA when pyverbs and a device are here and the node
   serves RDMA, else none (TCP); ``LOCATE do=info`` tells where the node's
   client-readable index is and the tags of the namespaces this session may
   read, and the index header (read through the transport) its seed;
2. hash each key (``memkv/protocol/index_format.py``) and read its window of
   slots -- for a batch, every window first (one RDMA READ each, posted
   together);
3. take the entry of the key's fingerprint and tag that checks itself, then
   read every value straight into the caller's buffer, each followed by its
   entry again (in order: the entry is re-read after the value);
4. accept a value only if its checksum matches the entry, the entry re-read is
   byte-for-byte the one found (nothing changed it), it is not within a
   margin of its TTL, and the whole read took less than half the node's
   quarantine bound (an extent freed while a reader may copy it is not reused
   before that).

Over shared memory, steps 2-3 are announced in the reader's slot of the node's
reader table (``NodeIndex.announce``; memkv/engine/readers.py): the node reuses
an extent freed meanwhile only once this read is over (or after the bound).

Anything else -- no entry (not published, not in the region, being changed,
torn), a namespace this session may not read one-sided, a mismatch, a late
read, an RDMA error -- is read over TCP in the same call by the ordinary TCP
operation (which also reports corruption, falls back to other replicas and
repairs). Reads that never reached the node still count for eviction: the
slots read are sent to the node in batches (``LOCATE do=touch``, at most one
request per ``TOUCH_BATCH`` distinct values or ``TOUCH_INTERVAL_S``).

Cluster: a write-once namespace is read from each key's first replica. In an
overwritable namespace every replica's index is read: the value is served
one-sided only when all replicas are readable this way and hold the same
version (else the TCP path compares versions and repairs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from memkv.client.buffers import byte_view, finish_bytes, new_bytes
from memkv.client.core import ops
from memkv.client.core.calls import SimpleCall
from memkv.client.core.dispatch import call_node
from memkv.client.core.repair import learn_overwritable
from memkv.client.core.requests import WAIT, Blocking, Op
from memkv.client.core.routing import Router
from memkv.client.transports.base import OneSidedTransport, ReadRequest
from memkv.client.url import NodeAddress
from memkv.errors import InvalidArgument, MemKVError, ProtocolError
from memkv.protocol import index_format as ixf
from memkv.protocol.opcodes import Op as Opcode
from memkv.transport import host_identity, pyverbs_available, rdma_devices

SAFETY = 0.5  # a read must finish within this fraction of the node's quarantine bound
EXPIRY_MARGIN_S = 2.0  # a value this close to its TTL is read over TCP (the node decides)
TOUCH_BATCH = 4096  # distinct values read one-sided before their touches are sent
TOUCH_INTERVAL_S = 1.0  # ... or after this long


class NodeIndex:
    """A node's client-readable index, as one client reads it: transport, geometry, tags."""

    __slots__ = ("transport", "base", "slots", "seed", "epoch", "valid", "tags", "touches", "touch_t0", "beat",
                 "beat_seen", "beat_buf", "suspect", "announce")

    def __init__(self, transport: OneSidedTransport, info: dict[str, Any], header: bytes) -> None:
        magic, version, slot, window, slots, epoch, quarantine_ms, seed = ixf.HEADER.unpack_from(header)
        ix = info["ix"]
        if magic != ixf.MAGIC or version != ixf.FORMAT_VERSION or slot != ixf.SLOT or window != ixf.WINDOW \
                or slots != int(ix["slots"]):
            raise ProtocolError(f"index header {magic!r} v{version} ({slot}/{window}/{slots}) is not one this "
                                f"client reads")
        self.transport = transport
        self.base = int(ix["base"])
        self.slots = slots
        self.seed = seed
        self.epoch = epoch
        self.valid = min(float(info.get("valid") or 0.0), quarantine_ms / 1000.0)
        self.tags: dict[str, int] = {str(k): int(v) for k, v in (info.get("tags") or {}).items()}
        self.touches: dict[int, int] = {}  # slot -> seq of values read without asking
        self.touch_t0 = 0.0
        self.beat = -1  # the node's heartbeat as last read, and when (our clock) it was last seen to move
        self.beat_seen = 0.0
        self.beat_buf = memoryview(bytearray(ixf.HEARTBEAT.size))
        self.suspect = False  # the heartbeat stood still: ask the node (LOCATE info) before trusting it again
        # where reads are announced to the node (shared memory; None over RDMA): index_format.ReaderSlot
        self.announce = transport.announcer(self.base)

    def alive(self, now: float) -> bool:
        """Whether the heartbeat just read (``beat_buf``) says the node keeps its index current."""
        beat = ixf.HEARTBEAT.unpack(self.beat_buf)[0]
        if beat == 0:
            return False  # the node shut down
        if beat != self.beat:
            self.beat, self.beat_seen = beat, now
            return True
        return now - self.beat_seen <= ixf.LIVENESS_S

    @property
    def kind(self) -> str:
        return self.transport.kind


class _Lookup:
    """One key on one node: its window, then the entry found and where its value went."""

    __slots__ = ("i", "fp", "first", "window", "found", "dest", "own", "recheck")

    def __init__(self, i: int, fp: int, first: int, window: memoryview) -> None:
        self.i = i
        self.fp = fp
        self.first = first
        self.window = window
        self.found: ixf.Found | None = None
        self.dest: memoryview | None = None
        self.own: bytes | bytearray | None = None
        self.recheck: memoryview | None = None


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


def _run(t: OneSidedTransport, reqs: list[ReadRequest]) -> Op:
    """The transport's ``read`` (``copy`` at once where it never waits)."""
    if not t.waits:
        return t.copy(reqs)
    return (yield from _waiting(t.read(reqs)))


class OneSidedReads:
    """Per client: the index of each node, and counters of what reads did."""

    def __init__(self, mode: str, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if mode not in ("auto", "shm", "rdma"):
            raise InvalidArgument(f"no one-sided reads with transport {mode!r}")
        self.mode = mode
        self.clock = clock
        self.wall = wall
        self.nodes: dict[NodeAddress, NodeIndex | None] = {}  # None: this node is read over TCP
        self._setting_up: set[NodeAddress] = set()
        self.counters = {"onesided": 0, "onesided_bytes": 0, "tcp": 0, "mismatch": 0, "changed": 0, "late": 0,
                         "not_found": 0, "stale_node": 0, "rdma_errors": 0, "touch_requests": 0}
        self.closed = False

    def transport_of(self, node: NodeAddress) -> str:
        n = self.nodes.get(node)
        return "tcp" if n is None else n.kind

    def close(self, router: Router) -> Op:
        """Send the touches not sent yet (best effort), then release the transports."""
        self.closed = True
        nodes, self.nodes = self.nodes, {}
        for node, n in nodes.items():
            if n is not None and n.touches:
                yield from self._send_touches(router, node, n)
        for n in nodes.values():
            if n is not None:
                _close(n.transport)

    def _forget(self, node: NodeAddress) -> None:
        n = self.nodes.pop(node, None)
        if n is not None:
            _close(n.transport)

    # -- choosing a transport for a node, learning its index
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
            for namespace in info.get("ow") or ():
                learn_overwritable(router, str(namespace), True)  # (this client may never send a GET)
            if not info.get("ok") or not isinstance(info.get("ix"), dict):
                self._forget(node)
                self.nodes[node] = None
                return
            known = self.nodes.get(node)
            if known is not None and known.transport.region_id == info.get("r"):
                known.suspect = False  # the same node answers: its index is current again
                known.beat = -1
                return
            self._forget(node)  # a new region (the node restarted), or none known yet
            t: Any = None
            if self.mode in ("auto", "shm") and info.get("host") == host_identity() and info.get("sock"):
                t = yield Blocking(_open_shm, info)
            if t is None and self.mode in ("auto", "rdma") and info.get("rdma") and pyverbs_available() \
                    and rdma_devices():
                t = yield from self._setup_rdma(router, node, info)
            index = None
            if t is not None:
                index = yield from self._open_index(t, info)
                if index is None:
                    _close(t)
            if self.closed:
                if index is not None:
                    _close(t)
                return
            self.nodes[node] = index
        finally:
            self._setting_up.discard(node)

    def _open_index(self, t: OneSidedTransport, info: dict[str, Any]) -> Op:
        header = memoryview(bytearray(ixf.HEADER.size))
        try:
            yield from _run(t, [(int(info["ix"]["base"]), ixf.HEADER.size, header, False)])
            return NodeIndex(t, info, bytes(header))
        except Exception:
            return None

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
        every_replica = router.clustered and namespace in router.overwritable
        plan = self._plan(router, ks, every_replica)
        yield from self._set_up(router, plan)
        if not every_replica and router.clustered and namespace in router.overwritable:
            # a node's set-up just said the namespace is overwritable: read every replica
            plan = self._plan(router, ks, True)
            yield from self._set_up(router, plan)
        out: list[Any] = [None] * len(ks)
        tcp = yield from self._read_indexed(router, ks, namespace, plan, dests_in, out)
        if tcp:
            self.counters["tcp"] += len(tcp)
            if single:
                return (yield from ops.get(router, ks[0], namespace=namespace, into=into))
            res = yield from ops.get_many(router, [ks[i] for i in tcp], namespace=namespace,
                                          intos=[intos[i] for i in tcp] if intos is not None else None)
            for i, r in zip(tcp, res, strict=True):
                out[i] = r
        return out[0] if single else out

    @staticmethod
    def _plan(router: Router, ks: list[bytes], every_replica: bool) -> list[list[NodeAddress]]:
        """Which nodes each key is read from: its first replica, or all of them (overwritable, cluster)."""
        if every_replica:
            return [router.replicas(k) for k in ks]
        return [router.replicas(k)[:1] for k in ks]

    def _set_up(self, router: Router, plan: list[list[NodeAddress]]) -> Op:
        """Set up (once) every node the plan reads from, or again one whose heartbeat stood still."""
        for node in {n for reps in plan for n in reps}:
            while node in self._setting_up:  # another task is setting this node up
                yield WAIT
            known = self.nodes.get(node, False)
            if known is False or (known is not None and known.suspect):
                yield from self._setup(router, node)

    def _read_indexed(self, router: Router, ks: list[bytes], namespace: str, plan: list[list[NodeAddress]],
                      dests_in: list[Any], out: list[Any]) -> Op:
        """Serve what the nodes' indexes can; the positions left for TCP."""
        # per node: the lookups of the keys read there
        per_node: dict[NodeAddress, list[_Lookup]] = {}
        tcp: list[int] = []
        for i, reps in enumerate(plan):
            if not reps:
                tcp.append(i)
                continue
            for node in reps:
                index = self.nodes.get(node)
                tag = index.tags.get(namespace) if index is not None else None
                if tag is None:
                    tcp.append(i)
                    break
            else:
                for node in reps:
                    index = self.nodes[node]
                    assert index is not None
                    fp = ixf.fingerprint(ks[i], index.seed)
                    first = fp & (index.slots - 1)
                    per_node.setdefault(node, []).append(
                        _Lookup(i, fp, first, memoryview(bytearray(ixf.WINDOW_BYTES))))
        if not per_node:
            return tcp
        t0 = self.clock()  # before the announcement: a read the node stops waiting for is late here
        announced = []
        for ix in (self.nodes.get(n) for n in per_node):
            if ix is not None and ix.announce is not None:
                token, oldest = ix.announce.enter(t0)  # until ``leave`` the node keeps what this read finds
                announced.append((ix.announce, token))
                t0 = min(t0, oldest)  # covered while the oldest read announced in the slot is in time
        try:
            tcp = yield from self._read_announced(router, ks, namespace, plan, dests_in, out, per_node, tcp, t0)
        finally:
            for a, token in announced:
                a.leave(token)
        yield from self._maybe_touch(router, per_node)
        return tcp

    def _read_announced(self, router: Router, ks: list[bytes], namespace: str, plan: list[list[NodeAddress]],
                        dests_in: list[Any], out: list[Any], per_node: dict[NodeAddress, list[_Lookup]],
                        tcp: list[int], t0: float) -> Op:
        """Windows, entries, values and entries again (the nodes' reader slots announce this read)."""
        # 1. every window
        ok = yield from self._each_node(per_node, self._windows)
        found: dict[int, list[tuple[NodeAddress, _Lookup]]] = {}
        bad: set[int] = set()
        now_wall = self.wall()
        now = self.clock()
        for node, looks in per_node.items():
            index = self.nodes.get(node)
            if not ok.get(node) or index is None:
                bad.update(lk.i for lk in looks)
                continue
            if not index.alive(now):
                index.suspect = True
                self.counters["stale_node"] += 1
                bad.update(lk.i for lk in looks)
                continue
            tag = index.tags[namespace]
            for lk in looks:
                f = ixf.find(lk.window, lk.first, ixf.fingerprint_bytes(lk.fp), tag)
                if f is None or (f.expires and now_wall >= index.epoch + f.expires - EXPIRY_MARGIN_S):
                    self.counters["not_found"] += 1
                    bad.add(lk.i)
                else:
                    lk.found = f
                    found.setdefault(lk.i, []).append((node, lk))
        # 2. the values: from one node per key (the replicas agree on its version)
        reads: dict[NodeAddress, list[_Lookup]] = {}
        for i, hits in found.items():
            if i in bad or len(hits) != len(plan[i]) or len({lk.found.version for _n, lk in hits}) != 1:
                bad.add(i)
                continue
            node, lk = hits[0]
            f = lk.found
            want = dests_in[i]
            if want is None:
                lk.own, lk.dest = new_bytes(f.length)
            elif want.nbytes < f.length:
                bad.add(i)  # the TCP path raises the right error
                continue
            else:
                lk.dest = want[:f.length]
            lk.recheck = memoryview(bytearray(ixf.SLOT))
            reads.setdefault(node, []).append(lk)
        if reads:
            ok = yield from self._each_node(reads, self._values)
            took = self.clock() - t0
            for node, looks in reads.items():
                index = self.nodes.get(node)
                sums = ok.get(node)
                late = index is not None and took > index.valid * SAFETY
                for j, lk in enumerate(looks):
                    f = lk.found
                    assert f is not None
                    if index is None or not sums:
                        bad.add(lk.i)
                    elif sums[2 * j] != f.checksum:
                        self.counters["mismatch"] += 1
                        bad.add(lk.i)
                    elif bytes(lk.recheck) != f.raw:
                        self.counters["changed"] += 1
                        bad.add(lk.i)
                    elif late:
                        self.counters["late"] += 1
                        bad.add(lk.i)
                    else:
                        out[lk.i] = finish_bytes(lk.own) if lk.own is not None else f.length
                        self.counters["onesided"] += 1
                        self.counters["onesided_bytes"] += f.length
                        index.touches[f.slot] = ixf.ENTRY.unpack_from(f.raw)[0]
        tcp.extend(bad)
        tcp.sort()
        return tcp

    def _windows(self, index: NodeIndex, looks: list[_Lookup]) -> Generator[Any, Any, list[int]]:
        reqs: list[ReadRequest] = [(index.base + ixf.HEARTBEAT_OFF, ixf.HEARTBEAT.size, index.beat_buf, False)]
        reqs += [(ixf.slot_offset(index.base, lk.first), ixf.WINDOW_BYTES, lk.window, False) for lk in looks]
        return (yield from _run(index.transport, reqs))

    def _values(self, index: NodeIndex, looks: list[_Lookup]) -> Generator[Any, Any, list[int]]:
        reqs: list[ReadRequest] = []
        for lk in looks:
            f = lk.found
            assert f is not None and lk.dest is not None and lk.recheck is not None
            reqs.append((f.offset, f.length, lk.dest, True))
            reqs.append((ixf.slot_offset(index.base, f.slot), ixf.SLOT, lk.recheck, False))  # after the value
        return (yield from _run(index.transport, reqs))

    def _each_node(self, work: dict[NodeAddress, list[_Lookup]],
                   step: Callable[[NodeIndex, list[_Lookup]], Generator[Any, Any, list[int]]]) -> Op:
        """Run ``step`` on every node's transport at once (their waits interleaved); per node its result,
        or None where the transport failed (it is then dropped: the next read sets the node up again)."""
        results: dict[NodeAddress, list[int] | None] = {}
        running: list[tuple[NodeAddress, Generator[Any, Any, list[int]]]] = []
        for node, looks in work.items():
            index = self.nodes.get(node)
            if index is None:
                results[node] = None
            else:
                running.append((node, step(index, looks)))
        while running:
            still = []
            for node, gen in running:
                try:
                    req = gen.send(None)
                except StopIteration as done:
                    results[node] = done.value
                    continue
                except (GeneratorExit, KeyboardInterrupt):
                    raise
                except Exception:
                    index = self.nodes.get(node)
                    self.counters["rdma_errors" if index is not None and index.kind == "rdma" else "mismatch"] += 1
                    self._forget(node)
                    results[node] = None
                    continue
                if req is not WAIT:  # a transport asks for nothing but waits
                    gen.close()
                    raise RuntimeError(f"one-sided read asked for {req!r}")
                still.append((node, gen))
            running = still
            if running:
                yield WAIT
        return results

    # -- touches: reads the node did not see, for its eviction policy
    def _maybe_touch(self, router: Router, reads: dict[NodeAddress, list[_Lookup]]) -> Op:
        now = self.clock()
        for node in reads:
            index = self.nodes.get(node)
            if index is None or not index.touches:
                continue
            if not index.touch_t0:
                index.touch_t0 = now
            if len(index.touches) >= TOUCH_BATCH or now - index.touch_t0 >= TOUCH_INTERVAL_S:
                yield from self._send_touches(router, node, index)

    def _send_touches(self, router: Router, node: NodeAddress, index: NodeIndex) -> Op:
        pairs: list[int] = []
        for slot, seq in index.touches.items():
            pairs += (slot, seq)
        index.touches = {}
        index.touch_t0 = 0.0
        self.counters["touch_requests"] += 1
        try:
            yield from call_node(router, node, SimpleCall(Opcode.LOCATE, {"do": "touch", "t": pairs}))
        except MemKVError:
            pass  # best effort: eviction order, not data


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
