"""The node's operations on its store: one function per kind of request, for every front end.

A request reaches these only after the pipeline's stages admitted it
(memkv/server/pipeline.py): the session may do it, the node owns its keys, the
tenant is within its limits, flash-only values were promoted. What is left is
the engine work, written once: the binary connection and the RESP connection
both call it with typed requests (memkv/server/requests.py) and turn the
typed results into their own replies.

Writes are two steps so that a value's bytes are written exactly once, from
the socket into the region: ``reserve`` makes room for every value of a
:class:`Put` (a :class:`PutPlan`), the connection receives the payload
straight into the reservations, ``commit`` indexes them.
"""

from __future__ import annotations

import math

from memkv.engine.checksum import checksum
from memkv.engine.entry import Entry
from memkv.engine.store import Reservation, Store
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.versions import newer
from memkv.server.requests import (
    Count,
    Delete,
    Expire,
    Flush,
    Get,
    Keyspace,
    LookupPrefix,
    Peek,
    Pin,
    Put,
    ReportCorrupt,
    Scan,
    TimeToLive,
    Unpin,
)
from memkv.server.session import Session

MAX_LEASE_S = 3600.0


class PutPlan:
    """Where each value of a :class:`Put` goes: a reservation, or None (its bytes are discarded)."""

    __slots__ = ("request", "tenant", "reservations", "errors")

    def __init__(self, request: Put, tenant: str) -> None:
        self.request = request
        self.tenant = tenant
        self.reservations: list[Reservation | None] = []
        self.errors: list[MemKVError | None] = []

    def views(self) -> list[memoryview | None]:
        """Per value: where its bytes go (None: discard them)."""
        return [None if r is None else r.view for r in self.reservations]


# A put's result, per key: (the entry now stored | None when not written, its error, old value for SET GET)
Written = tuple[Entry | None, MemKVError | None, bytes | None]


class Operations:
    """The engine work of each kind of request (synchronous: only the stages wait)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def owner(self, session: Session, req: Put) -> str:
        """The tenant a write is stored for (the grants stage checked who may set ``owner``)."""
        return session.tenant if req.owner is None else req.owner

    # -- reads
    def get(self, session: Session, req: Get) -> list[tuple[memoryview, Entry] | None]:
        store = self.store
        get, view, ns, tenant = store.get, store.view, req.ns, session.tenant
        private, expose = req.private, req.expose
        out: list[tuple[memoryview, Entry] | None] = []
        for i, key in enumerate(req.keys):
            e = get(key, namespace=ns, tenant=tenant)
            if e is None:
                out.append(None)
                t = store.tombstone(key, namespace=ns, tenant=tenant)
                if t:
                    if req.tombs is None:
                        req.tombs = {}
                    req.tombs[i] = t
            elif e.offset >= 0:
                if expose:
                    store.expose(e)
                out.append((view(e), e))
            elif private is not None and i in private:
                out.append((private[i], e))  # read from flash into a private buffer (no room)
            else:
                out.append(None)  # flash-only and its promotion failed (damaged): a miss
        return out

    def peek(self, session: Session, req: Peek) -> list[Entry | None]:
        store, ns, tenant = self.store, req.ns, session.tenant
        out = [store.peek(k, namespace=ns, tenant=tenant) for k in req.keys]
        if req.versions:
            tombs = {i: t for i, (k, e) in enumerate(zip(req.keys, out, strict=True))
                     if e is None and (t := store.tombstone(k, namespace=ns, tenant=tenant))}
            req.tombs = tombs or None
        return out

    def ttl(self, session: Session, req: TimeToLive) -> list[float | None]:
        left, ns, tenant = self.store.ttl_left, req.ns, session.tenant
        return [left(k, namespace=ns, tenant=tenant) for k in req.keys]

    def lookup_prefix(self, session: Session, req: LookupPrefix) -> int:
        if req.lease > MAX_LEASE_S:
            raise InvalidArgument("lease longer than an hour")
        return self.store.lookup_prefix(req.keys, namespace=req.ns, tenant=session.tenant, lease_s=req.lease)

    def scan(self, session: Session, req: Scan) -> tuple[int, list[bytes]]:
        return self.store.scan(namespace=req.ns, tenant=session.tenant, after=max(req.cursor, 0), count=req.count,
                               match=req.match)

    def count(self, session: Session, req: Count) -> int:
        return self.store.count(namespace=req.ns, tenant=session.tenant)

    def keyspace(self, session: Session, req: Keyspace) -> list[tuple[str, int]]:
        """What :meth:`count` answers for each namespace the session may read."""
        return [(ns, self.store.count(namespace=ns, tenant=session.tenant)) for ns in req.namespaces
                if session.may(ns, "r")]

    def report_corrupt(self, session: Session, req: ReportCorrupt) -> bool:
        store = self.store
        entry = store.get(req.keys[0], namespace=req.ns, tenant=session.tenant)
        if entry is None or entry.generation != req.generation:
            return False
        # Re-verify on the node: a reader's report alone must not let one client delete another's data.
        if checksum(store.view(entry)) == entry.checksum:
            return False
        store.report_corrupt(entry)
        return True

    # -- writes
    def reserve(self, session: Session, req: Put) -> PutPlan:
        """Room for every value of ``req``. A single put raises its error; a batch records it per
        value (that value's bytes are then discarded)."""
        store = self.store
        ns, tenant = req.ns, self.owner(session, req)
        n = len(req.keys)
        vers = req.versions or [0] * n
        for v in vers:
            if v and not store.versions.plausible(v):  # 0: none (the store assigns one)
                raise InvalidArgument(f"write version {v} is too far in the future (node clock + 5 min)")
        parents = req.parents or [None] * n
        plan = PutPlan(req, tenant)
        ttl = req.effective_ttl()
        skip_existing = req.cond == "nx" or req.copies
        try:
            for key, length, cs, parent, ver in zip(req.keys, req.lengths, req.checksums, parents, vers,
                                                     strict=True):
                cur = store.peek(key, namespace=ns, tenant=tenant) if skip_existing or cs is None else None
                if (skip_existing and cur is not None and (req.cond == "nx" or not newer(ver, cs or 0, cur.version,
                                                                                           cur.checksum))) or (
                        req.copies and cur is None and 0 < ver <= store.tombstone(key, namespace=ns, tenant=tenant)):
                    # already there (nx), or a copy no newer than what the node holds (a value or a
                    # tombstone): Store.commit would drop it, so take no room for it -- a copy onto a
                    # node whose flash is full must not fail on values it already has. (A client's
                    # retried write still goes through commit: its reply waits until the value it
                    # repeats is on disk.)
                    plan.reservations.append(None)
                    plan.errors.append(None)
                    continue
                if cs is None:  # bytes still to arrive: the same bytes as the current value are fine
                    cs = cur.checksum if cur is not None and cur.length == length else 0
                try:
                    res = store.reserve(key, length, namespace=ns, tenant=tenant, checksum=cs, ttl=ttl,
                                        pin=req.pin, parent=parent, version=ver, dram_only=req.dram_only,
                                        copy=req.copies)
                except MemKVError as exc:
                    if req.single:
                        raise
                    plan.reservations.append(None)
                    plan.errors.append(exc)
                else:
                    plan.reservations.append(res)
                    plan.errors.append(None)
        except BaseException:
            self.abort(plan)
            raise
        return plan

    def abort(self, plan: PutPlan) -> None:
        for res in plan.reservations:
            if res is not None:
                self.store.abort(res)
        plan.reservations = [None] * len(plan.reservations)

    def commit(self, plan: PutPlan) -> list[Written]:
        """Index the received values. Per value: the entry now stored (newer than the write's own
        when the write was superseded: ``Store.commit``), or None when a condition kept it out."""
        store = self.store
        req = plan.request
        out: list[Written] = []
        for i, res in enumerate(plan.reservations):
            err = plan.errors[i]
            if res is None:
                out.append((None, err, None))
                continue
            plan.reservations[i] = None
            old = store.peek(res.key, namespace=res.namespace, tenant=res.tenant) \
                if req.cond or req.keep_ttl or req.get_old else None
            old_value = bytes(store.view(old)) if req.get_old and old is not None else None
            if (req.cond == "nx" and old is not None) or (req.cond == "xx" and old is None):
                store.abort(res)  # (nx: a client write landed while a copy's payload was arriving)
                out.append((None, None, old_value))
                continue
            # (RESP SET options may come after a value that was streamed into its reservation)
            keep = req.keep_ttl and old is not None and old.expires is not None
            res.ttl = req.effective_ttl(max(old.expires - store.now(), 1e-6) if keep else None)
            if req.checksums[i] is None:
                res.checksum = checksum(res.view)
            try:
                entry = store.commit(res)
            except MemKVError as exc:
                if req.single:
                    raise
                out.append((None, exc, old_value))
            else:
                out.append((entry, None, old_value))
        return out

    def delete(self, session: Session, req: Delete) -> list[bool]:
        """Versioned deletes (``Store.delete``): tombstones; a value newer than its delete stays."""
        store, ns = self.store, req.ns
        tenant = session.tenant if req.owner is None else req.owner  # (the grants stage checked ``owner``)
        vers = req.versions or [0] * len(req.keys)
        for v in vers:
            if v and not store.versions.plausible(v):
                raise InvalidArgument(f"delete version {v} is too far in the future (node clock + 5 min)")
        return [store.delete(k, namespace=ns, tenant=tenant, version=v) for k, v in zip(req.keys, vers, strict=True)]

    def pin(self, session: Session, req: Pin) -> int:
        return self.store.pin(req.keys, namespace=req.ns, tenant=session.tenant, ttl=req.ttl)

    def unpin(self, session: Session, req: Unpin) -> int:
        return self.store.unpin(req.keys, namespace=req.ns, tenant=session.tenant)

    def expire(self, session: Session, req: Expire) -> bool:
        store, key, ns, tenant = self.store, req.keys[0], req.ns, session.tenant
        e = store.peek(key, namespace=ns, tenant=tenant)
        if e is None:
            return False
        if req.persist:
            if e.expires is None:
                return False
            return store.set_expiry(key, None, namespace=ns, tenant=tenant)
        ttl = req.ttl if req.ttl is not None else math.inf
        cur = math.inf if e.expires is None else e.expires - store.now()
        when = req.when
        if ("nx" in when and e.expires is not None) or ("xx" in when and e.expires is None) or (
                "gt" in when and not ttl > cur) or ("lt" in when and not ttl < cur):
            return False
        return store.set_expiry(key, ttl if ttl > 0 else 0.0, namespace=ns, tenant=tenant)

    def flush(self, session: Session, req: Flush) -> list[bytes]:
        """Delete the namespace's keys visible to the session; the keys deleted."""
        store, ns, tenant = self.store, req.ns, session.tenant
        _, keys = store.scan(namespace=ns, tenant=tenant, after=0, count=1 << 62)
        return [k for k in keys if store.delete(k, namespace=ns, tenant=tenant)]
