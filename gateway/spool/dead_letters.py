"""Dead letters: activities Ortto refused, kept beside the queue to list, replay or purge.

Plain functions over the writer's connection, each run inside the writer's transaction:
a move between the queue and the dead letters is one INSERT and one DELETE that commit
together, so a row is always in exactly one of the two tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DeadLetter", "bury", "matching", "newest", "purge", "requeue"]

# Filters: error_contains is bound twice (NULL means "any error").
_ERROR_FILTER = "(? IS NULL OR instr(lower(error), lower(?)) > 0)"
_MATCHING = f"SELECT id, length(payload) FROM dead_letters WHERE {_ERROR_FILTER}"  # noqa: S608
_MATCHING_ALL = _MATCHING + " ORDER BY id"
_MATCHING_ONE = _MATCHING + " AND id = ?"
_NEWEST = (
    "SELECT id, payload, activity_id, person_hash, error, failed_at, enqueued_at"  # noqa: S608
    f" FROM dead_letters WHERE {_ERROR_FILTER}"
    " ORDER BY failed_at DESC, id DESC LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An activity Ortto refused; ``id`` is the queue row id it had when it failed."""

    id: int
    payload: bytes
    activity_id: str
    person_hash: str
    error: str
    failed_at: float
    enqueued_at: float


def bury(
    db: sqlite3.Connection, items: Sequence[tuple[int, str, str, str]], now: float
) -> tuple[list[int], int]:
    """Move queue rows (id, activity_id, person_hash, error) to the dead letters; the ids
    moved (each once; rows no longer queued are skipped) and their payload bytes."""
    moved: list[int] = []
    seen: set[int] = set()
    nbytes = 0
    for row_id, activity_id, person_hash, error in items:
        if row_id in seen:
            continue
        seen.add(row_id)
        query = "SELECT payload, enqueued_at, created FROM queue WHERE id = ?"
        row = db.execute(query, (row_id,)).fetchone()
        if row is None:
            continue
        payload, enqueued_at, created = row
        db.execute(
            "INSERT INTO dead_letters (id, payload, activity_id, person_hash, error,"
            " failed_at, enqueued_at, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row_id, payload, activity_id, person_hash, error, now, enqueued_at, created),
        )
        db.execute("DELETE FROM queue WHERE id = ?", (row_id,))
        moved.append(row_id)
        nbytes += len(payload)
    return moved, nbytes


def matching(
    db: sqlite3.Connection, ids: Sequence[int] | None, error_contains: str | None
) -> list[tuple[int, int]]:
    """(id, payload size) of the dead letters matching both filters, in id order."""
    if ids is None:
        rows = db.execute(_MATCHING_ALL, (error_contains, error_contains))
        return [(int(i), int(size)) for i, size in rows]
    found: list[tuple[int, int]] = []
    for row_id in sorted(set(ids)):
        row = db.execute(_MATCHING_ONE, (error_contains, error_contains, row_id)).fetchone()
        if row is not None:
            found.append((int(row[0]), int(row[1])))
    return found


def requeue(db: sqlite3.Connection, ids: Sequence[int], now: float) -> None:
    """Move dead letters back to the end of the queue (new ids, attempts 0)."""
    for row_id in ids:
        db.execute(
            "INSERT INTO queue (payload, enqueued_at, attempts, activity_id, person, created)"
            " SELECT payload, ?, 0, activity_id, person_hash, created FROM dead_letters"
            " WHERE id = ?",
            (now, row_id),
        )
        db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))


def purge(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete dead letters."""
    for row_id in ids:
        db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))


def newest(db: sqlite3.Connection, limit: int, error_contains: str | None) -> list[DeadLetter]:
    """The newest `limit` dead letters whose error contains `error_contains` (any case)."""
    rows = db.execute(_NEWEST, (error_contains, error_contains, limit))
    return [
        DeadLetter(
            int(r[0]), bytes(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]), float(r[6])
        )
        for r in rows
    ]
