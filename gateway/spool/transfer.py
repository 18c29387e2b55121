"""Move a spool's backlog to another host: export it as JSON Lines, import it idempotently.

A host that stops for good drains until its deadline; what Ortto did not take by then is
still queued in its spool file. `export` writes those rows (and, if asked, the dead
letters) one JSON object a line: the payload as stored (the enriched activity, with its
`key` and `created`) under ``activity``, beside the columns (activity id, person hash,
`created`, enqueue time, attempts; a dead letter's error and failure time). `import`
appends them to another spool file, which its gateway (running or not) then delivers.

Never lost, never sent twice:

- `export` with `move` holds the source's write lock from the first read to the last
  delete, writes a temporary file beside the output, fsyncs it, links it to the output's
  name (never over an existing file) and fsyncs the directory; only then are the exported
  rows deleted, in the same transaction that read them. Any failure before that leaves
  the source as it was. A crash between the link and the commit leaves the rows in both
  places: importing is what makes that harmless.
- `import` skips an activity whose `key` the target already holds (queued or dead) or
  once imported (`imported_keys`, kept `IMPORTED_KEYS_KEEP`), and records each key it
  imports in the transaction that queues it: a second import of the same file, or of a
  file exported twice, queues nothing. (A payload without a `key`, which enrichment never
  makes, is known by its digest instead.)

Both work beside a running gateway, as the dead-letters commands do: SQLite's locks keep
the file consistent and the gateway notices the change (`PRAGMA data_version`). Except a
`move`: the gateway may hold some rows leased (in flight to Ortto), so a source a gateway
drains is refused (`SpoolInUse`); stop it first, which is the point of moving.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.spool import dead_letters, schema
from gateway.spool.commit import fsync_dir
from gateway.spool.errors import SpoolError
from gateway.spool.items import QueuedActivity
from gateway.spool.lock import claim

__all__ = [
    "IMPORTED_KEYS_KEEP",
    "Exported",
    "Imported",
    "export_to_file",
    "export_to_stream",
    "import_file",
]

# Far longer than any sane gap between exporting a host's backlog and importing it again,
# and short enough that the table never grows with the traffic of years.
IMPORTED_KEYS_KEEP = 30 * 86400.0
# Lines per import transaction: a running gateway's writer waits for at most one of them.
IMPORT_CHUNK = 500
QUEUED = "queued"
DEAD_LETTER = "dead_letter"
# A payload that is not JSON (none is: enrichment writes them) travels as base64.
_RAW = "payload_base64"

_QUEUE_ROWS = (
    "SELECT payload, activity_id, person, created, enqueued_at, attempts FROM queue ORDER BY id"
)
_DEAD_ROWS = (
    "SELECT payload, activity_id, person_hash, created, enqueued_at, error, failed_at"
    " FROM dead_letters ORDER BY id"
)


@dataclass(frozen=True, slots=True)
class Exported:
    """How many rows an export wrote."""

    queued: int = 0
    dead_letters: int = 0


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import did: rows added to the queue and the dead letters, and those skipped
    because the target already had (or once imported) their key."""

    queued: int = 0
    dead_letters: int = 0
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class _Record:
    """One exported row as read back."""

    kind: str
    payload: bytes
    activity_id: str
    person_hash: str
    created: float | None
    enqueued_at: float
    attempts: int
    error: str
    failed_at: float

    @property
    def key(self) -> str:
        return activity_key(self.payload)


def activity_key(payload: bytes) -> str:
    """What makes an activity the same one twice: its `key`, else its payload's digest."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    key = data.get("key") if isinstance(data, dict) else None
    if isinstance(key, str) and key:
        return key
    return "sha256:" + hashlib.sha256(payload).hexdigest()


# -- export ------------------------------------------------------------------------------


def export_to_stream(
    files: Sequence[str], out: IO[bytes], *, dead: bool, redact: Callable[[str], str]
) -> Exported:
    """Write every queued row (and dead letter, if `dead`) of `files` to `out`; a copy,
    read in one snapshot per file."""
    total = Exported()
    for path in files:
        db = _open_source(path)
        try:
            db.execute("BEGIN")  # one snapshot: the two tables agree
            total = _add(total, _write_rows(db, out, dead=dead, redact=redact))
            db.execute("COMMIT")
        finally:
            db.close()
    return total


def export_to_file(
    files: Sequence[str],
    output: Path,
    *,
    dead: bool,
    move: bool,
    redact: Callable[[str], str],
) -> Exported:
    """Write the rows of `files` to a new file `output` (never over an existing one),
    durably; with `move`, then delete them from `files` (see the module's docstring)."""
    output = Path(output)
    if output.exists():
        raise SpoolError(f"{output} exists: export to a new file")
    missing = [path for path in files if not Path(path).exists()]
    if missing:
        raise SpoolError(f"no spool at {missing[0]}")
    with contextlib.ExitStack() as stack:
        if move:  # released last, after every connection is closed (see `claim`)
            for path in files:
                stack.callback(os.close, claim(path))
        sources: list[sqlite3.Connection] = []
        for path in files:
            db = _open_source(path)
            stack.callback(db.close)
            stack.callback(_rollback, db)
            db.execute("BEGIN IMMEDIATE" if move else "BEGIN")
            sources.append(db)
        total = _write_file(sources, output, dead=dead, redact=redact)
        for db in sources:
            if move:
                schema.clear_queue(db)
                if dead:
                    db.execute("DELETE FROM dead_letters")
            db.execute("COMMIT")
    return total


def _write_file(
    sources: list[sqlite3.Connection], output: Path, *, dead: bool, redact: Callable[[str], str]
) -> Exported:
    """The rows of every source in a temporary file, fsynced, then linked to `output`."""
    temporary = output.parent / f".{output.name}.{os.getpid()}.tmp"
    total = Exported()
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"cannot write {output}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            for db in sources:
                total = _add(total, _write_rows(db, out, dead=dead, redact=redact))
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, output)  # atomic, and never replaces an existing file
        fsync_dir(output.parent)
    except FileExistsError:
        raise SpoolError(f"{output} exists: export to a new file") from None
    except OSError as exc:
        raise SpoolError(f"cannot write {output}: {exc}") from exc
    finally:
        temporary.unlink()
    return total


def _write_rows(
    db: sqlite3.Connection, out: IO[bytes], *, dead: bool, redact: Callable[[str], str]
) -> Exported:
    queued = dead_count = 0
    for payload, activity_id, person, created, enqueued_at, attempts in db.execute(_QUEUE_ROWS):
        line = {"kind": QUEUED, **_payload(bytes(payload))}
        line |= _columns(activity_id, person, created, enqueued_at)
        out.write(orjson.dumps({**line, "attempts": int(attempts)}) + b"\n")
        queued += 1
    if dead:
        for payload, activity_id, person, created, enqueued_at, error, failed_at in db.execute(
            _DEAD_ROWS
        ):
            line = {"kind": DEAD_LETTER, **_payload(bytes(payload))}
            line |= _columns(activity_id, person, created, enqueued_at)
            line |= {"error": redact(str(error)), "failed_at": float(failed_at)}
            out.write(orjson.dumps(line) + b"\n")
            dead_count += 1
    return Exported(queued, dead_count)


def _payload(payload: bytes) -> dict[str, Any]:
    try:
        return {"activity": orjson.loads(payload)}
    except orjson.JSONDecodeError:
        return {_RAW: base64.b64encode(payload).decode("ascii")}


def _columns(activity_id: str, person: str, created: Any, enqueued_at: Any) -> dict[str, Any]:
    return {
        "activity_id": str(activity_id),
        "person_hash": str(person),
        "created": None if created is None else float(created),
        "enqueued_at": float(enqueued_at),
    }


def _add(a: Exported, b: Exported) -> Exported:
    return Exported(a.queued + b.queued, a.dead_letters + b.dead_letters)


def _open_source(path: str) -> sqlite3.Connection:
    if not Path(path).exists():
        raise SpoolError(f"no spool at {path}")
    db = _connect(path)
    try:
        if schema.check_version(db, path) == 0:
            raise SpoolError(f"{path} is not a spool file")
        schema.ensure_schema(db, path)  # an older file gets its columns first
    except BaseException:
        db.close()
        raise
    return db


def _connect(path: str) -> sqlite3.Connection:
    db = schema.connect(path)
    db.execute(f"PRAGMA busy_timeout={schema.BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


# -- import ------------------------------------------------------------------------------


def import_file(source: Path, target: str, *, clock: Callable[[], float] = time.time) -> Imported:
    """Append the rows exported in `source` to the spool file `target` (created if
    missing), skipping every activity it already has or once imported.

    The whole file is checked before anything is imported: a damaged line changes nothing.
    """
    for _ in _records(source):
        pass
    db = _open_target(target)
    try:
        present = _present_keys(db)
        now = clock()
        db.execute("DELETE FROM imported_keys WHERE imported_at < ?", (now - IMPORTED_KEYS_KEEP,))
        done = Imported()
        chunk: list[_Record] = []
        for record in _records(source):
            chunk.append(record)
            if len(chunk) == IMPORT_CHUNK:
                done = _import_chunk(db, chunk, present, now, done)
                chunk = []
        return _import_chunk(db, chunk, present, now, done) if chunk else done
    finally:
        db.close()


def _import_chunk(
    db: sqlite3.Connection, chunk: list[_Record], present: set[str], now: float, done: Imported
) -> Imported:
    queued, dead, duplicates = done.queued, done.dead_letters, done.duplicates
    db.execute("BEGIN IMMEDIATE")
    try:
        for record in chunk:
            key = record.key
            seen = db.execute("SELECT 1 FROM imported_keys WHERE key = ?", (key,)).fetchone()
            if key in present or seen is not None:
                duplicates += 1
                continue
            db.execute("INSERT INTO imported_keys (key, imported_at) VALUES (?, ?)", (key, now))
            _insert(db, record)
            present.add(key)
            if record.kind == QUEUED:
                queued += 1
            else:
                dead += 1
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return Imported(queued, dead, duplicates)


def _insert(db: sqlite3.Connection, record: _Record) -> None:
    """Queue the record with its columns; a dead letter goes through the queue (its id is
    then a queue id no later row can take, as every dead letter's is)."""
    item = QueuedActivity(record.payload, record.activity_id, record.person_hash, record.created)
    values = [*schema.put_values([item], record.enqueued_at), record.attempts]
    cursor = db.execute(
        f"INSERT INTO queue ({schema.QUEUE_PUT}, attempts)"  # noqa: S608 - names from schema
        f" VALUES ({', '.join('?' * len(values))})",
        values,
    )
    if record.kind == DEAD_LETTER:
        row_id = cursor.lastrowid
        assert row_id is not None
        letter = (row_id, record.activity_id, record.person_hash, record.error)
        dead_letters.bury(db, [letter], record.failed_at)


def _present_keys(db: sqlite3.Connection) -> set[str]:
    """The keys of every activity the target holds, queued or dead."""
    rows = db.execute("SELECT payload FROM queue UNION ALL SELECT payload FROM dead_letters")
    return {activity_key(bytes(payload)) for (payload,) in rows}


def _open_target(path: str) -> sqlite3.Connection:
    """The target spool file, created (as a gateway would) if missing."""
    file = Path(path)
    created = not file.exists()
    if created:
        file.parent.mkdir(parents=True, exist_ok=True)
    db = _connect(path)
    try:
        if not created and file.stat().st_size and schema.check_version(db, path) == 0:
            raise SpoolError(f"{path} is not a spool file")
        mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise SpoolError(f"cannot put {path} in WAL mode (journal_mode={mode})")
        schema.ensure_schema(db, path)
    except BaseException:
        db.close()
        raise
    if created:
        fsync_dir(file.parent)
    return db


def _records(source: Path) -> Iterator[_Record]:
    """The rows of an export file; SpoolError naming the first line that is not one."""
    try:
        with open(source, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield _record(orjson.loads(line))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise SpoolError(f"{source}:{number}: not an exported row ({exc})") from None
    except OSError as exc:
        raise SpoolError(f"cannot read {source}: {exc}") from exc


def _record(line: dict[str, Any]) -> _Record:
    kind = line["kind"]
    if kind not in (QUEUED, DEAD_LETTER):
        raise ValueError(f"kind {kind!r}")
    if _RAW in line:
        payload = base64.b64decode(str(line[_RAW]), validate=True)
    else:
        payload = orjson.dumps(line["activity"])
    created = line["created"]
    dead = kind == DEAD_LETTER
    return _Record(
        kind=kind,
        payload=payload,
        activity_id=_text(line["activity_id"]),
        person_hash=_text(line["person_hash"]),
        created=None if created is None else float(created),
        enqueued_at=float(line["enqueued_at"]),
        attempts=0 if dead else int(line["attempts"]),
        error=_text(line["error"]) if dead else "",
        failed_at=float(line["failed_at"]) if dead else 0.0,
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
