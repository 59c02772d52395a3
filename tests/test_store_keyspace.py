"""Store helpers used by the RESP front end: peek, set_expiry, ttl_left, scan, count."""

from __future__ import annotations

import math

from memkv.engine import Store
from memkv.engine.clock import ManualClock


def make(tmp_path) -> tuple[Store, ManualClock]:
    clock = ManualClock()
    return Store(memory=4 << 20, shm_dir=str(tmp_path), clock=clock, quarantine_s=0), clock


def test_peek_does_not_count_an_access(tmp_path) -> None:
    s, _ = make(tmp_path)
    s.put(b"k", b"v", namespace="shared")
    assert s.peek(b"k", namespace="shared").length == 1
    assert s.peek(b"x", namespace="shared") is None
    assert s.stats()["namespaces"]["shared"]["hits"] == 0
    assert s.stats()["namespaces"]["shared"]["misses"] == 0
    s.close()


def test_expiry_and_ttl(tmp_path) -> None:
    s, clock = make(tmp_path)
    s.put(b"k", b"v", namespace="session", tenant="a")
    assert s.ttl_left(b"k", namespace="session", tenant="a") == math.inf
    assert s.ttl_left(b"k", namespace="session", tenant="b") is None  # tenant-scoped
    assert s.set_expiry(b"k", 10, namespace="session", tenant="a")
    assert s.ttl_left(b"k", namespace="session", tenant="a") == 10
    assert s.set_expiry(b"k", None, namespace="session", tenant="a")
    assert s.ttl_left(b"k", namespace="session", tenant="a") == math.inf
    s.set_expiry(b"k", 5, namespace="session", tenant="a")
    clock.advance(6)
    assert s.expire() == 1
    assert s.ttl_left(b"k", namespace="session", tenant="a") is None
    assert not s.set_expiry(b"k", 5, namespace="session", tenant="a")
    s.put(b"z", b"v", namespace="shared")
    assert s.set_expiry(b"z", 0, namespace="shared")  # <= 0 deletes now
    assert s.peek(b"z", namespace="shared") is None
    s.close()


def test_scan_visits_every_key_once_and_respects_scope(tmp_path) -> None:
    s, _ = make(tmp_path)
    for i in range(50):
        s.put(b"s%d" % i, b"v", namespace="shared")
        s.put(b"a%d" % i, b"v", namespace="session", tenant="a")
    s.put(b"b0", b"v", namespace="session", tenant="b")
    seen: list[bytes] = []
    cursor = 0
    while True:
        cursor, keys = s.scan(namespace="shared", after=cursor, count=7)
        seen += keys
        if cursor == 0:
            break
        s.put(b"new%d" % cursor, b"v", namespace="session", tenant="a")  # writes during the scan
    assert sorted(seen) == sorted(b"s%d" % i for i in range(50))
    _, keys = s.scan(namespace="session", tenant="b", count=1000)
    assert keys == [b"b0"]
    _, keys = s.scan(namespace="shared", count=1000, match=lambda k: k.endswith(b"7"))
    assert sorted(keys) == [b"s17", b"s27", b"s37", b"s47", b"s7"]
    assert s.count(namespace="shared") == 50
    assert s.count(namespace="session", tenant="b") == 1
    s.close()
