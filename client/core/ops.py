"""The client's operations over TCP, as generators: the logic of every method, written once.

An operation builds ``Call``s, sends them through ``dispatch`` (failover,
replicated writes) and combines the replies; it never does I/O itself — it
yields requests (``client/core/requests.py``) that an executor answers.
Batches are split by replica list (``routing.group_by_replicas``) and the
parts sent in parallel; cluster reads then check what one replica said
(``client/core/repair.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memkv.client.core.calls import DeleteCall, GetCall, GetManyCall, PutCall, PutManyCall, SimpleCall
from memkv.client.core.dispatch import call_node, gather, read, write
from memkv.client.core.repair import (
    fallback_reads,
    learn_overwritable,
    newest_reads,
    probe_ops,
    probe_results,
    probe_targets,
    report_corrupt,
)
from memkv.client.core.requests import Op, Parallel
from memkv.client.core.routing import Router, group_by_replicas
from memkv.client.url import NodeAddress
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.codec import DEFAULT_LIMITS
from memkv.protocol.opcodes import Op as Opcode
from memkv.protocol.versions import CLOCK

BATCH_KEYS = DEFAULT_LIMITS.max_batch  # a node refuses a request naming more keys (``BatchTooLarge``)


def as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"keys are bytes or str, not {type(key).__name__}")
    return bytes(key)


def _ns(meta: dict[str, Any], namespace: str) -> dict[str, Any]:
    if namespace != "shared":
        meta["ns"] = namespace
    return meta


def put(router: Router, key: bytes | str, value: Any, *, namespace: str, ttl: float | None, pin: bool,
        parent: bytes | None = None, extra: dict[str, Any] | None = None) -> Op:
    k = as_key(key)
    yield from write(router, PutCall(k, value, namespace=namespace, ttl=ttl, pin=pin, parent=parent, extra=extra), k)


def get(router: Router, key: bytes | str, *, namespace: str, into: Any = None) -> Op:
    k = as_key(key)
    call = GetCall(k, namespace=namespace, into=into)
    if not router.clustered:
        result, _ = yield from read(router, call, k)
        if call.corrupt:
            yield from report_corrupt(router, call, namespace)
        return result
    seen = None
    if namespace in router.overwritable:
        # known overwritable: the other replicas' versions are asked for alongside the read
        probes = probe_targets(router, [k], [0])
        replies = yield Parallel([read(router, call, k), *probe_ops(router, probes, [k], namespace)])
        if isinstance(replies[0], MemKVError):
            raise replies[0]
        result, served = replies[0]
        seen = probe_results(probes, replies[1:])
    else:
        result, served = yield from read(router, call, k)
    if call.corrupt:
        yield from report_corrupt(router, call, namespace)
    learn_overwritable(router, namespace, call.overwrite)
    out = [result]
    intos = [into] if into is not None else None
    if result is None:
        yield from fallback_reads(router, [k], out, [0], served, namespace, intos, {0: call.tomb})
    elif call.overwrite:
        yield from newest_reads(router, [k], out, [call.version], [0], served, namespace, intos, seen)
    return out[0]


def put_many(router: Router, items: Iterable[tuple[bytes | str, Any]] | dict[Any, Any], *, namespace: str,
             ttl: float | None, pin: bool, parents: list[bytes | None] | None = None,
             extra: dict[str, Any] | None = None) -> Op:
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    keys = [as_key(k) for k, _ in pairs]
    values = [v for _, v in pairs]
    if not keys:
        return []
    groups = group_by_replicas(router, keys)
    results = yield from gather([
        write(router, PutManyCall([keys[i] for i in idx], [values[i] for i in idx], namespace=namespace, ttl=ttl,
                                  pin=pin, parents=[parents[i] for i in idx] if parents else None, extra=extra),
              keys[idx[0]])
        for _, idx in groups])
    out: list[Any] = [None] * len(keys)
    for (_, idx), res in zip(groups, results, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    for r in out:
        if isinstance(r, MemKVError):
            raise r
    return out


def get_many(router: Router, keys: Iterable[bytes | str], *, namespace: str, intos: list[Any] | None = None) -> Op:
    ks = [as_key(k) for k in keys]
    if intos is not None and len(intos) != len(ks):
        raise InvalidArgument("get_many_into needs one buffer per key")
    if not ks:
        return []
    groups = group_by_replicas(router, ks)
    calls = [GetManyCall([ks[i] for i in idx], namespace=namespace,
                         intos=[intos[i] for i in idx] if intos is not None else None) for _, idx in groups]
    reads = [read(router, call, ks[idx[0]]) for call, (_, idx) in zip(calls, groups, strict=True)]
    seen = None
    if router.clustered and namespace in router.overwritable:
        # known overwritable: the other replicas' versions are asked for alongside the reads
        probes = probe_targets(router, ks, list(range(len(ks))))
        replies = yield Parallel([*reads, *probe_ops(router, probes, ks, namespace)])
        answers = replies[:len(reads)]
        for a in answers:
            if isinstance(a, MemKVError):
                raise a
        seen = probe_results(probes, replies[len(reads):])
    else:
        answers = yield from gather(reads)
    out: list[Any] = [None] * len(ks)
    for (_, idx), (res, _served) in zip(groups, answers, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    for call in calls:
        if call.corrupt:
            yield from report_corrupt(router, call, namespace)
    if router.clustered:
        for call, (_res, served), (_, idx) in zip(calls, answers, groups, strict=True):
            learn_overwritable(router, namespace, call.overwrite)
            missing = [i for i in idx if out[i] is None]
            if call.overwrite:
                hits = [i for i in idx if out[i] is not None]
                if hits:
                    vers = [0] * len(ks)
                    for i, v in zip(idx, call.versions, strict=True):
                        vers[i] = v
                    yield from newest_reads(router, ks, out, vers, hits, served, namespace, intos, seen)
            if missing:
                tombs = {i: t for i, t in zip(idx, call.tombs, strict=True) if t}
                yield from fallback_reads(router, ks, out, missing, served, namespace, intos, tombs)
    return out


def read_elsewhere(router: Router, keys: list[bytes], served: NodeAddress, *, namespace: str,
                   intos: list[Any] | None = None) -> Op:
    """``keys`` were misses on replica ``served`` (a one-sided read): the read fallback and repair
    of ``get``/``get_many``, over TCP."""
    out: list[Any] = [None] * len(keys)
    yield from fallback_reads(router, keys, out, list(range(len(keys))), served, namespace, intos)
    return out


def keyed_batch(router: Router, op: Opcode, keys: Iterable[bytes | str], *, namespace: str, field_name: str,
                is_write: bool = False, extra: dict[str, Any] | None = None) -> Op:
    """exists_many / pin / unpin: one list result (or count) per owner, merged."""
    ks = [as_key(k) for k in keys]
    if not ks:
        return [] if field_name == "ex" else 0
    groups = group_by_replicas(router, ks)
    parts = []
    for _, idx in groups:
        call = SimpleCall(op, _ns({"ks": [ks[i] for i in idx], **(extra or {})}, namespace), field_name)
        parts.append(write(router, call, ks[idx[0]]) if is_write else _result(read(router, call, ks[idx[0]])))
    results = yield from gather(parts)
    if field_name != "ex":
        return sum(int(r) for r in results)
    out: list[bool] = [False] * len(ks)
    for (_, idx), res in zip(groups, results, strict=True):
        for i, r in zip(idx, res, strict=True):
            out[i] = bool(r)
    return out


def _result(op: Op) -> Op:
    """The result of a ``read`` without the node that answered."""
    result, _ = yield from op
    return result


def lookup_prefix(router: Router, keys: Iterable[bytes | str], *, namespace: str, lease: float) -> Op:
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
        while j < len(ks) and j - i < BATCH_KEYS and tuple(router.replicas(ks[j])) == owner:
            j += 1
        call = SimpleCall(Opcode.LOOKUP_PREFIX, _ns({"ks": ks[i:j], "lease": lease}, namespace), "n")
        n, _ = yield from read(router, call, ks[i])
        total += int(n)
        if n < j - i:
            break
        i = j
    return total


def delete(router: Router, key: bytes | str, *, namespace: str) -> Op:
    """A versioned delete: stamped like a write (the same version on every replica), it leaves a
    tombstone there that refuses older writes and makes reads not bring an older value back."""
    k = as_key(key)
    meta = _ns({"k": k, "ver": CLOCK.next()}, namespace)
    # every live owner must take its tombstone where the namespace's acks are "all" (``DeleteCall``), and in a
    # write-once namespace every owner the map names (``every_owner``)
    reply = yield from write(router, DeleteCall(meta), k, every=every_owner)
    return bool(reply.get("d"))


def every_owner(reply: dict[str, Any]) -> bool:
    """Whether a delete's reply says no owner may be skipped: in a write-once namespace (the reply
    has no "ow") reads trust the one replica that answers, so a delete is acknowledged only once
    every owner of the slot has its tombstone (the control-plane simulator drives this too)."""
    return not reply.get("ow")


def stats(router: Router) -> Op:
    nodes = router.all_nodes()
    results = yield from gather([call_node(router, n, SimpleCall(Opcode.STATS, {}, "stats")) for n in nodes])
    if len(nodes) == 1:
        return results[0]
    return {"nodes": {str(n): r for n, r in zip(nodes, results, strict=True)}}


def ping(router: Router) -> Op:
    return (yield from gather([call_node(router, n, SimpleCall(Opcode.PING, {})) for n in router.all_nodes()]))
