"""Timed client workloads, run by a pool of client processes with one connection each.

The driver keeps one :class:`ClientPool` per peer (spawned once, connected once)
and asks it for :class:`Sample` s: ``clients`` of its processes run the same
operation from a common start time until a time budget or an operation cap is
reached, timing every operation. Workers are separate processes so that 8
concurrent clients are not serialized by one interpreter's GIL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

# op -> what it does (single-key ops use batch=1)
OPS = {
    "put": "PUT one value (unique keys)",
    "get": "GET one value -> bytes",
    "get_into": "GET one value into a preallocated bytearray (zero-copy path)",
    "get_many": "GET a batch of keys -> list of bytes (Redis: MGET)",
    "get_many_into": "GET a batch of keys into preallocated bytearrays",
}
PEER_OPS = {
    "redis": ("put", "get", "get_many"),
    "memcached": ("put", "get", "get_many"),
    "lmcache_server": ("put", "get", "get_into", "get_many"),
    "mooncake": ("put", "get", "get_into", "get_many", "get_many_into"),
    "memkv": ("put", "get", "get_into", "get_many", "get_many_into"),
}


class Adapter(Protocol):
    name: str
    ops: frozenset[str]

    def put(self, key: bytes, value: bytes) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def get_many(self, keys: list[bytes]) -> list[bytes | None]: ...
    def put_many(self, items: list[tuple[bytes, bytes]]) -> None: ...
    def delete_many(self, keys: list[bytes]) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class PeerSpec:
    kind: str  # a PEER_OPS key
    host: str
    port: int
    transport: str = "tcp"  # memkv only
    metadata: str = ""  # mooncake only: its metadata server's URL
    # An earlier commit (bench/baseline.py): its label and the folder first on the worker's
    # sys.path, so the worker runs that commit's client.
    revision: str = ""
    pythonpath: str = ""

    @property
    def name(self) -> str:
        if self.revision:
            return f"memkv@{self.revision}"
        if self.kind == "memkv" and self.transport != "tcp":
            return f"memkv-{self.transport}"
        return self.kind

    @property
    def ops(self) -> tuple[str, ...]:
        return PEER_OPS[self.kind]

    def connect(self) -> Adapter:
        if self.kind == "redis":
            from bench.redis_peer import RedisAdapter

            return RedisAdapter(self.host, self.port)
        if self.kind == "memcached":
            from bench.memcached_peer import MemcachedAdapter

            return MemcachedAdapter(self.host, self.port)
        if self.kind == "lmcache_server":
            from bench.lmcache_server_peer import LMCacheAdapter

            return LMCacheAdapter(self.host, self.port)
        if self.kind == "mooncake":
            from bench.mooncake_peer import MooncakeAdapter

            return MooncakeAdapter(self.host, self.port, self.metadata)
        if self.pythonpath:  # before the first import of memkv in this worker process
            import sys

            sys.path.insert(0, self.pythonpath)
        from bench.memkv_peer import MemkvAdapter

        return MemkvAdapter(f"memkv://{self.host}:{self.port}", self.transport)


@dataclass(frozen=True)
class Task:
    op: str
    size: int
    batch: int  # keys per operation (1 for single-key ops)
    n_keys: int  # size of the prefilled key set that reads cycle over
    seconds: float  # time budget
    max_ops: int  # cap per worker (bounds the bytes a PUT run leaves behind)
    run_id: int
    min_ops: int = 3  # even past the time budget (big batches at 8 clients are slow on 2 cores)
    warmup: int = 1  # untimed operations per worker before the start


@dataclass
class WorkerResult:
    ops: int
    bytes: int
    t_start: float
    t_end: float
    lat_ns: bytes  # array('q') of per-operation latencies
    misses: int


@dataclass
class Sample:
    """One measurement: ``clients`` workers running ``op`` at the same time."""

    peer: str
    op: str
    size: int
    batch: int
    clients: int
    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0
    gbps: float = 0.0
    ops_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    mean_us: float = 0.0
    misses: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- keys and values --------------------------------------------------------------

_BASES: dict[int, bytes] = {}


def _base(size: int) -> bytes:
    if size not in _BASES:
        _BASES[size] = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    return _BASES[size]


def read_key(size: int, i: int) -> bytes:
    return b"bench:r:%d:%d" % (size, i)


def read_value(size: int, i: int) -> bytes:
    """Value stored under ``read_key(size, i)``: random bytes, the first 8 are ``i`` (no two alike)."""
    tag = i.to_bytes(8, "little")
    return tag[:size] + _base(size)[len(tag) :]


def n_read_keys(size: int, budget: int = 256 << 20) -> int:
    """How many keys reads cycle over: ~``budget`` bytes, between 64 and 1024 keys."""
    return max(64, min(1024, budget // size))


# --- worker process -------------------------------------------------------------------


def _check(got: bytes | bytearray | memoryview | None, size: int, i: int) -> None:
    if got is None:
        raise LookupError(f"miss on prefilled key {read_key(size, i)!r}")
    if bytes(got) != read_value(size, i):
        raise ValueError(f"wrong value for {read_key(size, i)!r} ({len(got)} bytes)")


class _Worker:
    def __init__(self, adapter: Adapter, idx: int) -> None:
        self.a = adapter
        self.idx = idx
        self.put_keys: list[bytes] = []
        self.one: Callable[[int], int] | None = None
        self.task: Task | None = None

    # each op: a closure over precomputed keys/buffers, returning the bytes moved (-1: miss)
    def prepare(self, task: Task, clients: int) -> None:
        a, size, n = self.a, task.size, task.n_keys
        offset = self.idx * n // max(clients, 1)
        keys = [read_key(size, (offset + j) % n) for j in range(n)]
        one: Callable[[int], int]
        if task.op == "put":
            value = _base(size)
            prefix = b"bench:w:%d:%d:" % (task.run_id, self.idx)
            put_keys = self.put_keys

            def one(i: int) -> int:
                key = prefix + b"%d" % i
                put_keys.append(key)
                a.put(key, value)
                return size

        elif task.op == "get":

            def one(i: int) -> int:
                v = a.get(keys[i % n])
                return -1 if v is None else len(v)

        elif task.op == "get_into":
            buf = bytearray(size)
            get_into = a.get_into  # type: ignore[attr-defined]

            def one(i: int) -> int:
                got = get_into(keys[i % n], buf)
                return -1 if got is None else int(got)

        elif task.op in ("get_many", "get_many_into"):
            b = task.batch
            batches = [[keys[(k * b + j) % n] for j in range(b)] for k in range(max(1, n // b))]
            nb = len(batches)
            if task.op == "get_many":

                def one(i: int) -> int:
                    vals = a.get_many(batches[i % nb])
                    return -1 if any(v is None for v in vals) else sum(len(v) for v in vals)  # type: ignore[arg-type]

            else:
                bufs = [bytearray(size) for _ in range(b)]
                get_many_into = a.get_many_into  # type: ignore[attr-defined]

                def one(i: int) -> int:
                    got = get_many_into(batches[i % nb], bufs)
                    return -1 if any(g is None for g in got) else sum(int(g) for g in got)

        else:
            raise ValueError(f"unknown op {task.op!r}")
        self.one, self.task = one, task
        if self.idx == 0:
            self._verify(task, offset)
        for i in range(task.warmup):
            one(-1 - i)  # negative: distinct put keys, reads still cycle

    def _verify(self, task: Task, offset: int) -> None:
        """Check once, outside timing, that reads return the prefilled bytes."""
        size, n = task.size, task.n_keys
        i = offset % n
        if task.op == "get":
            _check(self.a.get(read_key(size, i)), size, i)
        elif task.op == "get_into":
            buf = bytearray(size)
            got = self.a.get_into(read_key(size, i), buf)  # type: ignore[attr-defined]
            _check(None if got is None else memoryview(buf)[:got], size, i)
        elif task.op == "get_many":
            idx = [(i + j) % n for j in range(task.batch)]
            for j, v in zip(idx, self.a.get_many([read_key(size, j) for j in idx]), strict=True):
                _check(v, size, j)
        elif task.op == "get_many_into":
            idx = [(i + j) % n for j in range(task.batch)]
            bufs = [bytearray(size) for _ in idx]
            got = self.a.get_many_into([read_key(size, j) for j in idx], bufs)  # type: ignore[attr-defined]
            for j, g, buf in zip(idx, got, bufs, strict=True):
                _check(None if g is None else memoryview(buf)[:g], size, j)

    def run(self, start_at: float) -> WorkerResult:
        assert self.one is not None and self.task is not None
        one, task = self.one, self.task
        lat = array("q")
        append = lat.append
        clock = time.perf_counter_ns
        while (d := start_at - time.monotonic()) > 0:
            time.sleep(min(d, 0.01))
        t_start = time.monotonic()
        end = t_start + task.seconds
        moved = misses = 0
        i = 0
        while i < task.max_ops:
            t0 = clock()
            got = one(i)
            append(clock() - t0)
            if got < 0:
                misses += 1
            else:
                moved += got
            i += 1
            if i >= task.min_ops and time.monotonic() >= end:
                break
        t_end = time.monotonic()
        return WorkerResult(i, moved, t_start, t_end, lat.tobytes(), misses)

    def fill(self, size: int, n_keys: int, chunk_bytes: int = 32 << 20) -> None:
        per = max(1, min(256, chunk_bytes // size))
        for lo in range(0, n_keys, per):
            items = [(read_key(size, i), read_value(size, i)) for i in range(lo, min(n_keys, lo + per))]
            self.a.put_many(items)

    def cleanup(self) -> None:
        if self.put_keys:
            self.a.delete_many(self.put_keys)
            self.put_keys.clear()


def _worker_main(spec: PeerSpec, idx: int, conn: Connection) -> None:
    try:
        worker = _Worker(spec.connect(), idx)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        if cmd == "stop":
            break
        try:
            if cmd == "prepare":
                res: object = worker.prepare(*arg)
            elif cmd == "run":
                res = worker.run(arg)
            elif cmd == "fill":
                res = worker.fill(*arg)
            elif cmd == "delete_reads":
                size, n_keys = arg
                res = worker.a.delete_many([read_key(size, i) for i in range(n_keys)])
            elif cmd == "cleanup":
                res = worker.cleanup()
            elif cmd == "reset":
                res = worker.a.reset()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", res))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    try:
        worker.a.close()
    except Exception:
        pass


# --- the pool, in the driver ------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class ClientPool:
    """``n`` client processes for one peer, each with its own connection."""

    def __init__(self, spec: PeerSpec, n: int, timeout: float = 120.0) -> None:
        self.spec = spec
        self.timeout = timeout
        ctx = mp.get_context("spawn")  # no fork: a client may run its own event-loop thread
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(spec, i, child), daemon=True, name=f"{spec.name}-{i}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        try:
            self._collect(range(n), 60.0)
        except BaseException:
            self.close()
            raise
        self.run_id = 0

    def _collect(self, idx: range | list[int], timeout: float) -> list[Any]:
        out = []
        errors = []
        for i in idx:
            if not self.conns[i].poll(timeout):
                raise WorkerError(f"{self.spec.name} worker {i}: no answer within {timeout:.0f}s")
            status, res = self.conns[i].recv()
            if status == "error":
                errors.append(f"{self.spec.name} worker {i}:\n{res}")
            out.append(res)
        if errors:
            raise WorkerError("\n".join(errors))
        return out

    def call(self, idx: list[int], cmd: str, arg: object = None, timeout: float | None = None) -> list[Any]:
        for i in idx:
            self.conns[i].send((cmd, arg))
        return self._collect(idx, timeout or self.timeout)

    @property
    def all(self) -> list[int]:
        return list(range(len(self.conns)))

    def fill(self, size: int, n_keys: int) -> None:
        self.call([0], "fill", (size, n_keys))

    def delete_reads(self, size: int, n_keys: int) -> None:
        self.call([0], "delete_reads", (size, n_keys))

    def cleanup(self) -> None:
        self.call(self.all, "cleanup")

    def reset(self) -> None:
        self.call([0], "reset")

    def measure(self, task: Task, clients: int) -> Sample:
        s = Sample(self.spec.name, task.op, task.size, task.batch, clients)
        idx = list(range(clients))
        try:
            self.call(idx, "prepare", (task, clients))
            results: list[WorkerResult] = self.call(idx, "run", time.monotonic() + 0.05)
        except WorkerError as exc:
            s.error = str(exc)
            return s
        lat = np.concatenate([np.frombuffer(r.lat_ns, dtype=np.int64) for r in results]) / 1000.0
        s.ops = sum(r.ops for r in results)
        s.bytes = sum(r.bytes for r in results)
        s.misses = sum(r.misses for r in results)
        s.seconds = max(r.t_end for r in results) - min(r.t_start for r in results)
        s.gbps = s.bytes / s.seconds / 1e9
        s.ops_s = s.ops / s.seconds
        s.p50_us, s.p99_us = (float(x) for x in np.percentile(lat, [50, 99]))
        s.mean_us = float(lat.mean())
        return s

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
