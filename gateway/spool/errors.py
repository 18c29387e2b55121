"""The spool's errors: one base class, `SpoolError`, and what callers tell apart."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

__all__ = ["SpoolClosed", "SpoolError", "SpoolFull", "SpoolInUse", "SpoolOpenError"]


class SpoolError(Exception):
    """The spool cannot do what was asked (database failure); base of the spool errors."""


class SpoolFull(SpoolError):
    """The queue is at its row or byte bound; nothing was written."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"spool is full; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class SpoolClosed(SpoolError):
    """The spool is not open (not opened yet, closing or closed)."""


class SpoolInUse(SpoolError):
    """Another process holds the spool file: a running gateway drains it."""


class SpoolOpenError(SpoolError):
    """The spool file cannot be opened: a full or read-only disk, a path that cannot be a
    file, a file that is not a spool. The message names the path and the cause."""

    def __init__(self, path: str, cause: BaseException) -> None:
        reason = str(cause)
        if isinstance(cause, FileExistsError):  # `mkdir` met a file where a directory goes
            reason = f"{cause.filename} is not a directory"
        elif isinstance(cause, OSError) and cause.strerror:
            where = os.fsdecode(cause.filename) if cause.filename is not None else path
            reason = cause.strerror if where == path else f"{where}: {cause.strerror}"
        elif isinstance(cause, sqlite3.Error) and cause.sqlite_errorname.count("_") > 1:
            # "disk I/O error" alone hides which: SQLITE_IOERR_SHMSIZE is a full disk.
            reason = f"{reason} ({cause.sqlite_errorname})"
        if _no_space_left(path):
            reason += " (no space left on the device)"
        super().__init__(f"cannot open the spool {path}: {reason}")
        self.path = path


def _no_space_left(path: str) -> bool:
    """Whether the filesystem that holds (or would hold) `path` has no block left."""
    for where in (Path(path).parent, *Path(path).parent.parents):
        try:
            return os.statvfs(where).f_bavail == 0
        except OSError:
            continue
    return False
