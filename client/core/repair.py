"""Cluster reads that do not trust one replica: fallback on a miss, newest version, read repair.

Replicas are written independently by the client (``dispatch.write``), so a
replica that was down, fenced or unreachable during a write does not have it,
and one that missed an overwrite still holds the older value. Reads make up
for it (docs/cluster.md, consistency):

- **fallback** (``fallback_reads``): a miss on the replica that answered is
  asked again of the slot's other replicas, in order, before it is a miss;
- **newest version** (``newest_reads``): in an overwritable namespace the
  other replicas are asked for their versions only (``EXISTS_MANY`` + ``v``:
  no values move), and a newer value is fetched from whoever has it;
- **read repair** (``repair``): the value found is stored back, with its
  version, on every replica that missed it or is behind; the node keeps the
  newer of what it has and the repair, so a repair never replaces a value
  written meanwhile. Values without a version go store-if-absent.

All of it is best effort: a replica that does not answer is skipped, and
the read returns the newest of those that did. Write-once namespaces (KV
blocks) never need the version comparison: a value cannot change.
"""

from __future__ import annotations

from typing import Any

from memkv.client.buffers import byte_view
from memkv.client.core.calls import Call, GetManyCall, PutManyCall, SimpleCall
from memkv.client.core.dispatch import call_node, read
from memkv.client.core.requests import Op, Parallel
from memkv.client.core.routing import Router
from memkv.client.url import NodeAddress
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.opcodes import Op as Opcode

State = tuple[int, int]  # what a probed replica holds of a key: (value version, tombstone version), 0: none


def report_corrupt(router: Router, call: Call, namespace: str) -> Op:
    """Tell the owners about values whose bytes did not match their checksum (best effort;
    the caller already sees a miss)."""
    for bad in call.corrupt:
        meta: dict[str, Any] = {"k": bad.key, "gen": bad.generation}
        if namespace != "shared":
            meta["ns"] = namespace
        try:
            yield from read(router, SimpleCall(Opcode.REPORT_CORRUPT, meta), bad.key)
        except MemKVError:
            pass


def learn_overwritable(router: Router, namespace: str, overwrite: bool) -> None:
    """Remember what a reply said of ``namespace`` (marked "ow": replicas may disagree)."""
    if overwrite:
        router.overwritable.add(namespace)
    else:
        router.overwritable.discard(namespace)


def probe_targets(router: Router, keys: list[bytes], idx: list[int],
                  served: NodeAddress | None = None) -> dict[NodeAddress, list[int]]:
    """Per replica other than the one that served the read (None: not known yet, so each key's
    first replica, which the read goes to): the indices to ask the versions of."""
    by_node: dict[NodeAddress, list[int]] = {}
    for i in idx:
        nodes = router.replicas(keys[i])
        for n in (nodes[1:] if served is None else nodes):
            if n != served:
                by_node.setdefault(n, []).append(i)
    return by_node


def probe_ops(router: Router, probes: dict[NodeAddress, list[int]], keys: list[bytes], namespace: str) -> list[Op]:
    """``EXISTS_MANY`` + ``v``: the versions a replica holds (0: none) and, of the keys it does not
    hold, its tombstones' versions (``dvs``); no values."""
    ops = []
    for node, idx in probes.items():
        m: dict[str, Any] = {"ks": [keys[i] for i in idx], "v": True}
        if namespace != "shared":
            m["ns"] = namespace
        ops.append(call_node(router, node, SimpleCall(Opcode.EXISTS_MANY, m)))
    return ops


def probe_results(probes: dict[NodeAddress, list[int]], replies: list[Any]) -> dict[NodeAddress, dict[int, State]]:
    """node -> index -> (version, tombstone version), for the probes that answered (a failed probe
    is skipped)."""
    seen: dict[NodeAddress, dict[int, State]] = {}
    for (node, idx), reply in zip(probes.items(), replies, strict=True):
        vers = reply.get("vers") if isinstance(reply, dict) else None
        if isinstance(vers, list) and len(vers) == len(idx):
            dvs = reply.get("dvs")
            if not (isinstance(dvs, list) and len(dvs) == len(idx)):
                dvs = [0] * len(idx)
            seen[node] = {i: (int(v), int(t)) for i, v, t in zip(idx, vers, dvs, strict=True)}
    return seen


def fallback_reads(router: Router, keys: list[bytes], out: list[Any], missing: list[int],
                   served: NodeAddress | None, namespace: str, intos: list[Any] | None,
                   tombs: dict[int, int] | None = None) -> Op:
    """``out[i]`` for ``i`` in ``missing`` was a miss from replica ``served``: ask the slot's
    other replicas, in order, before answering a miss, then repair what was found onto every
    replica that answered a miss for it.

    Misses carry the key's tombstone version (``tombs``: index -> version, from ``served``; None:
    not known, a one-sided read, then ``served`` is asked for them). A value no newer than a
    tombstone seen is not returned -- its delete stands -- and its holder is sent the tombstone
    (``DELETE_MANY`` with the delete's version), so that a replica that missed a delete neither
    answers with the old value nor gets it copied back to the others."""
    missed: dict[NodeAddress, list[int]] = {}  # node -> indices it answered a miss for
    versions: dict[int, int] = {}  # index -> version of the value found
    dead: dict[int, int] = {i: t for i, t in (tombs or {}).items() if t}  # index -> newest tombstone seen
    holders: dict[int, list[NodeAddress]] = {}  # index -> nodes that answered with a value
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
            res = yield from call_node(router, node, call)
        except MemKVError:
            continue
        found = set()
        for i, r, v, t in zip(ask, res, call.versions, call.tombs, strict=True):
            if r is None:
                missed.setdefault(node, []).append(i)
                if t > dead.get(i, 0):
                    dead[i] = t
            else:
                holders.setdefault(i, []).append(node)
                if i in dead and v <= dead[i]:
                    continue  # older than a delete: not an answer; the holder gets the tombstone below
                out[i] = r
                versions[i] = v
                found.add(i)
        if call.corrupt:
            yield from report_corrupt(router, call, namespace)
        left = [i for i in left if i not in found]
    if tombs is None and served is not None and versions:
        # a one-sided miss says nothing of tombstones: ask ``served`` before trusting what was found
        idx = list(versions)
        replies = yield Parallel(probe_ops(router, {served: idx}, keys, namespace))
        for i, (_v, t) in probe_results({served: idx}, replies).get(served, {}).items():
            if t:
                dead[i] = max(dead.get(i, 0), t)
    for i in list(versions):
        if i in dead and versions[i] <= dead[i]:
            out[i] = None
            del versions[i]
    yield from repair(router, missed, keys, out, versions, namespace, intos)
    stale: dict[NodeAddress, list[int]] = {}
    for i, nodes in holders.items():
        if i in dead and out[i] is None:
            for n in nodes:
                stale.setdefault(n, []).append(i)
    yield from bury(router, stale, keys, dead, namespace)


def bury(router: Router, stale: dict[NodeAddress, list[int]], keys: list[bytes], dead: dict[int, int],
         namespace: str) -> Op:
    """Send each node listed for ``i`` the tombstone of ``keys[i]`` (``DELETE_MANY`` with version
    ``dead[i]``; best effort). The node keeps a value newer than the delete."""
    for node, idx in stale.items():
        m: dict[str, Any] = {"ks": [keys[i] for i in idx], "vers": [dead[i] for i in idx]}
        if namespace != "shared":
            m["ns"] = namespace
        try:
            yield from call_node(router, node, SimpleCall(Opcode.DELETE_MANY, m, "ds"))
        except MemKVError:
            pass


def repair(router: Router, stale: dict[NodeAddress, list[int]], keys: list[bytes], out: list[Any],
           versions: dict[int, int], namespace: str, intos: list[Any] | None) -> Op:
    """Store ``out[i]`` with its version on each node listed for ``i`` (best effort). The node keeps
    whichever of its value and the repair is newer, so a repair never replaces a value written
    meanwhile; values without a version (0) go store-if-absent (``nx``)."""
    for node, idx in stale.items():
        fix = [i for i in idx if out[i] is not None]
        if not fix:
            continue
        vals = [out[i] if intos is None else bytes(byte_view(intos[i])[:out[i]]) for i in fix]
        vers = [versions.get(i, 0) for i in fix]
        extra: dict[str, Any] = {"vers": vers} if all(vers) else {"nx": True}
        try:
            yield from call_node(router, node, PutManyCall([keys[i] for i in fix], vals, namespace=namespace,
                                                            ttl=None, pin=False, extra=extra))
        except MemKVError:
            pass


def newest_reads(router: Router, keys: list[bytes], out: list[Any], versions: list[int], hits: list[int],
                 served: NodeAddress | None, namespace: str, intos: list[Any] | None,
                 seen: dict[NodeAddress, dict[int, State]] | None = None) -> Op:
    """For the keys in ``hits`` (``out[i]`` read from ``served`` with ``versions[i]``) of an
    overwritable namespace: fetch the value from a replica that has a newer one, and repair
    the newest onto every replica that is behind. A replica whose tombstone is newer than every
    value makes the read a miss (``out[i]`` None) and the replicas holding older values get the
    tombstone. ``seen``: states already probed alongside the read (node -> index -> (version,
    tombstone version)); asked here when not given."""
    newest: dict[int, tuple[int, Any]] = {i: (versions[i], served) for i in hits}  # i -> (version, node)
    if seen is None:
        probes = probe_targets(router, keys, hits, served)
        seen = probe_results(probes, (yield Parallel(probe_ops(router, probes, keys, namespace)))) if probes else {}
    dead: dict[int, int] = {}  # index -> the newest tombstone, where it beats every value
    for node, held in seen.items():
        if node == served:
            continue
        for i in hits:
            v, t = held.get(i, (0, 0))
            if v > newest[i][0]:
                newest[i] = (v, node)
            if t > dead.get(i, 0):
                dead[i] = t
    dead = {i: t for i, t in dead.items() if t >= newest[i][0]}
    if dead:
        stale: dict[NodeAddress, list[int]] = {}
        for i in dead:
            out[i] = None
            if served is not None:
                stale.setdefault(served, []).append(i)
            for node, held in seen.items():
                if node != served and held.get(i, (0, 0))[0]:
                    stale.setdefault(node, []).append(i)
        hits = [i for i in hits if i not in dead]
        yield from bury(router, stale, keys, dead, namespace)
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
            res = yield from call_node(router, node, call)
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
            yield from report_corrupt(router, call, namespace)
    final = {i: got.get(i, versions[i]) for i in hits}
    behind: dict[NodeAddress, list[int]] = {}
    for i in hits:
        if final[i] > versions[i] and served is not None:
            behind.setdefault(served, []).append(i)
        for node, held in seen.items():
            if node != served and i in held and max(held[i]) < final[i] and node != newest[i][1]:
                behind.setdefault(node, []).append(i)
    yield from repair(router, behind, keys, out, final, namespace, intos)
