"""Client operations as generators: the logic of each method, written once.

An operation yields ``Send`` requests (or lists of them, to run in parallel)
and receives their results; it never does I/O itself. ``Client`` drives these
generators with trio, ``SyncClient`` with blocking sockets, so both clients
have exactly the same behaviour. Routing (which node owns a key) comes from
the router; splitting a batch by owner happens here.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from memkv.client.buffers import byte_view
from memkv.client.calls import (
    Call,
    GetCall,
    GetManyCall,
    PutCall,
    PutManyCall,
    SimpleCall,
)
from memkv.client.url import NodeAddress
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.opcodes import Op


class Router(Protocol):
    """Maps keys to the nodes holding them (replicas, preferred first)."""

    def replicas(self, key: bytes) -> list[NodeAddress]: ...

    def all_nodes(self) -> list[NodeAddress]: ...

    def stamp(self, meta: dict[str, Any]) -> None:
        """Add routing fields (cluster, epoch) to a request's meta."""


@dataclass
class StandaloneRouter:
    node: NodeAddress

    def replicas(self, key: bytes) -> list[NodeAddress]:
        return [self.node]

    def all_nodes(self) -> list[NodeAddress]:
        return [self.node]

    def stamp(self, meta: dict[str, Any]) -> None:
        return None


@dataclass
class Send:
    """Run ``call`` on the nodes of ``key`` (or on ``node`` when given).

    Reads go to one replica, failing over to the next; writes go to every
    replica (``write=True``), the cluster executor decides how.
    """

    call: Call
    key: bytes | None = None
    write: bool = False
    node: NodeAddress | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # in a parallel list: a failure is returned as the result (the error object) instead of
    # failing the whole list (best-effort side requests, e.g. version probes)
    tolerant: bool = False


Op_ = Generator[Send | list[Send], Any, Any]


class Restartable:
    """An operation that can be run again from the start (``restart()``).

    After a ``MOVED`` reply the cluster client refreshes its slot map and runs
    the whole operation again, so a batch is re-split under the new map.
    One-shot iterators among the arguments are turned into lists first.
    """

    __slots__ = ("_fn", "_args", "_kwargs", "_gen")

    def __init__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._gen = fn(*args, **kwargs)

    def send(self, value: Any) -> Any:
        return self._gen.send(value)

    def throw(self, exc: BaseException) -> Any:
        return self._gen.throw(exc)

    def close(self) -> None:
        self._gen.close()

    def __iter__(self) -> Restartable:
        return self

    def __next__(self) -> Any:
        return self._gen.send(None)

    def restart(self) -> Restartable:
        self._gen.close()
        return Restartable(self._fn, self._args, self._kwargs)


def restartable(fn: Any) -> Any:
    import functools
    from collections.abc import Iterator

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Restartable:
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        return Restartable(fn, args, kwargs)

    return wrapper


def as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"keys are bytes or str, not {type(key).__name__}")
    return bytes(key)


def group_by_owner(router: Router, keys: Sequence[bytes]) -> dict[NodeAddress, list[int]]:
    """Indices of ``keys`` grouped by their first replica, preserving order."""
    groups: dict[NodeAddress, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(router.replicas(k)[0], []).append(i)
    return groups


def _report_corrupt(call: Call, namespace: str) -> Op_:
    for bad in call.corrupt:
        meta = {"k": bad.key, "gen": bad.generation}
        if namespace != "shared":
            meta["ns"] = namespace
        try:
            yield Send(SimpleCall(Op.REPORT_CORRUPT, meta), bad.key)
        except MemKVError:
            pass  # the report is best effort; the caller already sees a miss


@restartable
def put(key: bytes | str, value: Any, *, namespace: str, ttl: float | None, pin: bool,
        parent: bytes | None = None, extra: dict[str, Any] | None = None) -> Op_:
    k = as_key(key)
    yield Send(PutCall(k, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent, extra=extra), k, write=True)


@restartable
def get(key: bytes | str, *, namespace: str, into: Any = None, router: Router | None = None) -> Op_:
    k = as_key(key)
    call = GetCall(k, namespace=namespace, into=into)
    send = Send(call, k)
    clustered = router is not None and getattr(router, "clustered", False)
    seen = None
    if clustered and namespace in _overwritable(router):
        # known overwritable: the other replicas' versions are asked for alongside the read
        probes = _probe_targets(router, [k], [0])
        replies = yield [send, *_probe_sends(probes, [k], namespace)]
        result = replies[0]
        seen = _probe_results(probes, replies[1:])
    else:
        result = yield send
    if call.corrupt:
        yield from _report_corrupt(call, namespace)
    if clustered:
        _learn_overwritable(router, namespace, call.overwrite)
        out = [result]
        intos = [into] if into is not None else None
        if result is None:
            yield from _fallback_reads(router, [k], out, [0], send.extra.get("served_by"), namespace, intos)
        elif call.overwrite:
            yield from _newest_reads(router, [k], out, [call.version], [0], send.extra.get("served_by"),
                                     namespace, intos, seen)
        result = out[0]
    return result


def _overwritable(router: Router) -> set[str]:
    return getattr(router, "overwritable", set())


def _learn_overwritable(router: Router, namespace: str, overwrite: bool) -> None:
    known = getattr(router, "overwritable", None)
    if known is not None:
        if overwrite:
            known.add(namespace)
        else:
            known.discard(namespace)


def _probe_targets(router: Router, keys: list[bytes], idx: list[int], served: Any = None) -> dict[Any, list[int]]:
    """Per replica other than the one that served the read (None: not known yet, so each key's
    first replica, which the read goes to): the indices to ask the versions of."""
    by_node: dict[Any, list[int]] = {}
    for i in idx:
        nodes = router.replicas(keys[i])
        for n in (nodes[1:] if served is None else nodes):
            if n != served:
                by_node.setdefault(n, []).append(i)
    return by_node


def _probe_sends(probes: dict[Any, list[int]], keys: list[bytes], namespace: str) -> list[Send]:
    """``EXISTS_MANY`` + ``v``: the versions a replica holds (0: none), no values; best effort."""
    sends = []
    for node, idx in probes.items():
        m: dict[str, Any] = {"ks": [keys[i] for i in idx], "v": True}
        if namespace != "shared":
            m["ns"] = namespace
        sends.append(Send(SimpleCall(Op.EXISTS_MANY, m, "vers"), keys[idx[0]], node=node, tolerant=True))
    return sends


def _probe_results(probes: dict[Any, list[int]], replies: list[Any]) -> dict[Any, dict[int, int]]:
    """node -> index -> version, for the probes that answered."""
    seen: dict[Any, dict[int, int]] = {}
    for (node, idx), vers in zip(probes.items(), replies, strict=True):
        if isinstance(vers, list) and len(vers) == len(idx):
            seen[node] = dict(zip(idx, vers, strict=True))
    return seen


def _fallback_reads(router: Router, keys: list[bytes], out: list[Any], missing: list[int], served: Any,
                    namespace: str, intos: list[Any] | None) -> Op_:
    """Read fallback and read repair (cluster reads; README "Cluster", consistency).

    ``out[i]`` for ``i`` in ``missing`` was a miss from replica ``served``. A write acknowledged
    while one replica was skipped (timed out, refused, fenced) is not on that replica, which may
    still be (or become again) the slot's first replica: ask the slot's other replicas, in
    order, before answering a miss, and store a value found there back on every replica that
    answered a miss, with its version (``_repair``), so the repair never replaces a value written
    meanwhile. Errors of the extra requests are ignored (the miss stands); best effort."""
    missed: dict[Any, list[int]] = {}  # node -> indices it answered a miss for
    versions: dict[int, int] = {}  # index -> version of the value found
    if served is not None:
        missed[served] = list(missing)
    left = list(missing)
    nodes_of = {i: [n for n in router.replicas(keys[i]) if n != served] for i in left}
    while left:
        node = next((nodes_of[i][0] for i in left if nodes_of[i]), None)
        if node is None:
            break
        ask = [i for i in left if nodes_of[i] and nodes_of[i][0] == node]
        for i in ask:
            nodes_of[i].pop(0)
        call = GetManyCall([keys[i] for i in ask], namespace=namespace,
                           intos=[intos[i] for i in ask] if intos is not None else None)
        try:
            res = yield Send(call, keys[ask[0]], node=node)
        except MemKVError:
            continue
        found = set()
        for i, r, v in zip(ask, res, call.versions, strict=True):
            if r is None:
                missed.setdefault(node, []).append(i)
            else:
                out[i] = r
                versions[i] = v
                found.add(i)
        if call.corrupt:
            yield from _report_corrupt(call, namespace)
        left = [i for i in left if i not in found]
    # repair: the values found, onto the replicas that answered a miss for them
    yield from _repair(missed, keys, out, versions, namespace, intos)


def _repair(stale: dict[Any, list[int]], keys: list[bytes], out: list[Any], versions: dict[int, int],
            namespace: str, intos: list[Any] | None) -> Op_:
    """Store ``out[i]`` with its version on each node listed for ``i`` (best effort). The node keeps
    whichever of its value and the repair is newer (``Store.commit``), so a repair never replaces
    a value written meanwhile; values without a version (0) go store-if-absent (``nx``)."""
    for node, idx in stale.items():
        fix = [i for i in idx if out[i] is not None]
        if not fix:
            continue
        vals = [out[i] if intos is None else bytes(byte_view(intos[i])[:out[i]]) for i in fix]
        vers = [versions.get(i, 0) for i in fix]
        extra: dict[str, Any] = {"vers": vers} if all(vers) else {"nx": True}
        try:
            yield Send(PutManyCall([keys[i] for i in fix], vals, namespace=namespace, ttl=None, pin=False,
                                   extra=extra), keys[fix[0]], node=node)
        except MemKVError:
            pass


def _newest_reads(router: Router, keys: list[bytes], out: list[Any], versions: list[int], hits: list[int],
                  served: Any, namespace: str, intos: list[Any] | None,
                  seen: dict[Any, dict[int, int]] | None = None) -> Op_:
    """Newest-version reads of an overwritable namespace (README "Cluster", consistency).

    A replica that was down, fenced or unreachable while a key was overwritten still holds the
    older value, and may be the one that answered (``served``). So for the keys in ``hits``
    (``out[i]`` read with ``versions[i]``) ask the slot's other replicas for their versions only
    (``EXISTS_MANY`` + ``v``: no values move), fetch the value from a replica that has a newer
    one, and repair the newest onto every replica that is behind. Write-once namespaces never
    need this (a value cannot change); their misses go through ``_fallback_reads``. A replica
    that does not answer is skipped: the read returns the newest of those that did. ``seen``:
    versions already probed alongside the read (node -> index -> version)."""
    newest: dict[int, tuple[int, Any]] = {i: (versions[i], served) for i in hits}  # i -> (version, node)
    behind: dict[Any, list[int]] = {}
    if seen is None:
        probes = _probe_targets(router, keys, hits, served)
        seen = _probe_results(probes, (yield _probe_sends(probes, keys, namespace))) if probes else {}
    for node, held in seen.items():
        if node == served:
            continue
        for i in hits:
            v = held.get(i)
            if v is not None and v > newest[i][0]:
                newest[i] = (v, node)
    # fetch the newer values, one request per replica that has some
    fetch: dict[Any, list[int]] = {}
    for i in hits:
        v, node = newest[i]
        if node != served:
            fetch.setdefault(node, []).append(i)
    got: dict[int, int] = {}
    for node, idx in fetch.items():
        # into fresh buffers, not the caller's: a fetch that fails half-way must leave the
        # value already read there intact
        call = GetManyCall([keys[i] for i in idx], namespace=namespace)
        try:
            res = yield Send(call, keys[idx[0]], node=node)
        except MemKVError:
            continue
        for i, r, v in zip(idx, res, call.versions, strict=True):
            if r is None:
                continue
            if intos is not None:
                dest = byte_view(intos[i], writable=True)
                if len(r) > dest.nbytes:
                    raise InvalidArgument(f"buffer of {dest.nbytes} bytes is too small for a value of "
                                          f"{len(r)} bytes")
                dest[:len(r)] = r
                r = len(r)
            out[i] = r
            got[i] = v
        if call.corrupt:
            yield from _report_corrupt(call, namespace)
    final = {i: got.get(i, versions[i]) for i in hits}
    for i in hits:
        if final[i] > versions[i] and served is not None:
            behind.setdefault(served, []).append(i)
        for node, held in seen.items():
            if node != served and i in held and held[i] < final[i] and node != newest[i][1]:
                behind.setdefault(node, []).append(i)
    yield from _repair(behind, keys, out, final, namespace, intos)


@restartable
def read_elsewhere(router: Router, keys: list[bytes], served: NodeAddress, *, namespace: str,
                   intos: list[Any] | None = None) -> Op_:
    """``keys`` were misses on replica ``served`` (a one-sided read): the read fallback and repair
    of ``get``/``get_many``, over TCP."""
    out: list[Any] = [None] * len(keys)
    yield from _fallback_reads(router, keys, out, list(range(len(keys))), served, namespace, intos)
    return out


def group_by_replicas(router: Router, keys: Sequence[bytes]) -> dict[tuple[NodeAddress, ...], list[int]]:
    """Indices of ``keys`` grouped by their whole replica list (primary first).

    In a cluster, keys with the same primary may have different other replicas,
    so writes (sent to every replica) and reads (failing over to the next
    replica) are split by the full list; standalone, this is one group.
    """
    groups: dict[tuple[NodeAddress, ...], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(tuple(router.replicas(k)), []).append(i)
    return groups


def _split(router: Router, keys: list[bytes]) -> list[tuple[tuple[NodeAddress, ...], list[int]]]:
    return list(group_by_replicas(router, keys).items())


@restartable
def put_many(router: Router, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str,
             ttl: float | None, pin: bool, parents: list[bytes | None] | None = None,
             extra: dict[str, Any] | None = None) -> Op_:
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    keys = [as_key(k) for k, _ in pairs]
    values = [v for _, v in pairs]
    if not keys:
        return []
    groups = _split(router, keys)
    sends = [Send(PutManyCall([keys[i] for i in idx], [values[i] for i in idx], namespace=namespace,
                              ttl=ttl, pin=pin,
                              parents=[parents[i] for i in idx] if parents else None, extra=extra),
                  keys[idx[0]], write=True) for _, idx in groups]
    results = yield sends
    out: list[Any] = [None] * len(keys)
    for (_, idx), res in zip(groups, results, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    for r in out:
        if isinstance(r, MemKVError):
            raise r
    return out


@restartable
def get_many(router: Router, keys: Iterable[bytes | str], *, namespace: str,
             intos: list[Any] | None = None) -> Op_:
    ks = [as_key(k) for k in keys]
    if intos is not None and len(intos) != len(ks):
        raise InvalidArgument("get_many_into needs one buffer per key")
    if not ks:
        return []
    groups = _split(router, ks)
    calls = [GetManyCall([ks[i] for i in idx], namespace=namespace,
                         intos=[intos[i] for i in idx] if intos is not None else None) for _, idx in groups]
    sends = [Send(call, ks[idx[0]]) for call, (_, idx) in zip(calls, groups, strict=True)]
    clustered = getattr(router, "clustered", False)
    seen = None
    if clustered and namespace in _overwritable(router):
        # known overwritable: the other replicas' versions are asked for alongside the reads
        probes = _probe_targets(router, ks, list(range(len(ks))))
        replies = yield [*sends, *_probe_sends(probes, ks, namespace)]
        results = replies[:len(sends)]
        seen = _probe_results(probes, replies[len(sends):])
    else:
        results = yield sends
    out: list[Any] = [None] * len(ks)
    for (_, idx), res in zip(groups, results, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    for call in calls:
        if call.corrupt:
            yield from _report_corrupt(call, namespace)
    if clustered:
        for call, send, (_, idx) in zip(calls, sends, groups, strict=True):
            _learn_overwritable(router, namespace, call.overwrite)
            served = send.extra.get("served_by")
            missing = [i for i in idx if out[i] is None]
            if call.overwrite:
                hits = [i for i in idx if out[i] is not None]
                if hits:
                    vers = [0] * len(ks)
                    for i, v in zip(idx, call.versions, strict=True):
                        vers[i] = v
                    yield from _newest_reads(router, ks, out, vers, hits, served, namespace, intos, seen)
            if missing:
                yield from _fallback_reads(router, ks, out, missing, served, namespace, intos)
    return out


@restartable
def keyed_batch(router: Router, op: Op, keys: Iterable[bytes | str], *, namespace: str, field_name: str,
                write: bool = False, extra: dict[str, Any] | None = None) -> Op_:
    """exists_many / pin / unpin: one list result (or count) per owner, merged."""
    ks = [as_key(k) for k in keys]
    if not ks:
        return [] if field_name == "ex" else 0
    groups = _split(router, ks)

    def meta(idx: list[int]) -> dict[str, Any]:
        m: dict[str, Any] = {"ks": [ks[i] for i in idx], **(extra or {})}
        if namespace != "shared":
            m["ns"] = namespace
        return m

    results = yield [Send(SimpleCall(op, meta(idx), field_name), ks[idx[0]], write=write) for _, idx in groups]
    if field_name != "ex":
        return sum(int(r) for r in results)
    out: list[bool] = [False] * len(ks)
    for (_, idx), res in zip(groups, results, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = bool(r)
    return out


@restartable
def lookup_prefix(router: Router, keys: Iterable[bytes | str], *, namespace: str, lease: float) -> Op_:
    """Length of the cached leading run of ``keys``; those blocks are leased.

    Consecutive keys owned by the same node are asked in one request; the walk
    stops at the first node whose answer is shorter than what it was asked.
    """
    ks = [as_key(k) for k in keys]
    total = 0
    i = 0
    while i < len(ks):
        owner = tuple(router.replicas(ks[i]))
        j = i + 1
        while j < len(ks) and tuple(router.replicas(ks[j])) == owner:
            j += 1
        m: dict[str, Any] = {"ks": ks[i:j], "lease": lease}
        if namespace != "shared":
            m["ns"] = namespace
        n = yield Send(SimpleCall(Op.LOOKUP_PREFIX, m, "n"), ks[i])
        total += int(n)
        if n < j - i:
            break
        i = j
    return total


@restartable
def delete(key: bytes | str, *, namespace: str) -> Op_:
    k = as_key(key)
    meta: dict[str, Any] = {"k": k}
    if namespace != "shared":
        meta["ns"] = namespace
    deleted = yield Send(SimpleCall(Op.DELETE, meta, "d"), k, write=True)
    return bool(deleted)


def stats(router: Router) -> Op_:
    nodes = router.all_nodes()
    results = yield [Send(SimpleCall(Op.STATS, {}, "stats"), node=n) for n in nodes]
    if len(nodes) == 1:
        return results[0]
    return {"nodes": {str(n): r for n, r in zip(nodes, results, strict=True)}}


def ping(router: Router) -> Op_:
    results = yield [Send(SimpleCall(Op.PING, {}), node=n) for n in router.all_nodes()]
    return results
