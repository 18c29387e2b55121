"""A disk that fills up on demand, for the spool's connection: no mount, no root.

`Disk.connect` stands in for `gateway.spool.schema.connect`. While `full` is set, every statement
that would write fails as SQLite fails on a full disk: SQLITE_FULL, "database or disk is
full", and the open transaction rolled back (SQLite may do that on SQLITE_FULL; doing it
here exercises the harder case, where a later ROLLBACK fails). Which statements write is
SQLite's own decision (`PRAGMA query_only`), so reads, BEGIN and an empty COMMIT still
work, as on a real full disk whose WAL has room for nothing more. Clearing `full` is the
operator freeing space.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from gateway.spool import schema


class Disk:
    """The spool's disk as a test controls it."""

    def __init__(self) -> None:
        self.full = False
        self.refused = 0  # writes refused while full

    def connect(self, path: str) -> sqlite3.Connection:
        """`gateway.spool.schema.connect` on this disk."""
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=True, factory=_FillingConnection
        )
        assert isinstance(db, _FillingConnection)
        db.disk = self
        return db

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Disk:
        """Every spool opened from now on (in this test) writes to this disk."""
        monkeypatch.setattr(schema, "connect", self.connect)
        return self


class _FillingConnection(sqlite3.Connection):
    disk: Disk
    _query_only = False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        full = self.disk.full
        # BEGIN IMMEDIATE only takes the lock, which a full disk does not refuse.
        query_only = full and not sql.lstrip().upper().startswith("BEGIN")
        if query_only != self._query_only:
            super().execute(f"PRAGMA query_only={int(query_only)}")
            self._query_only = query_only
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            if not full or exc.sqlite_errorcode != sqlite3.SQLITE_READONLY:
                raise
            self.disk.refused += 1
            if self.in_transaction:
                super().execute("ROLLBACK")
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL
            error.sqlite_errorname = "SQLITE_FULL"
            raise error from None
