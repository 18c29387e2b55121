"""Durable activity queue: SQLite (WAL, ``synchronous=FULL``) with group commit.

Design. One ``_Writer`` owns the only ``sqlite3`` connection (``check_same_thread`` stays
on and guards against misuse). Every call builds an operation carrying an
``asyncio.Future`` and drops it on a ``queue.SimpleQueue``; the writer takes what is
queued (up to ``max_group`` rows), runs all writes of that group in ONE transaction with
ONE commit, and only then resolves the futures. The writer runs in one of two places
(``commit_on``):

- ``"thread"``: a daemon thread blocks for the first operation, takes everything else
  already queued (optionally lingering ``commit_interval`` seconds for more), and resolves
  the futures through ``loop.call_soon_threadsafe``. While one group is being fsynced the
  next one accumulates, so the commit rate adapts to load without a timer. Each time the
  thread comes back from SQLite it must take the GIL from the busy event loop.
- ``"loop"``: the first queued operation schedules a flush with ``call_soon`` (or
  ``call_later(commit_interval)``); every request read in the same loop turn joins that
  group, and the loop blocks for its one fsync. No hand-off, no GIL wait: on a disk that
  flushes in well under a millisecond this has the lower latency.
- ``"auto"`` (the default) picks ``"loop"`` for ``:memory:`` or when the median of a few
  fsyncs in the spool's directory is below ``FAST_FSYNC_SECONDS``, else ``"thread"``.

Either way durability costs one fsync per group, not per request.

Durability. WAL with ``synchronous=FULL`` fsyncs the log at every commit, so a
commit that returned survives power loss, not only a process crash (``NORMAL``
would only survive the latter). ``put`` resolves, and the handler answers 202,
strictly after ``COMMIT`` returned. Each other operation runs inside a SAVEPOINT, so one
failing operation is undone alone while the rest of the group commits; the group's puts
are inserted together by one statement after their room was checked (a full spool
refuses a put before any SQL), so a put's rows are all present or all absent. Moves (ack = delete,
dead letter = insert + delete, replay = insert + delete) are single transactions, so
a SIGKILL or power cut at any instant leaves every committed row either queued or
acked/dead-lettered, never both or neither. If a COMMIT fails, every operation of
that group is reported failed (a caller may then retry: at-least-once, and Ortto
merges repeats by ``key`` + ``created``). Row ids come from AUTOINCREMENT, so they
are never reused and delivery order is id order, across restarts too.

Leases are in memory only (owned by the writer): after a crash every row
not acked is simply available again, so there is nothing to recover. For the same reason
a release always gives its rows back, even when its attempt count cannot be written.

A full or read-only disk. A write that fails for a database error (not another process's
lock) sets `write_error`, logged once as an ERROR; the next write that commits clears it
(logged as INFO). Meanwhile the writer tries a small write every PROBE_INTERVAL, since
puts are refused and nothing else might write. A failed ack leaves its rows leased, so
the caller can retry it without the rows being sent again meanwhile. Capacity
(rows and payload bytes) is checked by the writer, which serialises all
writes: concurrent puts cannot overshoot the bound and no reservation bookkeeping
is needed. Counters (depth, bytes, oldest, dead letters) are computed once at open
and maintained by the writer, which publishes a snapshot with every group. Another
process may open the same file (the dead-letters CLI replaying while the gateway
runs): SQLite's locking keeps that safe, and the writer notices foreign commits via
``PRAGMA data_version`` (per group, and every second when idle) and recounts.

``path=":memory:"`` runs the very same code against an in-memory database (not
durable): the honest baseline for measuring what durability costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

__all__ = [
    "MEMORY",
    "DeadLetter",
    "Spool",
    "SpoolClosed",
    "SpoolError",
    "SpoolFull",
    "SpoolInUse",
    "SpoolOpenError",
    "SpoolStats",
    "SpooledItem",
    "claim",
    "ensure_schema",
    "fsync_dir",
    "in_use",
]

logger = logging.getLogger(__name__)

MEMORY = ":memory:"
SCHEMA_VERSION = 1
# Ids per statement when acknowledging (well under SQLite's limit on bound variables).
ACK_CHUNK = 500
# Where a group commits: on the event loop itself, or on the writer thread; "auto" picks
# "loop" when the spool's disk flushes fast (see `choose_commit_mode`).
COMMIT_MODES = ("auto", "loop", "thread")
# "auto": commit on the loop when the median fsync of the spool's directory is below this.
FAST_FSYNC_SECONDS = 0.0005
FSYNC_PROBES = 16
# Rows per INSERT statement (two bound values each; SQLite before 3.32 allows 999).
INSERT_CHUNK = 450
# Long enough to ride out a concurrent admin process (dead-letters CLI) holding the lock.
BUSY_TIMEOUT_MS = 5000
# "loop" mode: how soon a group retries while another process holds the write lock.
BUSY_RETRY_SECONDS = 0.01
# Truncate the WAL back to this size after checkpoints so a burst does not keep disk forever.
JOURNAL_SIZE_LIMIT = 64 << 20
# Retry-After bounds (seconds): never tell a client "now" when full, never an hour.
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 30.0
# Retry-After when nothing has been drained recently (delivery stalled or just started).
RETRY_AFTER_UNKNOWN = 5.0
# How often an idle writer checks for commits by another process (the dead-letters CLI).
EXTERNAL_CHECK_INTERVAL = 1.0
# Window over which the drain rate (acks + dead letters) is measured for Retry-After.
DRAIN_WINDOW = 60.0
# While writes fail (full or read-only disk), how often an idle writer tries a small write
# to notice that they work again: nothing else may write meanwhile (puts are refused).
PROBE_INTERVAL = 1.0

_SCHEMA = (
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
# Dead-letter filters: error_contains is bound twice (NULL means "any error").
_DEAD_MATCHING = (
    "SELECT id, length(payload) FROM dead_letters"
    " WHERE (? IS NULL OR instr(lower(error), lower(?)) > 0)"
)
_DEAD_MATCHING_ALL = _DEAD_MATCHING + " ORDER BY id"
_DEAD_MATCHING_ONE = _DEAD_MATCHING + " AND id = ?"
_DEAD_LIST = (
    "SELECT id, payload, activity_id, person_hash, error, failed_at, enqueued_at"
    " FROM dead_letters WHERE (? IS NULL OR instr(lower(error), lower(?)) > 0)"
    " ORDER BY failed_at DESC, id DESC LIMIT ?"
)
_QUEUE_ONE = "SELECT id, payload, enqueued_at, attempts FROM queue WHERE id = ?"
_QUEUE_AFTER = (
    "SELECT id, payload, enqueued_at, attempts FROM queue WHERE id > ? ORDER BY id LIMIT ?"
)

T = TypeVar("T")


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


def connect(path: str) -> sqlite3.Connection:
    """The writer's connection; transactions are explicit (BEGIN ... COMMIT). Looked up at
    each open, so a test can hand the spool a disk that fills up on demand."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=True)


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


@dataclass(frozen=True, slots=True)
class SpooledItem:
    """One queued activity as handed to the delivery worker."""

    id: int
    payload: bytes
    enqueued_at: float
    attempts: int


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


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Queue gauges from in-memory counters."""

    depth: int
    bytes: int
    oldest_enqueued_at: float | None
    dead_letters: int


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Counters published by the writer thread after every group."""

    depth: int = 0
    bytes: int = 0
    oldest_enqueued_at: float | None = None
    dead_letters: int = 0
    available: int = 0
    leased: int = 0
    commits: int = 0
    write_error: str | None = None  # why writes fail, until one succeeds again


# --- operations: built on the loop, executed by the writer thread -------------------------


@dataclass(eq=False)
class _Op(Generic[T]):
    """A unit of work and the future its caller awaits."""

    future: asyncio.Future[T]
    # Writes run in this order within a group (removals first to free room); None = read.
    phase: ClassVar[int | None] = None

    @property
    def size(self) -> int:
        """Rows this operation touches, counted against ``max_group``."""
        return 1


@dataclass(eq=False)
class _Ack(_Op[None]):
    phase: ClassVar[int | None] = 0
    ids: tuple[int, ...]

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.ids)


@dataclass(eq=False)
class _DeadLetterOp(_Op[None]):
    phase: ClassVar[int | None] = 1
    items: tuple[tuple[int, str, str, str], ...]

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.items)


@dataclass(eq=False)
class _Purge(_Op[int]):
    phase: ClassVar[int | None] = 2
    ids: tuple[int, ...] | None
    error_contains: str | None


@dataclass(eq=False)
class _Release(_Op[None]):
    phase: ClassVar[int | None] = 3
    ids: tuple[int, ...]
    attempt: bool

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.ids)


@dataclass(eq=False)
class _Put(_Op[list[int]]):
    phase: ClassVar[int | None] = 4
    payloads: tuple[bytes, ...]
    nbytes: int

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.payloads)


@dataclass(eq=False)
class _Replay(_Op[int]):
    phase: ClassVar[int | None] = 5
    ids: tuple[int, ...] | None
    error_contains: str | None


@dataclass(eq=False)
class _Lease(_Op[list[SpooledItem]]):
    max_items: int
    max_bytes: int


@dataclass(eq=False)
class _ListDead(_Op[list[DeadLetter]]):
    limit: int
    error_contains: str | None


# (operation, succeeded, result or exception)
_Outcome = tuple[_Op[Any], bool, object]


@dataclass
class _Effect:
    """What a write changes in memory once its transaction has committed."""

    rows: int = 0
    nbytes: int = 0
    dead: int = 0
    drained_rows: int = 0
    drained_bytes: int = 0
    after: Callable[[], None] | None = None


@dataclass
class _Counters:
    """Working copy of the counters while a group is being written."""

    depth: int
    nbytes: int
    dead: int

    def add(self, effect: _Effect) -> None:
        """Apply an operation's deltas."""
        self.depth += effect.rows
        self.nbytes += effect.nbytes
        self.dead += effect.dead


class _Busy(Exception):
    """In "loop" mode another process holds the write lock: run the group again later."""


class _FatalGroupError(Exception):
    """The open transaction was lost mid-group; the whole group must fail."""


class _Writer:
    """The writer thread: owns the connection, the committed counters and the leases."""

    def __init__(
        self,
        spool: Spool,
        loop: asyncio.AbstractEventLoop,
        ops: queue.SimpleQueue[_Op[Any] | None],
        path: str,
        *,
        max_rows: int,
        max_bytes: int,
        commit_interval: float,
        max_group: int,
    ) -> None:
        self._spool = spool
        self._loop = loop
        self._ops = ops
        self.on_loop = False  # "loop" mode: groups run on the event loop's own thread
        self._path = path
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._commit_interval = commit_interval
        self._max_group = max_group
        self._db: sqlite3.Connection | None = None
        self._data_version: object = None
        self._checked_external = 0.0
        self._write_error: str | None = None
        self._probed = 0.0
        self._depth = 0
        self._bytes = 0
        self._dead = 0
        self._oldest: float | None = None
        self._commits = 0
        # Leases: every queued id <= _cursor is either in _leased or in _returned.
        self._cursor = 0
        self._leased: set[int] = set()
        self._returned: set[int] = set()
        self._drained: deque[tuple[float, int, int]] = deque()

    # -- thread body -------------------------------------------------------------------

    def run(self) -> None:
        """Open the database, then serve groups of operations until told to stop."""
        error: BaseException | None = None
        try:
            try:
                snapshot = self._connect()
            except BaseException as exc:
                self._post(self._spool._on_open, exc)
                return
            self._post(self._spool._on_open, snapshot)
            stop = False
            while not stop:
                group, stop = self._collect()
                self.process_or_fail(group)
        except BaseException as exc:
            error = exc
        finally:
            self.close_db()
            self._post(self._spool._on_stop, error)

    def process_or_fail(self, group: list[_Op[Any]]) -> None:
        """Run one group; if that fails outright, fail each of its operations, then raise."""
        try:
            self._process(group)
        except _Busy:
            raise
        except BaseException as exc:
            failure = SpoolError(f"spool writer failed: {exc!r}")
            self._post(
                self._spool._on_group,
                [(op, False, failure) for op in group],
                self._snapshot(),
            )
            raise

    def take_group(self) -> list[_Op[Any]]:
        """What is queued now, up to ``max_group`` rows, without waiting ("loop" mode)."""
        group: list[_Op[Any]] = []
        rows = 0
        while rows < self._max_group:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op is not None:
                group.append(op)
                rows += op.size
        return group

    def check_external(self) -> None:
        """Publish the counters if another process changed the file (the idle check)."""
        if self._external_change_due():
            self._post(self._spool._on_group, [], self._snapshot())

    def probe(self) -> None:
        """While writes fail, at most once per PROBE_INTERVAL: try a small committed write
        (what a put needs: the write lock, a WAL frame, an fsync) and publish the outcome.

        Puts are refused while the spool cannot be written, so without this nothing might
        ever write again to notice that the disk has room.
        """
        now = time.monotonic()
        if self._write_error is None or self._db is None or now - self._probed < PROBE_INTERVAL:
            return
        self._probed = now
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # rewrites the header page
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._note_write_failure(exc)
        else:
            self._write_error = None
        self._post(self._spool._on_group, [], self._snapshot())

    def _note_write_failure(self, exc: BaseException) -> None:
        """Remember why a write failed, unless it only met another process's lock."""
        cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
        if not isinstance(cause, sqlite3.Error):
            return
        if cause.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return
        self._write_error = str(cause)

    def set_busy_timeout(self, ms: int) -> None:
        """How long SQLite waits for another process's lock: 0 on the loop (see `_Busy`),
        BUSY_TIMEOUT_MS on the thread and when closing."""
        if self._db is not None:
            self._db.execute(f"PRAGMA busy_timeout={ms}")

    def close_db(self) -> None:
        """Close the connection, if open."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        if self.on_loop:  # already on the loop: answer now, not one loop turn later
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _collect(self) -> tuple[list[_Op[Any]], bool]:
        """Block for one operation, then take what else is queued (the group)."""
        while True:
            try:
                first = self._ops.get(timeout=EXTERNAL_CHECK_INTERVAL)
                break
            except queue.Empty:
                self.check_external()  # e.g. a replay by the CLI: wake the worker
                self.probe()
        if first is None:
            return [], True
        group = [first]
        rows = first.size
        deadline = time.monotonic() + self._commit_interval
        while rows < self._max_group:
            remaining = deadline - time.monotonic()
            try:
                op = self._ops.get(timeout=remaining) if remaining > 0 else self._ops.get_nowait()
            except queue.Empty:
                break
            if op is None:
                return group, True
            group.append(op)
            rows += op.size
        return group, False

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> _Snapshot:
        created = False
        memory = self._path == MEMORY
        if not memory:
            file = Path(self._path)
            file.parent.mkdir(parents=True, exist_ok=True)
            # Empty: just created by `claim` (an exclusive spool), or by nobody yet.
            created = not file.exists() or file.stat().st_size == 0
        db = connect(self._path)
        self._db = db
        mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        if not memory and mode != "wal":
            raise SpoolError(f"cannot put {self._path} in WAL mode (journal_mode={mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA fullfsync=ON")  # macOS: a real flush to media; no-op elsewhere
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        if db.execute("PRAGMA synchronous").fetchone()[0] != 2:
            raise SpoolError("cannot set synchronous=FULL")
        ensure_schema(db, self._path)
        if created:
            fsync_dir(Path(self._path).parent)
        self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        self._load_counters()
        return self._snapshot()

    def _load_counters(self) -> None:
        assert self._db is not None
        depth, nbytes = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM queue"
        ).fetchone()
        self._depth, self._bytes = int(depth), int(nbytes)
        self._dead = int(self._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
        self._refresh_oldest()

    def _external_change_due(self) -> bool:
        """`_external_change`, at most once per EXTERNAL_CHECK_INTERVAL."""
        now = time.monotonic()
        if now - self._checked_external < EXTERNAL_CHECK_INTERVAL:
            return False
        self._checked_external = now
        return self._external_change()

    def _external_change(self) -> bool:
        """Reload the counters if another connection (process) committed since we looked."""
        assert self._db is not None
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return False
            self._data_version = version
            self._load_counters()
        except sqlite3.Error:
            logger.warning("spool: cannot check for changes by other processes", exc_info=True)
            return False
        return True

    def _refresh_oldest(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT enqueued_at FROM queue ORDER BY id LIMIT 1").fetchone()
        self._oldest = None if row is None else float(row[0])

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            depth=self._depth,
            bytes=self._bytes,
            oldest_enqueued_at=self._oldest,
            dead_letters=self._dead,
            available=self._depth - len(self._leased),
            leased=len(self._leased),
            commits=self._commits,
            write_error=self._write_error,
        )

    # -- one group -------------------------------------------------------------------------

    def _process(self, group: list[_Op[Any]]) -> None:
        if not group:
            return
        # Another process (the dead-letters command) rarely writes: look once a second, not
        # per group; `lease` reads the table itself, so only the counters can lag, briefly.
        # (The group's snapshot publishes whatever the look found.)
        self._external_change_due()
        self.probe()  # while writes fail, a group of reads alone would never notice the end
        writes = sorted((op for op in group if op.phase is not None), key=_phase)
        reads = [op for op in group if op.phase is None]
        outcomes: list[_Outcome] = []
        # Operations of one group were all in flight together, so any order is a valid
        # serialisation: writes (removals first) and their commit, then reads.
        if writes:
            self._write(writes, outcomes)
            # Only a removal can change the oldest row, or a put into an empty queue.
            if self._oldest is None or any(not isinstance(op, _Put) for op in writes):
                self._refresh_oldest()
        for op in reads:
            try:
                outcomes.append((op, True, self._read(op)))
            except sqlite3.Error as exc:
                outcomes.append((op, False, _db_error(exc)))
        self._post(self._spool._on_group, outcomes, self._snapshot())

    def _write(self, ops: list[_Op[Any]], outcomes: list[_Outcome]) -> None:
        db = self._db
        assert db is not None
        work = _Counters(self._depth, self._bytes, self._dead)
        done: list[tuple[_Op[Any], object, _Effect]] = []
        failed: list[_Outcome] = []
        now = time.time()
        changes = db.total_changes
        op_error: sqlite3.Error | None = None  # an operation undone alone for a database error
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # On the loop, never wait for another process's transaction (the
                # dead-letters command replaying): give the group back before any of it ran.
                busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if self.on_loop and busy:
                    raise _Busy from exc
                raise
            puts = [op for op in ops if isinstance(op, _Put)]
            for op in ops:
                if isinstance(op, _Put):
                    if op is puts[0]:  # in phase order: after the removals, all at once
                        self._put_all(puts, work, now, done, failed)
                    continue
                db.execute("SAVEPOINT op")
                try:
                    result, effect = self._apply(op, work, now)
                except (SpoolError, sqlite3.Error) as exc:
                    if not db.in_transaction:  # SQLite rolled it all back (SQLITE_FULL may)
                        raise _FatalGroupError(str(exc)) from exc
                    try:  # undo this operation alone; the rest of the group still commits
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    except sqlite3.Error as undo:
                        raise _FatalGroupError(f"cannot roll back one operation: {undo}") from exc
                    if isinstance(exc, sqlite3.Error):
                        op_error = exc
                    failed.append(
                        self._failed(op, exc if isinstance(exc, SpoolError) else _db_error(exc))
                    )
                else:
                    db.execute("RELEASE op")
                    work.add(effect)
                    done.append((op, result, effect))
                if not db.in_transaction:  # SQLite rolled the whole transaction back
                    raise _FatalGroupError("transaction rolled back by SQLite")
            db.execute("COMMIT")
        except (sqlite3.Error, _FatalGroupError) as exc:
            # Nothing of this group is durable: report every operation failed.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            self._note_write_failure(exc)
            failure = _db_error(exc)
            outcomes.extend(self._failed(op, failure) for op in ops)
            return
        if op_error is not None:
            self._note_write_failure(op_error)
        elif db.total_changes > changes:  # a write that needed the disk went through
            self._write_error = None
        outcomes.extend(failed)
        if done:  # a group whose every operation was refused wrote nothing
            self._commits += 1
        self._depth, self._bytes, self._dead = work.depth, work.nbytes, work.dead
        drained_rows = drained_bytes = 0
        for op, result, effect in done:
            if effect.after is not None:
                effect.after()
            drained_rows += effect.drained_rows
            drained_bytes += effect.drained_bytes
            outcomes.append((op, True, result))
        if drained_rows:
            self._drained.append((time.monotonic(), drained_rows, drained_bytes))

    def _failed(self, op: _Op[Any], error: SpoolError) -> _Outcome:
        """The outcome of a write that did not commit.

        A release still succeeds: leases live in memory, so the rows are given back all
        the same and only the attempt count is lost. Failing it would leave them leased
        (never sent again until a restart) for want of a counter.
        """
        if isinstance(op, _Release):
            self._return_leases(op.ids)
            return (op, True, None)
        return (op, False, error)

    def _apply(self, op: _Op[Any], work: _Counters, now: float) -> tuple[object, _Effect]:
        if isinstance(op, _Ack):
            return None, self._ack(op.ids)
        if isinstance(op, _DeadLetterOp):
            return None, self._dead_letter(op.items, now)
        if isinstance(op, _Release):
            return None, self._release(op.ids, op.attempt)
        if isinstance(op, _Replay):
            return self._replay(op, work, now)
        if isinstance(op, _Purge):
            return self._purge(op)
        raise TypeError(f"not a write: {op!r}")

    def _put_all(
        self,
        puts: list[_Put],
        work: _Counters,
        now: float,
        done: list[tuple[_Op[Any], object, _Effect]],
        failed: list[_Outcome],
    ) -> None:
        """Insert every put of the group with one statement per INSERT_CHUNK rows.

        A put can only be refused for room, which is decided here before any SQL, so
        puts need no SAVEPOINT each. Each SQLite call releases the GIL and must take it
        back from the busy event loop (a wait of up to the switch interval), so a group
        of puts is one multi-row INSERT, not an `executemany` (one call per row), and
        the last id comes from `lastrowid`, not a query. Under full load this took a
        group commit from a median of 5 ms to ~1 ms. The ids are consecutive: this
        thread is the only writer and holds the write lock (BEGIN IMMEDIATE), so an
        AUTOINCREMENT table hands out one more than the largest id each time.
        """
        assert self._db is not None
        accepted: list[_Put] = []
        for op in puts:
            try:
                self._check_room(work, len(op.payloads), op.nbytes)
            except SpoolFull as exc:
                failed.append((op, False, exc))
                continue
            work.add(_Effect(rows=len(op.payloads), nbytes=op.nbytes))
            accepted.append(op)
        rows = [payload for op in accepted for payload in op.payloads]
        if not rows:
            return
        try:
            for start in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[start : start + INSERT_CHUNK]
                cursor = self._db.execute(
                    "INSERT INTO queue (payload, enqueued_at) VALUES "  # noqa: S608
                    + ",".join(["(?, ?)"] * len(chunk)),
                    [value for payload in chunk for value in (payload, now)],
                )
            last = cursor.lastrowid
        except sqlite3.Error as exc:
            raise _FatalGroupError(f"cannot insert: {exc}") from exc
        assert last is not None
        next_id = last - len(rows) + 1
        for op in accepted:
            ids = list(range(next_id, next_id + len(op.payloads)))
            next_id += len(op.payloads)
            # Already counted in `work` above: the effect here is for the bookkeeping after
            # commit, so it carries no deltas of its own.
            done.append((op, ids, _Effect()))

    def _ack(self, ids: tuple[int, ...]) -> _Effect:
        assert self._db is not None
        rows = nbytes = 0
        unique = list(dict.fromkeys(ids))
        # Two statements per chunk rather than two per row: each SQLite call is a trip
        # through the GIL, which the event loop keeps busy.
        for start in range(0, len(unique), ACK_CHUNK):
            chunk = unique[start : start + ACK_CHUNK]
            marks = ",".join("?" * len(chunk))
            count, total = self._db.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM queue"  # noqa: S608
                f" WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            self._db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)  # noqa: S608
            rows += int(count)
            nbytes += int(total)
        return _Effect(
            rows=-rows,
            nbytes=-nbytes,
            drained_rows=rows,
            drained_bytes=nbytes,
            after=lambda: self._forget(ids),
        )

    def _dead_letter(self, items: tuple[tuple[int, str, str, str], ...], now: float) -> _Effect:
        assert self._db is not None
        rows = nbytes = 0
        seen: set[int] = set()
        for row_id, activity_id, person_hash, error in items:
            if row_id in seen:
                continue
            seen.add(row_id)
            row = self._db.execute(
                "SELECT payload, enqueued_at FROM queue WHERE id = ?", (row_id,)
            ).fetchone()
            if row is None:
                continue
            payload, enqueued_at = row
            self._db.execute(
                "INSERT INTO dead_letters (id, payload, activity_id, person_hash, error,"
                " failed_at, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row_id, payload, activity_id, person_hash, error, now, enqueued_at),
            )
            self._db.execute("DELETE FROM queue WHERE id = ?", (row_id,))
            rows += 1
            nbytes += len(payload)
        return _Effect(
            rows=-rows,
            nbytes=-nbytes,
            dead=rows,
            drained_rows=rows,
            drained_bytes=nbytes,
            after=lambda: self._forget(tuple(seen)),
        )

    def _release(self, ids: tuple[int, ...], attempt: bool) -> _Effect:
        assert self._db is not None
        if attempt:
            for row_id in dict.fromkeys(ids):
                self._db.execute("UPDATE queue SET attempts = attempts + 1 WHERE id = ?", (row_id,))

        return _Effect(after=lambda: self._return_leases(ids))

    def _return_leases(self, ids: Sequence[int]) -> None:
        """Leased rows become available again (those still leased: not acked meanwhile)."""
        for row_id in ids:
            if row_id in self._leased:
                self._leased.discard(row_id)
                self._returned.add(row_id)

    def _replay(self, op: _Replay, work: _Counters, now: float) -> tuple[int, _Effect]:
        assert self._db is not None
        matches = self._matching_dead(op.ids, op.error_contains)
        nbytes = sum(size for _, size in matches)
        self._check_room(work, len(matches), nbytes)
        for row_id, _ in matches:
            self._db.execute(
                "INSERT INTO queue (payload, enqueued_at, attempts)"
                " SELECT payload, ?, 0 FROM dead_letters WHERE id = ?",
                (now, row_id),
            )
            self._db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
        return len(matches), _Effect(rows=len(matches), nbytes=nbytes, dead=-len(matches))

    def _purge(self, op: _Purge) -> tuple[int, _Effect]:
        assert self._db is not None
        matches = self._matching_dead(op.ids, op.error_contains)
        for row_id, _ in matches:
            self._db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
        return len(matches), _Effect(dead=-len(matches))

    def _matching_dead(
        self, ids: tuple[int, ...] | None, error_contains: str | None
    ) -> list[tuple[int, int]]:
        """(id, payload size) of the dead letters matching both filters, in id order."""
        assert self._db is not None
        if ids is None:
            rows = self._db.execute(_DEAD_MATCHING_ALL, (error_contains, error_contains))
            return [(int(i), int(size)) for i, size in rows]
        found: list[tuple[int, int]] = []
        for row_id in sorted(set(ids)):
            row = self._db.execute(
                _DEAD_MATCHING_ONE, (error_contains, error_contains, row_id)
            ).fetchone()
            if row is not None:
                found.append((int(row[0]), int(row[1])))
        return found

    def _check_room(self, work: _Counters, rows: int, nbytes: int) -> None:
        row_excess = work.depth + rows - self._max_rows
        byte_excess = work.nbytes + nbytes - self._max_bytes
        if row_excess > 0 or byte_excess > 0:
            raise SpoolFull(self._retry_after(row_excess, byte_excess))

    def _retry_after(self, row_excess: int, byte_excess: int) -> float:
        """Seconds until the recent drain rate would make room, clamped."""
        now = time.monotonic()
        while self._drained and self._drained[0][0] < now - DRAIN_WINDOW:
            self._drained.popleft()
        if not self._drained:
            return RETRY_AFTER_UNKNOWN
        span = max(now - self._drained[0][0], 1.0)
        row_rate = sum(rows for _, rows, _ in self._drained) / span
        byte_rate = sum(nbytes for _, _, nbytes in self._drained) / span
        estimate = max(max(row_excess, 0) / row_rate, max(byte_excess, 0) / max(byte_rate, 1.0))
        return min(max(estimate, RETRY_AFTER_MIN), RETRY_AFTER_MAX)

    def _forget(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            self._leased.discard(row_id)
            self._returned.discard(row_id)

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, op: _Op[Any]) -> object:
        if isinstance(op, _Lease):
            return self._lease(op.max_items, op.max_bytes)
        if isinstance(op, _ListDead):
            return self._list_dead(op.limit, op.error_contains)
        raise TypeError(f"not a read: {op!r}")

    def _lease(self, max_items: int, max_bytes: int) -> list[SpooledItem]:
        assert self._db is not None
        items: list[SpooledItem] = []
        total = 0

        def take(row: tuple[Any, ...]) -> bool:
            nonlocal total
            item = SpooledItem(int(row[0]), bytes(row[1]), float(row[2]), int(row[3]))
            if items and (len(items) >= max_items or total + len(item.payload) > max_bytes):
                return False
            items.append(item)
            total += len(item.payload)
            return True

        full = False
        # Released ids are all below the cursor, hence older than anything past it.
        for row_id in sorted(self._returned):
            row = self._db.execute(_QUEUE_ONE, (row_id,)).fetchone()
            if row is None:
                self._returned.discard(row_id)
            elif not take(row):
                full = True
                break
        if not full and len(items) < max_items:
            rows = self._db.execute(_QUEUE_AFTER, (self._cursor, max_items - len(items)))
            for row in rows:
                if not take(row):
                    break
        for item in items:
            self._returned.discard(item.id)
            self._leased.add(item.id)
            self._cursor = max(self._cursor, item.id)
        return items

    def _list_dead(self, limit: int, error_contains: str | None) -> list[DeadLetter]:
        assert self._db is not None
        rows = self._db.execute(_DEAD_LIST, (error_contains, error_contains, limit))
        return [
            DeadLetter(
                int(r[0]), bytes(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]), float(r[6])
            )
            for r in rows
        ]


def ensure_schema(db: sqlite3.Connection, path: str) -> None:
    """Create the spool's tables if missing; SpoolError if the file is from a newer gateway."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SpoolError(f"{path} has schema {version}, newer than this gateway")
        for statement in _SCHEMA:
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


def _phase(op: _Op[Any]) -> int:
    assert op.phase is not None
    return op.phase


def _db_error(exc: BaseException) -> SpoolError:
    error = SpoolError(f"spool database error: {exc}")
    error.__cause__ = exc
    return error


def fsync_dir(directory: Path) -> None:
    """Make a new database file's directory entry durable (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def choose_commit_mode(path: str) -> str:
    """ "loop" for an in-memory spool or a disk whose fsync is fast, else "thread".

    On the loop, a group's commit blocks the event loop for one fsync, and no thread
    hand-off is paid (each one waits for the busy loop to release the GIL): measured here
    with fsync at 0.2 ms, p99 at 1,500 requests/s went from 10-11 ms to 7-8 ms. With a
    slow disk the blocked loop would cost more than the hand-offs, so the thread commits.
    """
    if path == MEMORY:
        return "loop"
    try:
        directory = Path(path).parent
        directory.mkdir(parents=True, exist_ok=True)
        times = fsync_times(directory, FSYNC_PROBES)
    except OSError:
        return "thread"  # opening the spool will report the real problem
    return "loop" if times[len(times) // 2] < FAST_FSYNC_SECONDS else "thread"


def fsync_times(directory: Path, count: int) -> list[float]:
    """Seconds each of `count` 4 KiB write + fsync took in `directory`, ascending (what
    one group commit waits for); the probe file is removed."""
    probe = directory / f".fsync-probe-{os.getpid()}"
    times: list[float] = []
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(count):
            os.write(fd, i.to_bytes(4, "little") * 1024)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return sorted(times)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a fire-and-forget future's outcome so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


class Spool:
    """A bounded durable FIFO of encoded activities with in-memory leases."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_rows: int = 1_000_000,
        max_bytes: int = 1 << 30,
        commit_interval: float = 0.0,
        max_group: int = 1000,
        commit_on: str = "auto",
        exclusive: bool = False,
    ) -> None:
        """`exclusive`: hold the file for this process while open (`claim`), as a gateway
        that drains it does; tools that only read or replay leave it False."""
        if max_rows < 1 or max_bytes < 1 or max_group < 1 or commit_interval < 0:
            raise ValueError("max_rows, max_bytes, max_group must be >= 1, commit_interval >= 0")
        if commit_on not in COMMIT_MODES:
            raise ValueError(f"commit_on must be one of {', '.join(COMMIT_MODES)}")
        self._path = os.fspath(path)
        self._commit_on = commit_on
        self._exclusive = exclusive
        self._claim: int | None = None  # the descriptor holding the file (exclusive)
        # "loop" mode: the writer runs on the event loop; a flush is scheduled (or running).
        self._inline: _Writer | None = None
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._busy_group: list[_Op[Any]] = []  # "loop" mode: to retry once the lock is free
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._commit_interval = commit_interval
        self._max_group = max_group
        self._ops: queue.SimpleQueue[_Op[Any] | None] = queue.SimpleQueue()
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._snapshot = _Snapshot()
        # Rows and bytes of puts submitted but not yet answered, and of reservations
        # (for has_room).
        self._pending_rows = 0
        self._pending_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # wait_for_items: (how many unleased items, future resolved once there are that many)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._opened: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    @property
    def path(self) -> str:
        """The database path (``:memory:`` for the in-memory variant)."""
        return self._path

    @property
    def commit_on(self) -> str:
        """Where groups commit: "loop" or "thread" ("auto" until opened)."""
        return self._commit_on

    @property
    def depth(self) -> int:
        """Rows in the queue, leased ones included."""
        return self._snapshot.depth

    @property
    def available(self) -> int:
        """Rows in the queue that are not leased (what ``lease`` could return now)."""
        return self._snapshot.available

    @property
    def leased(self) -> int:
        """Rows currently leased to a delivery worker."""
        return self._snapshot.leased

    @property
    def max_rows(self) -> int:
        """The row bound: a put of more rows can never fit."""
        return self._max_rows

    @property
    def max_bytes(self) -> int:
        """The payload byte bound: a put of more bytes can never fit."""
        return self._max_bytes

    @property
    def write_error(self) -> str | None:
        """Why writes fail (a full or read-only disk), or None: set by a failed write, cleared
        by the next one that succeeds (the writer tries one every PROBE_INTERVAL meanwhile)."""
        return self._snapshot.write_error

    @property
    def commits(self) -> int:
        """Write transactions committed since open (group-commit metric)."""
        return self._snapshot.commits

    def has_room(self, count: int, nbytes: int) -> bool:
        """Whether a put of this size would fit now (advisory: ``put`` decides)."""
        s = self._snapshot
        return (
            s.depth + self._pending_rows + count <= self._max_rows
            and s.bytes + self._pending_bytes + nbytes <= self._max_bytes
        )

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the directory and schema, load counters and start the writer thread."""
        if self._state != "new":
            raise RuntimeError("a Spool can be opened once")
        try:
            if self._exclusive and self._path != MEMORY:
                self._claim = claim(self._path)
            await self._open()
        except BaseException as exc:
            self._release_claim()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise SpoolOpenError(self._path, exc) from exc
            raise

    def _release_claim(self) -> None:
        """Let go of the file once this process's SQLite connection to it is closed."""
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._opened = loop.create_future()
        self._stopped = loop.create_future()
        self._state = "opening"
        writer = _Writer(
            self,
            loop,
            self._ops,
            self._path,
            max_rows=self._max_rows,
            max_bytes=self._max_bytes,
            commit_interval=self._commit_interval,
            max_group=self._max_group,
        )
        if self._commit_on == "auto":
            self._commit_on = await asyncio.to_thread(choose_commit_mode, self._path)
        if self._commit_on == "loop":
            self._open_inline(writer)
            await self._opened
            return
        self._thread = threading.Thread(target=writer.run, name="spool-writer", daemon=True)
        self._thread.start()
        try:
            await self._opened
        except BaseException:
            self._state = "closing"
            self._ops.put(None)
            await asyncio.shield(self._stopped)
            self._thread.join()
            raise

    async def close(self) -> None:
        """Commit what is pending, stop the writer (thread) and close the database."""
        if self._state == "new" or (self._state == "closed" and self._thread is None):
            self._state = "closed"  # never opened, or opened on the loop and failed
            self._release_claim()
            return
        if self._inline is not None:
            self._close_inline()
            assert self._stopped is not None
            await asyncio.shield(self._stopped)
            self._release_claim()
            return
        if self._state in ("opening", "open"):
            self._state = "closing"
            self._ops.put(None)
        assert self._stopped is not None and self._thread is not None
        await asyncio.shield(self._stopped)
        self._thread.join()
        self._release_claim()

    async def put(self, payloads: Sequence[bytes], *, reserved: bool = False) -> list[int]:
        """Durably append one request's activities together; their row ids, in order.

        `reserved`: `reserve` already holds room for exactly these payloads; the put takes
        it over (and gives it back if it cannot be submitted).
        """
        items = tuple(bytes(payload) for payload in payloads)
        nbytes = sum(len(payload) for payload in items)
        if not reserved:
            self._check_open()
            if not items:
                return []
            if len(items) > self._max_rows or nbytes > self._max_bytes:
                raise ValueError("these payloads exceed the spool's total bound and can never fit")
            self._pending_rows += len(items)
            self._pending_bytes += nbytes
        elif not items or self._state != "open":
            self.unreserve(len(items), nbytes)
            self._check_open()
            return []
        return await self._submit(_Put(self._future(), items, nbytes))

    def reserve(self, count: int, nbytes: int) -> bool:
        """Hold room for a `put(..., reserved=True)` to come; False if it would not fit now.

        Loop side, like `has_room`. The room counts as taken until that put is answered
        or `unreserve` gives it back: a caller that must charge something else (the rate
        limits) between checking for room and writing cannot then find the spool full.
        """
        if not self.has_room(count, nbytes):
            return False
        self._pending_rows += count
        self._pending_bytes += nbytes
        return True

    def unreserve(self, count: int, nbytes: int) -> None:
        """Give back room `reserve` held that no put will use."""
        self._pending_rows -= count
        self._pending_bytes -= nbytes

    async def lease(self, max_items: int, max_bytes: int) -> list[SpooledItem]:
        """The oldest unleased items within both limits (at least one if any); no waiting."""
        self._check_open()
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        return await self._submit(_Lease(self._future(), max_items, max_bytes))

    # The timeout parameter is the agreed interface (the delivery worker's idle tick).
    async def wait_for_items(self, timeout: float | None, count: int = 1) -> bool:  # noqa: ASYNC109
        """Wait until at least `count` unleased items exist (True) or the timeout passes
        (False); SpoolClosed if the spool closes meanwhile."""
        self._check_open()
        if self._snapshot.available >= count:
            return True
        if timeout is not None and timeout <= 0:
            return False
        waiter = (count, self._future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1]
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        self._check_open()
        return True

    async def ack(self, ids: Sequence[int]) -> None:
        """Delete delivered rows (durably) and drop their leases."""
        self._check_open()
        if ids:
            await self._submit(_Ack(self._future(), tuple(ids)))

    async def release(self, ids: Sequence[int], *, attempt: bool = True) -> None:
        """Give leased rows back for another try, counting an attempt unless told not to.

        The rows are given back even when the count cannot be written (see `_failed`)."""
        self._check_open()
        if ids:
            await self._submit(_Release(self._future(), tuple(ids), attempt))

    async def dead_letter(self, items: Sequence[tuple[int, str, str, str]]) -> None:
        """Move rows (id, activity_id, person_hash, error) to the dead letters atomically."""
        self._check_open()
        if items:
            await self._submit(_DeadLetterOp(self._future(), tuple(items)))

    async def stats(self) -> SpoolStats:
        """Current gauges, from counters kept in memory."""
        s = self._snapshot
        return SpoolStats(s.depth, s.bytes, s.oldest_enqueued_at, s.dead_letters)

    async def list_dead_letters(
        self, *, limit: int = 100, error_contains: str | None = None
    ) -> list[DeadLetter]:
        """Newest dead letters first; ``error_contains`` matches case-insensitively."""
        self._check_open()
        return await self._submit(_ListDead(self._future(), limit, error_contains))

    async def replay_dead_letters(
        self, *, ids: Sequence[int] | None = None, error_contains: str | None = None
    ) -> int:
        """Requeue matching dead letters at the end (new ids, attempts 0); all or none fit."""
        self._check_open()
        key = None if ids is None else tuple(ids)
        return await self._submit(_Replay(self._future(), key, error_contains))

    async def purge_dead_letters(
        self, *, ids: Sequence[int] | None = None, error_contains: str | None = None
    ) -> int:
        """Delete matching dead letters (all of them when no filter is given)."""
        self._check_open()
        key = None if ids is None else tuple(ids)
        return await self._submit(_Purge(self._future(), key, error_contains))

    # -- loop side plumbing ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise SpoolClosed(f"spool is {self._state}")

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    async def _submit(self, op: _Op[T]) -> T:
        self._enqueue(op)
        try:
            return await op.future
        except asyncio.CancelledError:
            # Cancelled after the answer arrived but before it was taken: a lease's items
            # reached nobody, so give them back (as `_on_group` does for an earlier cancel).
            future = op.future
            answered = future.done() and not future.cancelled() and future.exception() is None
            if isinstance(op, _Lease) and answered and self._state == "open":
                items: list[SpooledItem] = op.future.result()
                if items:
                    self._give_back(items)
            raise

    def _enqueue(self, op: _Op[Any]) -> None:
        self._ops.put(op)
        if self._inline is not None and self._flush_handle is None:
            assert self._loop is not None
            # The group is whatever arrives before the loop gets back to this callback:
            # every request read in the same loop iteration shares the commit.
            if self._commit_interval > 0:
                self._flush_handle = self._loop.call_later(self._commit_interval, self._flush)
            else:
                self._flush_handle = self._loop.call_soon(self._flush)

    # -- "loop" mode: the writer's groups run on the event loop ----------------------------

    def _open_inline(self, writer: _Writer) -> None:
        self._inline = writer
        writer.on_loop = True
        try:
            snapshot = writer._connect()
            writer.set_busy_timeout(0)
        except BaseException:
            writer.close_db()
            self._inline = None
            self._state = "closed"
            raise
        self._on_open(snapshot)
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(EXTERNAL_CHECK_INTERVAL, self._tick)

    def _flush(self) -> None:
        """Run the queued operations as groups, one commit each (see `_Writer._process`)."""
        self._flush_handle = None
        writer = self._inline
        assert writer is not None
        while group := (self._busy_group or writer.take_group()):
            self._busy_group = []
            try:
                writer.process_or_fail(group)
            except _Busy:
                # Another process is writing: try this same group again shortly.
                assert self._loop is not None
                self._busy_group = group
                self._flush_handle = self._loop.call_later(BUSY_RETRY_SECONDS, self._flush)
                return
            except Exception as exc:  # as when the writer thread dies: stop, fail the rest
                self._state = "closing"
                self._cancel_timers()
                writer.close_db()
                writer._post(self._on_stop, exc)
                return

    def _tick(self) -> None:
        """Every second while open: notice commits by another process when idle."""
        writer = self._inline
        assert writer is not None and self._loop is not None
        writer.check_external()
        writer.probe()
        self._tick_handle = self._loop.call_later(EXTERNAL_CHECK_INTERVAL, self._tick)

    def _cancel_timers(self) -> None:
        for handle in (self._flush_handle, self._tick_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._tick_handle = None

    def _close_inline(self) -> None:
        writer = self._inline
        assert writer is not None
        if self._state in ("opening", "open"):
            self._state = "closing"
            self._cancel_timers()
            writer.set_busy_timeout(BUSY_TIMEOUT_MS)  # shutting down: waiting is fine now
            self._flush()  # what was submitted before close still commits
        for op in self._busy_group:  # still locked out: fail them with the rest (_on_stop)
            self._ops.put(op)
        self._busy_group = []
        self._cancel_timers()
        writer.close_db()
        assert self._loop is not None
        # One turn later: whoever awaited the last group resumes before `close` returns.
        self._loop.call_soon(self._on_stop, None)

    def _apply_snapshot(self, snapshot: _Snapshot) -> None:
        before, after = self._snapshot.write_error, snapshot.write_error
        self._snapshot = snapshot
        if before is None and after is not None:  # once per episode; each refusal warns
            logger.error(
                "spool cannot be written: activities are refused until it can",
                extra={"data": {"path": self._path, "error": after}},
            )
        elif before is not None and after is None:
            logger.info("spool writable again", extra={"data": {"path": self._path}})
        if self._waiters:
            self._wake(snapshot.available)

    def _wake(self, available: int) -> None:
        """Resolve the waiters `available` satisfies (all of them once no longer open)."""
        closed = self._state != "open"
        for count, future in self._waiters:
            if (closed or available >= count) and not future.done():
                future.set_result(None)

    def _settle(self, op: _Op[Any]) -> None:
        """An operation got its answer: it no longer counts as pending."""
        if isinstance(op, _Put):
            self._pending_rows -= len(op.payloads)
            self._pending_bytes -= op.nbytes

    def _on_open(self, result: _Snapshot | BaseException) -> None:
        assert self._opened is not None
        if isinstance(result, BaseException):
            if not self._opened.done():
                self._opened.set_exception(result)
            return
        if self._state == "opening":
            self._state = "open"
        self._apply_snapshot(result)
        if not self._opened.done():
            self._opened.set_result(None)

    def _on_group(self, outcomes: list[_Outcome], snapshot: _Snapshot) -> None:
        self._apply_snapshot(snapshot)
        for op, ok, value in outcomes:
            self._settle(op)
            future = op.future
            if future.done():  # the caller was cancelled
                if ok and isinstance(op, _Lease) and value and self._state == "open":
                    assert isinstance(value, list)
                    self._give_back(value)
                continue
            if ok:
                future.set_result(value)
            else:
                assert isinstance(value, BaseException)
                future.set_exception(value)

    def _give_back(self, items: list[SpooledItem]) -> None:
        """Nobody received these leased items: release them without counting an attempt."""
        release = _Release(self._future(), tuple(i.id for i in items), False)
        release.future.add_done_callback(_consume)
        self._enqueue(release)

    def _on_stop(self, error: BaseException | None) -> None:
        if error is not None:
            logger.error("spool writer stopped", exc_info=error)
        self._state = "closed"
        while True:  # the writer is gone: fail whatever is still queued
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op is None:
                continue
            self._settle(op)
            if not op.future.done():
                op.future.set_exception(SpoolClosed("spool closed"))
        self._wake(0)
        assert self._stopped is not None
        if not self._stopped.done():
            self._stopped.set_result(None)
