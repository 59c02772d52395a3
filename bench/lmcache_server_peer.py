"""The lmcache_server peer of bench.run: LMCache's own remote KV server (``python -m lmcache.v1.server``, pure
Python, one thread per connection, values in a dict) and a minimal client for its wire format.

The server runs from a venv that has LMCache installed (``.venv-lmcache``, built by
``scripts/engine-venv.sh lmcache``; ``MEMKV_LMCACHE_VENV`` names another). The client speaks the
protocol directly (a 186-byte request header of nine int32 and a 150-byte key, a 36-byte reply
header, then the value), with no torch in the benchmark's process: LMCache's own client wraps the
same frames in tensor objects, which would measure torch, not the server.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Self

from bench.procs import PeerServers

ROOT = Path(__file__).resolve().parent.parent
KEY_LEN = 150
REQUEST = struct.Struct(f"9i{KEY_LEN}s")  # command, length, fmt, dtype, location, shape[4], key
REPLY = struct.Struct("9i")  # code, length, fmt, dtype, shape[4]
PUT, GET = 1, 2
BINARY, UINT8 = 4, 6  # lmcache.v1.memory_management.MemoryFormat.BINARY, protocol.DTYPE_TO_INT[uint8]
SUCCESS = 200


def lmcache_venv() -> Path:
    return Path(os.environ.get("MEMKV_LMCACHE_VENV") or ROOT / ".venv-lmcache")


class LMCacheServer(PeerServers):
    def start(self) -> Self:
        python = lmcache_venv() / "bin" / "python"
        if not python.exists():
            raise RuntimeError(f"no {python} (scripts/engine-venv.sh lmcache, or set MEMKV_LMCACHE_VENV)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [str(python), "-m", "lmcache.v1.server", self.host, str(self.port), "cpu"]
        # (importing torch takes a while on a loaded machine)
        self.spawn(cmd, self.port, self.workdir / "lmcache_server.log", timeout=120.0, cwd=self.workdir)
        return self


def _request(command: int, key: bytes, length: int) -> bytes:
    # a CacheEngineKey string: model@world_size@worker_id@chunk_hash(hex)@dtype
    key_str = b"memkv@1@0@%s@half" % (key.hex().encode() or b"0")
    return REQUEST.pack(command, length, BINARY, UINT8, 0, length, 0, 0, 0, key_str.ljust(KEY_LEN))


class LMCacheAdapter:
    """One connection; ``get_many`` sends all requests, then reads all replies (the server answers in
    order on a connection). The server has no delete: overwriting a key replaces it."""

    name = "lmcache_server"
    ops = frozenset({"put", "get", "get_into", "get_many"})

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = bytearray(REPLY.size)

    def _read_exact(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if n == 0:
                raise ConnectionError("lmcache_server closed the connection")
            view = view[n:]

    def _read_reply(self) -> int | None:
        # the server writes the reply header and the value in two sends without TCP_NODELAY: Nagle
        # holds the value until the header is acknowledged, so acknowledge at once (no 40 ms wait)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self._read_exact(memoryview(self.reply))
        code, length = REPLY.unpack(self.reply)[:2]
        return length if code == SUCCESS else None

    def put(self, key: bytes, value: bytes) -> None:
        self.sock.sendall(_request(PUT, key, len(value)))
        self.sock.sendall(value)

    def get(self, key: bytes) -> bytes | None:
        self.sock.sendall(_request(GET, key, 0))
        length = self._read_reply()
        if length is None:
            return None
        out = bytearray(length)
        self._read_exact(memoryview(out))
        return bytes(out)

    def get_into(self, key: bytes, buf: bytearray) -> int | None:
        self.sock.sendall(_request(GET, key, 0))
        length = self._read_reply()
        if length is None:
            return None
        self._read_exact(memoryview(buf)[:length])
        return length

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        self.sock.sendall(b"".join(_request(GET, k, 0) for k in keys))
        out: list[bytes | None] = []
        for _ in keys:
            length = self._read_reply()
            if length is None:
                out.append(None)
                continue
            value = bytearray(length)
            self._read_exact(memoryview(value))
            out.append(bytes(value))
        return out

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            self.put(k, v)

    def delete_many(self, keys: list[bytes]) -> None:
        pass  # (no delete in the protocol; the next PUT of a key replaces it)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()
