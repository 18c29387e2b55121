"""The spool file held by one process: an exclusive `flock` beside SQLite's own locks."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gateway.spool.errors import SpoolInUse

__all__ = ["claim", "in_use"]


def claim(path: str) -> int:
    """Hold the spool file at `path` for this process; the descriptor that holds it.

    An exclusive `flock` on the file itself (created if missing), held while a gateway
    drains it, so a second gateway on the same file, or the adoption of a file some
    worker still writes, is refused instead of losing rows. On Linux `flock` and SQLite's
    own (POSIX) locks are independent; but closing any descriptor of a file drops the
    process's POSIX locks on it, so the descriptor must be closed only once no SQLite
    connection of this process has the file open.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # 0o644 under the umask, as SQLite itself creates a database (and its -wal and -shm).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolInUse(f"{path} is in use by another gateway process") from None
    return fd


def in_use(path: str) -> bool:
    """Whether a running gateway holds the spool file (see `claim`). Call it only while
    this process has no SQLite connection to the file open."""
    try:
        os.close(claim(path))
    except SpoolInUse:
        return True
    return False
