"""The spool file's tables, its schema version, and the SQL that moves whole queues.

Every module that touches a spool file's tables (the queue, the dead letters, adoption)
takes their layout from here.

Versions (``PRAGMA user_version``): 1 kept the payload alone in the queue; 2 adds the
activity id, the person's hash and `created` beside it (`QueuedActivity`), and `created`
to the dead letters. A file of version 1 is migrated when opened: its rows get the
columns from their payloads, in the transaction that raises the version.

The `imported_keys` table (what `spool import` took in, by activity `key`, so importing
the same export twice sends nothing twice; see `transfer`) is created in any file that
lacks it, without a new version: a gateway of version 2 ignores a table it does not know,
so a file that has it can still be opened by the gateway it came from (a rollback).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence

from gateway.spool.errors import SpoolError
from gateway.spool.items import QueuedActivity
from gateway.spool.payload import describe

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
SCHEMA_VERSION = 2
# Long enough to ride out a concurrent admin process (dead-letters CLI) holding the lock.
BUSY_TIMEOUT_MS = 5000

_TABLES = (
    """CREATE TABLE IF NOT EXISTS queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        activity_id TEXT NOT NULL DEFAULT '',
        person TEXT NOT NULL DEFAULT '',
        created REAL
    )""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY,
        payload BLOB NOT NULL,
        activity_id TEXT NOT NULL,
        person_hash TEXT NOT NULL,
        error TEXT NOT NULL,
        failed_at REAL NOT NULL,
        enqueued_at REAL NOT NULL,
        created REAL
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_failed_at ON dead_letters (failed_at)",
    """CREATE TABLE IF NOT EXISTS imported_keys (
        key TEXT PRIMARY KEY,
        imported_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS imported_keys_at ON imported_keys (imported_at)",
)
# Version 1 -> 2: the columns beside the payload (filled by `_fill_columns`).
_TO_2 = (
    "ALTER TABLE queue ADD COLUMN activity_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE queue ADD COLUMN person TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE queue ADD COLUMN created REAL",
    "ALTER TABLE dead_letters ADD COLUMN created REAL",
)
# A queue row as the spool reads it back (see `SpooledItem`).
QUEUE_ROW = "id, payload, enqueued_at, attempts, activity_id, person, created"
# What a put writes, one bound value each (see `QueuedActivity`).
QUEUE_PUT = "payload, enqueued_at, activity_id, person, created"


def put_values(items: Sequence[QueuedActivity], enqueued_at: float) -> list[object]:
    """The values of `QUEUE_PUT` for each of `items` in turn, in its order: what a
    multi-row INSERT binds (one call for them all, not one per activity)."""
    values: list[object] = []
    for item in items:
        values += (item.payload, enqueued_at, item.activity_id, item.person, item.created)
    return values


# What a queue row carries besides its id: copied as they are when rows move between files.
_QUEUE_COPIED = "payload, enqueued_at, attempts, activity_id, person, created"


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
    """Create the spool's tables if missing, or migrate them from an older version;
    SpoolError if the file is from a newer gateway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = check_version(db, path)
        if version == 1:
            for statement in _TO_2:
                db.execute(statement)
            _fill_columns(db)
        elif version == SCHEMA_VERSION:
            # Rows an older gateway appended after another process upgraded the file
            # (while it still ran): they get their columns now.
            _fill_columns(db, MISSING)
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


# The rows an older gateway wrote: no activity id (every activity has one).
MISSING = " WHERE activity_id = ''"


def _fill_columns(db: sqlite3.Connection, where: str = "") -> None:
    """Give rows (of a version 1 file, or `where` selects which) the columns their
    payloads hold."""

    def fill(
        table: str, update: str, values: Callable[[QueuedActivity], tuple[object, ...]]
    ) -> None:
        rows = db.execute(f"SELECT id, payload FROM {table}{where}").fetchall()  # noqa: S608
        described = [(describe(bytes(p)), i) for i, p in rows]
        if where:  # only what a payload can tell: a row with no activity id stays as it is
            described = [(a, i) for a, i in described if a.activity_id]
        if described:
            db.executemany(update, [(*values(a), i) for a, i in described])

    fill(
        "queue",
        "UPDATE queue SET activity_id = ?, person = ?, created = ? WHERE id = ?",
        lambda a: (a.activity_id, a.person, a.created),
    )
    fill("dead_letters", "UPDATE dead_letters SET created = ? WHERE id = ?", lambda a: (a.created,))


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
