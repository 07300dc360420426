"""One writer per store root: an exclusive ``flock`` on ``<root>/.lock`` holding the writer's pid.

A second writable store on the same root (another process, or another `TieredStore` in this one)
fails at once with `StoreLocked` naming the holder's pid. Readers (``store ls``, ``store verify``)
take no lock; ``store gc`` takes it. The kernel drops the lock when its holder dies (a SIGKILL
included), so a crashed writer never leaves the root locked.
"""

from __future__ import annotations

import fcntl
import os

from .errors import StoreLocked


class RootLock:
    def __init__(self, root: str):
        os.makedirs(root, exist_ok=True)
        self.path = os.path.join(root, ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode().strip() or "unknown"
            finally:
                os.close(fd)
            raise StoreLocked(f"the store {root} is in use by process {holder} (one writer per store; "
                              f"`cachedattn store ls/verify` read it without the lock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the last descriptor drops the flock
                self._fd = None
