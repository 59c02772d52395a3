"""An in-memory etcd with the semantics memkv relies on, on simulated time.

Same methods, arguments and results as the etcd adapter (``memkv.client.etcd.Etcd``): ``get``,
``get_prefix``, ``put`` (optionally on a lease), ``delete``, ``create`` (put if absent),
``put_if`` (compare the key's mod revision and optionally another key's value: the rebalancer's
publish on the map's revision and its own leadership), ``delete_if``, ``grant``/``keepalive``/
``revoke``. Every write takes the next store revision; leases expire ``ttl`` seconds after their
last renewal (and, as etcd does after a restart, get a whole new TTL when etcd comes back up);
watchers hear every committed change in revision order. Calls reach it through the network model
(``memkv.cluster.sim.net``): that is where latency, timeouts and outages are; a method called
here while etcd is down raises ``EtcdUnavailable``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memkv.client.etcd import KV, EtcdUnavailable
from memkv.cluster.sim.loop import Loop

Watcher = Callable[[int, str, "bytes | None"], None]


@dataclass
class _Rec:
    value: bytes
    create_rev: int
    mod_rev: int
    lease: int | None


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[str]


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


class SimEtcd:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.rev = 1
        self.kvs: dict[str, _Rec] = {}
        self.leases: dict[int, _Lease] = {}
        self.up = True
        self._next_lease = 0x7E000000
        self.watchers: list[Watcher] = []
        self.writes = 0
        self.bytes_written = 0  # keys + values of every committed put

    # -- internals
    def _check_up(self) -> None:
        if not self.up:
            raise EtcdUnavailable("etcd (simulated) is down")

    def _commit(self, key: str, value: bytes | None, lease: int | None = None) -> None:
        self.rev += 1
        if value is None:
            rec = self.kvs.pop(key, None)
            if rec is not None and rec.lease is not None and rec.lease in self.leases:
                self.leases[rec.lease].keys.discard(key)
        else:
            old = self.kvs.get(key)
            if old is not None and old.lease is not None and old.lease in self.leases:
                self.leases[old.lease].keys.discard(key)
            self.kvs[key] = _Rec(value, old.create_rev if old is not None else self.rev, self.rev, lease)
            if lease is not None:
                self.leases[lease].keys.add(key)
            self.writes += 1
            self.bytes_written += len(key) + len(value)
        for w in list(self.watchers):
            w(self.rev, key, value)

    def _kv(self, key: str) -> KV | None:
        rec = self.kvs.get(key)
        return KV(key, rec.value, rec.mod_rev) if rec is not None else None

    # -- keys
    def get(self, key: str) -> tuple[KV | None, int]:
        self._check_up()
        return self._kv(key), self.rev

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        self._check_up()
        return [KV(k, r.value, r.mod_rev) for k, r in sorted(self.kvs.items()) if k.startswith(prefix)], self.rev

    def put(self, key: str, value: bytes | str, *, lease: int | None = None) -> None:
        self._check_up()
        if lease is not None and lease not in self.leases:
            raise EtcdUnavailable(f"etcd: requested lease {lease:x} not found")
        self._commit(key, _b(value), lease)

    def delete(self, key: str) -> bool:
        self._check_up()
        if key not in self.kvs:
            return False
        self._commit(key, None)
        return True

    def create(self, key: str, value: bytes | str, *, lease: int | None = None) -> bool:
        self._check_up()
        if key in self.kvs:
            return False
        self.put(key, value, lease=lease)
        return True

    def put_if(self, key: str, value: bytes | str, *, mod_revision: int | None,
               guard: tuple[str, bytes | str] | None = None) -> bool:
        self._check_up()
        rec = self.kvs.get(key)
        if mod_revision is not None and (rec.mod_rev if rec is not None else 0) != mod_revision:
            return False
        if guard is not None:
            g = self.kvs.get(guard[0])
            if g is None or g.value != _b(guard[1]):
                return False
        self._commit(key, _b(value), None)  # a put in a transaction carries no lease (as the adapter's)
        return True

    def delete_if(self, key: str, value: bytes | str) -> bool:
        self._check_up()
        rec = self.kvs.get(key)
        if rec is None or rec.value != _b(value):
            return False
        self._commit(key, None)
        return True

    # -- leases
    def grant(self, ttl: int) -> int:
        self._check_up()
        self._next_lease += 1
        lid = self._next_lease
        self.leases[lid] = _Lease(int(ttl), self.loop.now + ttl, set())
        self.loop.call_at(self.loop.now + ttl, self._expire, lid)
        return lid

    def keepalive(self, lease_id: int) -> int:
        self._check_up()
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        lease.expires = self.loop.now + lease.ttl
        self.loop.call_at(lease.expires, self._expire, lease_id)
        return lease.ttl

    def revoke(self, lease_id: int) -> None:
        self._check_up()
        self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        for key in sorted(lease.keys):
            if key in self.kvs:
                self._commit(key, None)

    def _expire(self, lease_id: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is None or not self.up or lease.expires > self.loop.now:
            return
        self._drop_lease(lease_id)

    # -- faults
    def set_up(self, up: bool) -> None:
        """Down: every call fails. Back up: leases are renewed for a whole TTL (etcd extends
        every lease when a leader is elected, so clients get the time to renew)."""
        if up and not self.up:
            for lid, lease in sorted(self.leases.items()):
                lease.expires = max(lease.expires, self.loop.now + lease.ttl)
                self.loop.call_at(lease.expires, self._expire, lid)
        self.up = up
