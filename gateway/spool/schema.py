"""The spool file's tables, its schema version, and the SQL that moves whole queues.

Every module that touches a spool file's tables (the queue, the dead letters, adoption)
takes their layout from here.
"""

from __future__ import annotations

import contextlib
import sqlite3

from gateway.spool.errors import SpoolError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MEMORY",
    "SCHEMA_VERSION",
    "append_queue",
    "check_version",
    "clear_queue",
    "connect",
    "count_rows",
    "ensure_schema",
]

MEMORY = ":memory:"
SCHEMA_VERSION = 1
# Long enough to ride out a concurrent admin process (dead-letters CLI) holding the lock.
BUSY_TIMEOUT_MS = 5000

_TABLES = (
    """CREATE TABLE IF NOT EXISTS queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY,
        payload BLOB NOT NULL,
        activity_id TEXT NOT NULL,
        person_hash TEXT NOT NULL,
        error TEXT NOT NULL,
        failed_at REAL NOT NULL,
        enqueued_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_failed_at ON dead_letters (failed_at)",
)
# A queue row as the spool reads it back (see `SpooledItem`).
QUEUE_ROW = "id, payload, enqueued_at, attempts"
# What a queue row carries besides its id: copied as they are when rows move between files.
_QUEUE_COPIED = "payload, enqueued_at, attempts"


def connect(path: str) -> sqlite3.Connection:
    """A connection whose transactions are explicit (BEGIN ... COMMIT). Looked up at each
    open, so a test can hand the spool a disk that fills up on demand."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=True)


def check_version(db: sqlite3.Connection, path: str) -> int:
    """The file's schema version; SpoolError if it is from a newer gateway."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SpoolError(f"{path} has schema {version}, newer than this gateway")
    return version


def ensure_schema(db: sqlite3.Connection, path: str) -> None:
    """Create the spool's tables if missing; SpoolError if the file is from a newer gateway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        check_version(db, path)
        for statement in _TABLES:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (it can on SQLITE_FULL or an I/O error): a
        # ROLLBACK then fails with "no transaction is active", which must not hide the cause.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def count_rows(db: sqlite3.Connection) -> tuple[int, int]:
    """(queued rows, dead letters) of the spool file `db` is connected to."""
    rows = int(db.execute("SELECT count(*) FROM queue").fetchone()[0])
    dead = int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
    return rows, dead


def append_queue(db: sqlite3.Connection, source: str) -> None:
    """Append the queue of the attached database `source` to `db`'s, in id order (new ids)."""
    db.execute(
        f"INSERT INTO main.queue ({_QUEUE_COPIED})"  # noqa: S608 - names from this module
        f" SELECT {_QUEUE_COPIED} FROM {source}.queue ORDER BY id"
    )


def clear_queue(db: sqlite3.Connection) -> None:
    """Delete every queued row (its dead letters stay)."""
    db.execute("DELETE FROM queue")
