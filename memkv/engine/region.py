"""The region: one large, file-backed, shared mmap that holds the hot values.

It lives in a real file (``/dev/shm`` by default) so that a same-host client can
map ``path`` read-only and an RDMA transport can register the buffer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets

from memkv.errors import InvalidArgument, OutOfMemory


class Region:
    """``size`` bytes of shared memory backed by ``<directory>/memkv-<name>-<pid>-<random>.region``."""

    def __init__(
        self,
        size: int,
        *,
        directory: str = "/dev/shm",
        name: str = "node",
        mode: int = 0o600,
        allocate: bool = True,
    ) -> None:
        if size <= 0:
            raise InvalidArgument(f"region size must be > 0, got {size}")
        self.size = int(size)
        self.path = os.path.join(directory, f"memkv-{name}-{os.getpid()}-{secrets.token_hex(4)}.region")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            try:
                if allocate:
                    # Reserve the pages now: a tmpfs that is too small fails here with
                    # ENOSPC instead of killing the node with SIGBUS on first write.
                    os.posix_fallocate(fd, 0, self.size)
                else:
                    os.ftruncate(fd, self.size)
            except OSError as exc:
                raise OutOfMemory(f"cannot allocate a {self.size}-byte region in {directory}: {exc}") from exc
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        os.close(fd)
        self.view: memoryview = memoryview(self._mmap)
        self.closed = False

    @property
    def mmap(self) -> mmap.mmap:
        if self._mmap is None:
            raise InvalidArgument("region is closed")
        return self._mmap

    def close(self) -> None:
        """Unmap and unlink the file. Idempotent.

        If slices of ``view`` are still alive elsewhere the mapping cannot be
        closed right away; it is then released when the last slice goes away,
        but the file is unlinked in any case.
        """
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(BufferError):
            self.view.release()
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<Region {self.path} size={self.size}{' closed' if self.closed else ''}>"
