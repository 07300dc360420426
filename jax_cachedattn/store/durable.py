"""Durable small files: temp file, fsync, rename, fsync of the folder; and recognising a full disk.

Used for the manifests and ``store.json`` on a ``file`` kvstore (TensorStore's file driver was seen
rewriting a file in place, leaving a short manifest over a longer one after a kill; and it does not
fsync the folder, so a power cut could lose a rename reported durable).
"""

from __future__ import annotations

import errno
import os
import threading


def is_enospc(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or TensorStore's text) says the disk or a quota is full."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    msg = str(exc).lower()
    return "no space left" in msg or "enospc" in msg or "disk quota" in msg or "resource_exhausted" in msg


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, raw: bytes) -> None:
    """Temp file + write + fsync + rename + fsync of the folder: after it returns, ``path`` holds ``raw``
    across a power cut; a failure (or a kill) leaves the old file whole."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
