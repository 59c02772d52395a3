"""The audit log of a node: who wrote, deleted, pinned or purged which block, when.

One JSON line per event in ``<data dir>/audit/audit.log``::

    {"seq": 7, "t": 1718000000.123, "node": "n1", "op": "put", "tenant": "alice",
     "ns": "shared", "k": "<key hex>", "len": 65536, "cs": 1234, "gen": 9,
     "model": "llama-3-8b", "prev": "<hash of record 6>", "h": "<hash of this record>"}

Records are **hash chained**: ``h = sha256(prev || canonical JSON of the record
without h)``, so editing, dropping or reordering a record breaks every later
hash (``verify_chain``). The chain goes on across rotated files: when
``audit.log`` reaches ``max_bytes`` it is renamed ``audit.log.1`` (older files
shift up, at most ``keep`` are kept) and a new file starts with the ``prev``
of the last record.

The request path only appends the encoded line to a list (a few microseconds);
``run`` (a background task of the node) writes and fsyncs the batch in a
worker thread every ``flush_interval`` seconds, so the event loop never waits
for the disk. A crash loses at most the last interval of records.

Keys of ``no_store`` writes are logged as ``kh`` = sha256(key) only (never the
key itself); values are never logged, only their length and checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import trio

from memkv.engine.clock import SYSTEM, Clock

log = logging.getLogger("memkv.audit")

GENESIS = "0" * 64


def _canonical(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def record_hash(prev: str, rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "h"}
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


def key_hash(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


class AuditLog:
    def __init__(self, directory: str, node_id: str, *, max_bytes: int = 64 << 20, keep: int = 8,
                 flush_interval: float = 0.2, clock: Clock = SYSTEM) -> None:
        self.dir = directory
        self.clock = clock
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "audit.log")
        self.node_id = node_id
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self.flush_interval = float(flush_interval)
        self.pending: list[bytes] = []
        self.pending_recs: list[dict[str, Any]] = []
        self.writing_recs: list[dict[str, Any]] = []  # taken off ``pending`` by a flush, maybe not on disk yet
        self.records = 0
        self.flushes = 0
        self.rotations = 0
        self.seq, self.prev = self._resume()
        self._lock = trio.Lock()

    # -- state from the files on disk
    def files(self) -> list[str]:
        """Audit files, oldest first."""
        out = [f"{self.path}.{i}" for i in range(self.keep, 0, -1) if os.path.exists(f"{self.path}.{i}")]
        if os.path.exists(self.path):
            out.append(self.path)
        return out

    def _resume(self) -> tuple[int, str]:
        last = None
        for path in reversed(self.files()):
            for rec in _read_file(path):
                last = rec
            if last is not None:
                break
        if last is None:
            return 0, GENESIS
        return int(last.get("seq", 0)), str(last.get("h", GENESIS))

    # -- the request path (no I/O)
    def append(self, op: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        rec: dict[str, Any] = {"seq": self.seq, "t": round(self.clock.wall(), 6), "node": self.node_id, "op": op}
        rec.update({k: v for k, v in fields.items() if v is not None})
        rec["prev"] = self.prev
        rec["h"] = self.prev = record_hash(self.prev, rec)
        self.pending.append(_canonical(rec) + b"\n")
        self.pending_recs.append(rec)
        self.records += 1
        return rec

    # -- background writer
    def _write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        oldest = f"{self.path}.{self.keep}"
        if os.path.exists(oldest):
            os.unlink(oldest)
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.rename(src, f"{self.path}.{i + 1}")
        os.rename(self.path, f"{self.path}.1")
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.rotations += 1

    async def flush(self) -> None:
        async with self._lock:
            if not self.pending:
                return
            lines = self._take_batch()
            recs = self.writing_recs
            try:
                await trio.to_thread.run_sync(self._write, lines)
            except OSError as exc:
                log.error("audit: write failed (%s); %d records kept for the next try", exc, len(lines))
                self.pending[:0] = lines
                self.pending_recs[:0] = recs
                return
            finally:
                self.writing_recs = []
            self.flushes += 1

    def flush_sync(self) -> None:
        if self.pending:
            lines = self._take_batch()
            try:
                self._write(lines)
            finally:
                self.writing_recs = []

    def _take_batch(self) -> list[bytes]:
        """The pending lines; their records move to ``writing_recs`` *before* ``pending_recs`` is
        emptied, so a query (iter_all) never finds a record in neither list."""
        lines, self.pending = self.pending, []
        self.writing_recs = self.pending_recs
        self.pending_recs = []
        return lines

    async def run(self) -> None:
        try:
            while True:
                await self.clock.sleep(self.flush_interval)
                await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    self.flush_sync()
                except OSError as exc:
                    log.error("audit: final flush failed: %s", exc)

    # -- queries
    def history(self, *, key: bytes | None = None, tenant: str | None = None,
                limit: int = 10_000) -> list[dict[str, Any]]:
        """Records about ``key`` (by key or key hash) and/or ``tenant``, oldest first (files + pending)."""
        khex = key.hex() if key is not None else None
        kh = key_hash(key) if key is not None else None
        out: list[dict[str, Any]] = []
        for rec in self.iter_all():
            if khex is not None and rec.get("k") != khex and rec.get("kh") != kh:
                continue
            if tenant is not None and rec.get("tenant") != tenant:
                continue
            out.append(rec)
        return out[-limit:]

    def iter_all(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first: the files, then what is not on disk yet.

        A flush moves records pending -> writing -> file while the batch is written in a
        worker thread; reading the files and then only ``pending`` missed the batch being
        written (an audit query during a flush did not see the node's latest writes). So the
        records in memory are taken first (``pending`` before ``writing``, the reverse of the
        order a flush moves them in), then the files are read, and the records in memory
        follow when the files do not hold them yet (by ``seq``, which only grows).
        """
        waiting = list(self.pending_recs)
        writing = list(self.writing_recs)
        last = 0
        for path in self.files():
            for rec in _read_file(path):
                last = max(last, int(rec.get("seq", 0)))
                yield rec
        seen: set[int] = set()
        for rec in sorted([*writing, *waiting], key=lambda r: int(r["seq"])):
            if rec["seq"] > last and rec["seq"] not in seen:
                seen.add(rec["seq"])
                yield rec

    def stats(self) -> dict[str, Any]:
        return {"dir": self.dir, "records": self.records, "seq": self.seq, "pending": len(self.pending),
                "flushes": self.flushes, "rotations": self.rotations}


def _read_file(path: str) -> Iterator[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if isinstance(rec, dict):
                    yield rec
    except FileNotFoundError:
        return


def verify_chain(records: list[dict[str, Any]] | Iterator[dict[str, Any]]) -> tuple[int, list[str]]:
    """Check every record's hash and its link to the previous one; (records checked, problems)."""
    problems: list[str] = []
    prev: str | None = None
    n = 0
    for rec in records:
        n += 1
        if prev is not None and rec.get("prev") != prev:
            problems.append(f"seq {rec.get('seq')}: chain broken (prev does not match the record before)")
        if record_hash(str(rec.get("prev", "")), rec) != rec.get("h"):
            problems.append(f"seq {rec.get('seq')}: record hash mismatch (edited)")
        prev = rec.get("h")
    return n, problems
