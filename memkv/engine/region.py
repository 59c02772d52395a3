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
        self.ro_fd: int | None = None  # set by detach_file

    def detach_file(self) -> None:
        """Unlink the file now, keeping a read-only descriptor of it (``ro_fd``).

        The mapping stays; the memory goes back to the system when the process
        exits, however it exits (a SIGKILLed node leaves nothing in /dev/shm).
        ``ro_fd`` can be handed to same-host readers (SCM_RIGHTS), who can map
        it read-only only. ``path`` becomes ``/proc/<pid>/fd/<fd>``, which the
        owner's user can still open (debugging, tests).
        """
        if self.ro_fd is not None or self.closed:
            return
        self.ro_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.path = f"/proc/{os.getpid()}/fd/{self.ro_fd}"

    @staticmethod
    def sweep_stale(directory: str = "/dev/shm") -> list[str]:
        """Remove ``memkv-*-<pid>-<hex>.region`` files whose process is gone; their paths."""
        removed: list[str] = []
        try:
            names = os.listdir(directory)
        except OSError:
            return removed
        for fname in names:
            if not (fname.startswith("memkv-") and fname.endswith(".region")):
                continue
            parts = fname[: -len(".region")].split("-")
            if len(parts) < 4 or not parts[-2].isdigit():
                continue
            pid = int(parts[-2])
            try:
                os.kill(pid, 0)
                continue  # alive (or not ours to judge)
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, fname))
                removed.append(fname)
        return removed

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
        if self.ro_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.ro_fd)
            self.ro_fd = None
            return
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
