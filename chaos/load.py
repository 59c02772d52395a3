"""The load generator: worker threads, each with its own cluster ``SyncClient``, every
operation recorded in a :class:`~chaos.history.Recorder`.

The mix: new write-once keys in a durable namespace (``blocks``), overwrites of a
few hot keys in a durable overwrite namespace (``session``), and reads of keys
that had an acknowledged write. Every value is unique (key, writer, sequence
number in its first bytes), so a checksum names exactly one write.

``LoadConfig.deletes`` (``DELETES``, 0.1, by default; ``--set deletes=0`` turns them off) of the
writes are deletes of a key that had an acknowledged write -- write-once ``blocks`` keys and the
hot ``session`` keys, which are then written again: the history checker's "no resurrected
delete" invariant judges them (docs/chaos.md, "Deletes in the load").
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field

from chaos.history import Op, Recorder, crc
from memkv.client import SyncClient
from memkv.errors import MemKVError

BLOCKS_NS = "blocks"    # durable, write-once
DELETES = 0.1  # the load's default fraction of deletes among its writes
SESSION_NS = "session"  # durable, overwrite = true

NODE_CONFIG = """\
[cluster]
replicas = {replicas}
lease_ttl = {lease_ttl}
anti_entropy_interval = {anti_entropy_interval}

[namespaces.blocks]
durability = "durable"
replicas = {replicas}
overwrite = false

[namespaces.session]
durability = "durable"
replicas = {replicas}
overwrite = true
"""


def make_value(key: str, tag: str, size: int) -> bytes:
    head = f"{key}|{tag}|".encode()
    pad = hashlib.blake2b(head, digest_size=32).digest()
    body = (pad * (size // len(pad) + 1))[: max(0, size - len(head))]
    return head + body


@dataclass
class LoadConfig:
    workers: int = 2
    rate: float = 40.0          # ops/s per worker
    value_size: int = 1024
    read_ratio: float = 0.5
    overwrite_ratio: float = 0.2  # of the writes: overwrite a hot key instead of a new key
    hot_keys: int = 16
    deletes: float = DELETES    # of the writes: delete a key that had an acknowledged write
    timeout: float = 1.5        # per-operation client timeout
    run_id: str = field(default_factory=lambda: f"{int(time.time()) % 100000:05d}{random.randrange(1 << 12):03x}")


def classify(exc: BaseException) -> str:
    return type(exc).__name__


class LoadGenerator:
    def __init__(self, url: str, recorder: Recorder, cfg: LoadConfig | None = None, *, first_wid: int = 0) -> None:
        self.url = url
        self.first_wid = first_wid  # worker ids (and key names) of this generator start here
        self.rec = recorder
        self.cfg = cfg or LoadConfig()
        self.stop_ev = threading.Event()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.acked_keys: list[tuple[str, str]] = []  # (ns, key) with >= 1 acknowledged put
        self._acked_set: set[tuple[str, str]] = set()
        self.written: set[tuple[str, str]] = set()   # every (ns, key) a put was attempted for
        self.connect_errors = 0

    # -- life cycle
    def start(self) -> LoadGenerator:
        for i in range(self.first_wid, self.first_wid + self.cfg.workers):
            t = threading.Thread(target=self._worker, args=(i,), name=f"chaos-load-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout)

    def wait_ops(self, n: int, timeout: float = 30.0) -> None:
        """Until at least ``n`` writes were acknowledged (so reads have something to read)."""
        deadline = time.monotonic() + timeout
        while len(self.acked_keys) < n and time.monotonic() < deadline and not self.stop_ev.is_set():
            time.sleep(0.05)

    # -- one worker
    def _connect(self) -> SyncClient | None:
        delay = 0.2
        while not self.stop_ev.is_set():
            try:
                return SyncClient.connect(self.url, transport="tcp", timeout=self.cfg.timeout)
            except (MemKVError, OSError):
                self.connect_errors += 1
                self.stop_ev.wait(delay)
                delay = min(2.0, delay * 2)
        return None

    def _worker(self, wid: int) -> None:
        cfg = self.cfg
        rnd = random.Random(f"{cfg.run_id}-{wid}")
        client = self._connect()
        if client is None:
            return
        seq = 0
        next_at = time.monotonic()
        try:
            while not self.stop_ev.is_set():
                if cfg.rate > 0:
                    now = time.monotonic()
                    if now < next_at:
                        self.stop_ev.wait(next_at - now)
                        continue
                    next_at = max(next_at + 1.0 / cfg.rate, now - 1.0)
                if self.acked_keys and rnd.random() < cfg.read_ratio:
                    with self._lock:
                        ns, key = rnd.choice(self.acked_keys[-5000:])
                    self._get(client, wid, ns, key)
                elif self.acked_keys and cfg.deletes > 0 and rnd.random() < cfg.deletes:
                    with self._lock:
                        ns, key = rnd.choice(self.acked_keys[-5000:])
                    self._delete(client, wid, ns, key)
                else:
                    seq += 1
                    if rnd.random() < cfg.overwrite_ratio:
                        ns, key = SESSION_NS, f"h/{cfg.run_id}/{rnd.randrange(cfg.hot_keys)}"
                    else:
                        ns, key = BLOCKS_NS, f"b/{cfg.run_id}/{wid}/{seq}"
                    self._put(client, wid, ns, key, make_value(key, f"w{wid}s{seq}", cfg.value_size))
        finally:
            client.close()

    def _put(self, client: SyncClient, wid: int, ns: str, key: str, value: bytes) -> None:
        with self._lock:
            self.written.add((ns, key))
        t0 = self.rec.now()
        try:
            client.put(key, value, namespace=ns)
            op = Op("put", key, t0, self.rec.now(), True, "ok", crc(value), ns, worker=wid)
            with self._lock:
                if (ns, key) not in self._acked_set:
                    self._acked_set.add((ns, key))
                    self.acked_keys.append((ns, key))
        except (MemKVError, OSError) as exc:
            op = Op("put", key, t0, self.rec.now(), False, "error", crc(value), ns, classify(exc), worker=wid)
        self.rec.add(op)

    def _delete(self, client: SyncClient, wid: int, ns: str, key: str) -> None:
        t0 = self.rec.now()
        try:
            client.delete(key, namespace=ns)
            op = Op("delete", key, t0, self.rec.now(), True, "ok", None, ns, worker=wid)
        except (MemKVError, OSError) as exc:
            op = Op("delete", key, t0, self.rec.now(), False, "error", None, ns, classify(exc), worker=wid)
        self.rec.add(op)

    def _get(self, client: SyncClient, wid: int, ns: str, key: str) -> None:
        t0 = self.rec.now()
        try:
            got = client.get(key, namespace=ns)
            t1 = self.rec.now()
            op = (Op("get", key, t0, t1, True, "miss", None, ns, worker=wid) if got is None
                  else Op("get", key, t0, t1, True, "ok", crc(got), ns, worker=wid))
        except (MemKVError, OSError) as exc:
            op = Op("get", key, t0, self.rec.now(), False, "error", None, ns, classify(exc), worker=wid)
        self.rec.add(op)


def verify(url: str, recorder: Recorder, keys: list[tuple[str, str]], *, timeout: float = 3.0,
           attempts: int = 4, batch: int = 200) -> None:
    """The ``final`` reads: every key once through a fresh client (batches; a failed
    batch is retried key by key, each key up to ``attempts`` times)."""
    with SyncClient.connect(url, transport="tcp", timeout=timeout) as c:
        by_ns: dict[str, list[str]] = {}
        for ns, k in keys:
            by_ns.setdefault(ns, []).append(k)
        for ns, ks in by_ns.items():
            for i in range(0, len(ks), batch):
                part = ks[i:i + batch]
                t0 = recorder.now()
                try:
                    vals = c.get_many(part, namespace=ns)
                except (MemKVError, OSError):
                    vals = None
                t1 = recorder.now()
                if vals is not None:
                    for k, v in zip(part, vals, strict=True):
                        recorder.add(Op("get", k, t0, t1, True, "ok" if v is not None else "miss",
                                        crc(v) if v is not None else None, ns, phase="final"))
                    continue
                for k in part:
                    for attempt in range(attempts):
                        t0 = recorder.now()
                        try:
                            v = c.get(k, namespace=ns)
                            recorder.add(Op("get", k, t0, recorder.now(), True, "ok" if v is not None else "miss",
                                            crc(v) if v is not None else None, ns, phase="final"))
                            break
                        except (MemKVError, OSError) as exc:
                            if attempt == attempts - 1:
                                recorder.add(Op("get", k, t0, recorder.now(), False, "error", None, ns,
                                                classify(exc), phase="final"))
                            else:
                                time.sleep(0.5)
