"""Adopt spool files no process will drain: their queued activities move to one that will.

`serve` drains `GATEWAY_SPOOL_PATH`; `serve --workers N` drains `spool.w0` to `spool.w<N-1>`
beside it. Change the worker count (or go from one to several) and some spool files have
no process any more: whatever they still queue was accepted (answered 202) and must reach
Ortto. At start, before anything serves, each such file's queued rows are appended to the
first spool this run drains, in their order, with their attempts and enqueue times.

Two transactions, never one across both files (in WAL mode SQLite keeps a transaction
atomic per file only): the rows are committed into the target first, then deleted from
the orphan, whose write lock is held throughout so no other process changes it meanwhile.
A file another process holds for draining (`spool.claim`: a worker whose supervisor was
killed, a second gateway started on the same files) is not an orphan and is left alone.
A crash between the two commits leaves the rows in both files: they are sent twice (each
keeps its `key` and `created`), never lost. Dead letters stay where they are (the
`dead-letters` command reads every spool file); an orphan left with none is removed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.spool import schema
from gateway.spool.commit import fsync_dir
from gateway.spool.errors import SpoolError
from gateway.spool.lock import claim

log = logging.getLogger("gateway.adopt")

__all__ = ["Adopted", "adopt_orphans"]


@dataclass(frozen=True, slots=True)
class Adopted:
    """What one orphan spool file gave up."""

    path: str
    rows: int
    dead_letters_left: int
    removed: bool


def adopt_orphans(files: list[str], owned: list[str]) -> list[Adopted]:
    """Move the queued rows of every file in `files` not in `owned` into `owned[0]`.

    A file held by a running process (`spool.claim`), or that cannot be read as a spool
    (locked for longer than the busy timeout, not a spool, from a newer gateway), is left
    alone with a warning: nothing is ever deleted that was not first committed elsewhere.
    """
    if not owned or owned[0] == schema.MEMORY:
        return []
    keep = {str(Path(path).resolve()) for path in owned}
    done: list[Adopted] = []
    for path in files:
        if str(Path(path).resolve()) in keep:
            continue
        try:
            adopted = _adopt(path, owned[0])
        except (sqlite3.Error, SpoolError, OSError) as exc:
            log.warning(
                "cannot adopt a spool file no worker drains; its activities stay there",
                extra={"data": {"path": path, "error": str(exc)}},
            )
            continue
        done.append(adopted)
        log.log(
            logging.WARNING if adopted.rows else logging.INFO,
            "adopted a spool file no worker drains",
            extra={
                "data": {
                    "path": path,
                    "into": owned[0],
                    "activities": adopted.rows,
                    "dead_letters_left": adopted.dead_letters_left,
                    "removed": adopted.removed,
                }
            },
        )
    return done


def _connect(path: str) -> sqlite3.Connection:
    db = schema.connect(path)
    db.execute(f"PRAGMA busy_timeout={schema.BUSY_TIMEOUT_MS}")
    return db


def _adopt(path: str, target: str) -> Adopted:
    # A file some process still holds is not an orphan: the worker of another gateway (one
    # whose supervisor was killed, or started twice) is writing it. Held until the end.
    held = claim(path)
    try:
        return _adopt_held(path, target)
    finally:
        os.close(held)  # after every SQLite connection to the file is closed (see claim)


def _adopt_held(path: str, target: str) -> Adopted:
    orphan = _connect(path)
    try:
        if schema.check_version(orphan, path) == 0:
            raise SpoolError(f"{path} is not a spool file")
        schema.ensure_schema(orphan, path)  # an older file gets the columns first
        orphan.execute("BEGIN IMMEDIATE")  # held until the rows are gone from here
        rows, dead = schema.count_rows(orphan)
        if rows:
            _append_rows(path, target)
            schema.clear_queue(orphan)
        orphan.execute("COMMIT")
    finally:
        orphan.close()
    removed = False
    if not dead:
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
        removed = True
    return Adopted(path, rows, dead, removed)


def _append_rows(path: str, target: str) -> None:
    """Commit (synchronous=FULL) a copy of the orphan's queue at the end of `target`."""
    created = not Path(target).exists()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    db = _connect(target)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        schema.ensure_schema(db, target)
        db.execute("ATTACH DATABASE ? AS orphan", (path,))
        # Deferred: IMMEDIATE would also want the orphan's write lock, held by the caller.
        db.execute("BEGIN")
        try:
            schema.append_queue(db, "orphan")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("DETACH DATABASE orphan")
    finally:
        db.close()
    if created:
        fsync_dir(Path(target).parent)
