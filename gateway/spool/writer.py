"""The writer: the spool's one SQLite connection, its counters and its leases.

Every call on a `Spool` becomes an operation (`Op`) carrying the future its caller
awaits. The writer takes what is queued (up to ``max_group`` rows) as one group, runs all
its writes in ONE transaction with ONE commit, then its reads, and only then resolves the
futures. Where that runs (the event loop or a thread of its own) is the `Spool`'s choice
(see `gateway.spool.commit`); the writer's code is the same either way.

Each write other than a put runs inside a SAVEPOINT, so one failing operation is undone
alone while the rest of the group commits; the group's puts are inserted together by one
statement after their room was checked, so a put's rows are all present or all absent.
Capacity (rows and payload bytes) is checked here, and only here, because the writer
serialises all writes: concurrent puts cannot overshoot the bound. (The loop side keeps
its own count of room promised but not yet written: `Spool.reserve`.)

Leases live in memory only: after a crash every row not acked is simply available again,
so there is nothing to recover; for the same reason a release always gives its rows
back, even when its attempt count cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

from gateway.spool import commit, dead_letters, schema
from gateway.spool.dead_letters import DeadLetter
from gateway.spool.errors import SpoolError, SpoolFull
from gateway.spool.items import QueuedActivity, SpooledItem

logger = logging.getLogger("gateway.spool")

# Ids per statement when acknowledging (well under SQLite's limit on bound variables).
ACK_CHUNK = 500
# Rows per INSERT statement: bound values for each (`schema.QUEUE_PUT`) under the 999
# that SQLite before 3.32 allows.
_PUT_VALUES = len(schema.QUEUE_PUT.split(","))
INSERT_CHUNK = 999 // _PUT_VALUES
_PUT_MARKS = "(" + ", ".join("?" * _PUT_VALUES) + ")"
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

_QUEUE_ONE = f"SELECT {schema.QUEUE_ROW} FROM queue WHERE id = ?"  # noqa: S608
_QUEUE_AFTER = f"SELECT {schema.QUEUE_ROW} FROM queue WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608

T = TypeVar("T")


class Snapshot(NamedTuple):
    """Counters published by the writer after every group (a tuple: immutable, and cheaper
    to build than a frozen dataclass, whose __init__ sets each field by a call)."""

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
class Op(Generic[T]):
    """A unit of work and the future its caller awaits."""

    future: asyncio.Future[T]
    # Writes run in this order within a group (removals first to free room); None = read.
    phase: ClassVar[int | None] = None

    @property
    def size(self) -> int:
        """Rows this operation touches, counted against ``max_group``."""
        return 1


@dataclass(eq=False)
class Ack(Op[None]):
    phase: ClassVar[int | None] = 0
    ids: tuple[int, ...]

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.ids)


@dataclass(eq=False)
class DeadLetterOp(Op[None]):
    phase: ClassVar[int | None] = 1
    items: tuple[tuple[int, str, str, str], ...]

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.items)


@dataclass(eq=False)
class Purge(Op[int]):
    phase: ClassVar[int | None] = 2
    ids: tuple[int, ...] | None
    error_contains: str | None


@dataclass(eq=False)
class Release(Op[None]):
    phase: ClassVar[int | None] = 3
    ids: tuple[int, ...]
    attempt: bool

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.ids)


@dataclass(eq=False)
class Put(Op[list[int]]):
    phase: ClassVar[int | None] = 4
    items: tuple[QueuedActivity, ...]
    nbytes: int

    @property
    def size(self) -> int:
        """Rows this operation touches."""
        return len(self.items)


@dataclass(eq=False)
class Replay(Op[int]):
    phase: ClassVar[int | None] = 5
    ids: tuple[int, ...] | None
    error_contains: str | None


@dataclass(eq=False)
class Lease(Op[list[SpooledItem]]):
    max_items: int
    max_bytes: int


@dataclass(eq=False)
class ListDead(Op[list[DeadLetter]]):
    limit: int
    error_contains: str | None


# The order of writes within a group (writes only: a read's phase is None), in C rather
# than a Python key function called for each operation.
_PHASE: Callable[[Op[Any]], int] = attrgetter("phase")

# (operation, succeeded, result or exception)
Outcome = tuple[Op[Any], bool, object]


class Owner(Protocol):
    """Who the writer answers, on the event loop (the `Spool`): it knows no more of it."""

    def _on_open(self, result: Snapshot | BaseException) -> None: ...

    def _on_group(self, outcomes: list[Outcome], snapshot: Snapshot) -> None: ...

    def _on_stop(self, error: BaseException | None) -> None: ...


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


class Busy(Exception):
    """In "loop" mode another process holds the write lock: run the group again later."""


class _FatalGroupError(Exception):
    """The open transaction was lost mid-group; the whole group must fail."""


class Writer:
    """The writer: owns the connection, the committed counters and the leases."""

    def __init__(
        self,
        spool: Owner,
        loop: asyncio.AbstractEventLoop,
        ops: queue.SimpleQueue[Op[Any] | None],
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

    def process_or_fail(self, group: list[Op[Any]]) -> None:
        """Run one group; if that fails outright, fail each of its operations, then raise."""
        try:
            self._process(group)
        except Busy:
            raise
        except BaseException as exc:
            failure = SpoolError(f"spool writer failed: {exc!r}")
            self._post(
                self._spool._on_group,
                [(op, False, failure) for op in group],
                self._snapshot(),
            )
            raise

    def take_group(self) -> list[Op[Any]]:
        """What is queued now, up to ``max_group`` rows, without waiting ("loop" mode)."""
        group: list[Op[Any]] = []
        rows = 0
        # `empty()` rather than catching queue.Empty, which every group would raise twice:
        # on the loop, which is the only reader, what is not empty has an item to take.
        while rows < self._max_group and not self._ops.empty():
            op = self._ops.get_nowait()
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
                # Rewrites the header page.
                db.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")
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
        """How long SQLite waits for another process's lock: 0 on the loop (see `Busy`),
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

    def _collect(self) -> tuple[list[Op[Any]], bool]:
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

    def _connect(self) -> Snapshot:
        created = False
        memory = self._path == schema.MEMORY
        if not memory:
            file = Path(self._path)
            file.parent.mkdir(parents=True, exist_ok=True)
            # Empty: just created by `claim` (an exclusive spool), or by nobody yet.
            created = not file.exists() or file.stat().st_size == 0
        db = schema.connect(self._path)
        self._db = db
        mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        if not memory and mode != "wal":
            raise SpoolError(f"cannot put {self._path} in WAL mode (journal_mode={mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA fullfsync=ON")  # macOS: a real flush to media; no-op elsewhere
        db.execute(f"PRAGMA busy_timeout={schema.BUSY_TIMEOUT_MS}")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        if db.execute("PRAGMA synchronous").fetchone()[0] != 2:
            raise SpoolError("cannot set synchronous=FULL")
        schema.ensure_schema(db, self._path)
        if created:
            commit.fsync_dir(Path(self._path).parent)
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

    def _snapshot(self) -> Snapshot:
        return Snapshot(
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

    def _process(self, group: list[Op[Any]]) -> None:
        if not group:
            return
        # Another process (the dead-letters command) rarely writes: look once a second, not
        # per group; `lease` reads the table itself, so only the counters can lag, briefly.
        # (The group's snapshot publishes whatever the look found.)
        self._external_change_due()
        self.probe()  # while writes fail, a group of reads alone would never notice the end
        writes = sorted((op for op in group if op.phase is not None), key=_PHASE)
        reads = [op for op in group if op.phase is None]
        outcomes: list[Outcome] = []
        # Operations of one group were all in flight together, so any order is a valid
        # serialisation: writes (removals first) and their commit, then reads.
        if writes:
            self._write(writes, outcomes)
            # Only a removal can change the oldest row, or a put into an empty queue.
            if self._oldest is None or any(not isinstance(op, Put) for op in writes):
                self._refresh_oldest()
        for op in reads:
            try:
                outcomes.append((op, True, self._read(op)))
            except sqlite3.Error as exc:
                outcomes.append((op, False, _db_error(exc)))
        self._post(self._spool._on_group, outcomes, self._snapshot())

    def _write(self, ops: list[Op[Any]], outcomes: list[Outcome]) -> None:
        db = self._db
        assert db is not None
        work = _Counters(self._depth, self._bytes, self._dead)
        done: list[tuple[Op[Any], object, _Effect]] = []
        stored: list[Outcome] = []  # the puts' answers (already counted in `work`)
        failed: list[Outcome] = []
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
                    raise Busy from exc
                raise
            puts = [op for op in ops if isinstance(op, Put)]
            for op in ops:
                if isinstance(op, Put):
                    if op is puts[0]:  # in phase order: after the removals, all at once
                        stored = self._put_all(puts, work, now, failed)
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
        if done or stored:  # a group whose every operation was refused wrote nothing
            self._commits += 1
        self._depth, self._bytes, self._dead = work.depth, work.nbytes, work.dead
        drained_rows = drained_bytes = 0
        for op, result, effect in done:
            if effect.after is not None:
                effect.after()
            drained_rows += effect.drained_rows
            drained_bytes += effect.drained_bytes
            outcomes.append((op, True, result))
        outcomes.extend(stored)
        if drained_rows:
            self._drained.append((time.monotonic(), drained_rows, drained_bytes))

    def _failed(self, op: Op[Any], error: SpoolError) -> Outcome:
        """The outcome of a write that did not commit.

        A release still succeeds: leases live in memory, so the rows are given back all
        the same and only the attempt count is lost. Failing it would leave them leased
        (never sent again until a restart) for want of a counter.
        """
        if isinstance(op, Release):
            self._return_leases(op.ids)
            return (op, True, None)
        return (op, False, error)

    def _apply(self, op: Op[Any], work: _Counters, now: float) -> tuple[object, _Effect]:
        if isinstance(op, Ack):
            return None, self._ack(op.ids)
        if isinstance(op, DeadLetterOp):
            return None, self._dead_letter(op.items, now)
        if isinstance(op, Release):
            return None, self._release(op.ids, op.attempt)
        if isinstance(op, Replay):
            return self._replay(op, work, now)
        if isinstance(op, Purge):
            return self._purge(op)
        raise TypeError(f"not a write: {op!r}")

    def _put_all(
        self,
        puts: list[Put],
        work: _Counters,
        now: float,
        failed: list[Outcome],
    ) -> list[Outcome]:
        """Insert every put of the group with one statement per INSERT_CHUNK rows; the
        answers of those that fit (their ids), which hold once the group commits.

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
        accepted: list[Put] = []
        for op in puts:
            try:
                self._check_room(work, len(op.items), op.nbytes)
            except SpoolFull as exc:
                failed.append((op, False, exc))
                continue
            work.depth += len(op.items)
            work.nbytes += op.nbytes
            accepted.append(op)
        rows = [item for op in accepted for item in op.items]
        if not rows:
            return []
        try:
            for start in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[start : start + INSERT_CHUNK]
                cursor = self._db.execute(_insert_sql(len(chunk)), schema.put_values(chunk, now))
            last = cursor.lastrowid
        except sqlite3.Error as exc:
            raise _FatalGroupError(f"cannot insert: {exc}") from exc
        assert last is not None
        next_id = last - len(rows) + 1
        stored: list[Outcome] = []
        for op in accepted:
            stored.append((op, True, list(range(next_id, next_id + len(op.items)))))
            next_id += len(op.items)
        return stored

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
        moved, nbytes = dead_letters.bury(self._db, items, now)
        rows = len(moved)
        asked = tuple(dict.fromkeys(row_id for row_id, *_ in items))
        return _Effect(
            rows=-rows,
            nbytes=-nbytes,
            dead=rows,
            drained_rows=rows,
            drained_bytes=nbytes,
            after=lambda: self._forget(asked),
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

    def _replay(self, op: Replay, work: _Counters, now: float) -> tuple[int, _Effect]:
        assert self._db is not None
        matches = dead_letters.matching(self._db, op.ids, op.error_contains)
        nbytes = sum(size for _, size in matches)
        self._check_room(work, len(matches), nbytes)
        dead_letters.requeue(self._db, [row_id for row_id, _ in matches], now)
        return len(matches), _Effect(rows=len(matches), nbytes=nbytes, dead=-len(matches))

    def _purge(self, op: Purge) -> tuple[int, _Effect]:
        assert self._db is not None
        matches = dead_letters.matching(self._db, op.ids, op.error_contains)
        dead_letters.purge(self._db, [row_id for row_id, _ in matches])
        return len(matches), _Effect(dead=-len(matches))

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

    def _read(self, op: Op[Any]) -> object:
        if isinstance(op, Lease):
            return self._lease(op.max_items, op.max_bytes)
        if isinstance(op, ListDead):
            return self._list_dead(op.limit, op.error_contains)
        raise TypeError(f"not a read: {op!r}")

    def _lease(self, max_items: int, max_bytes: int) -> list[SpooledItem]:
        assert self._db is not None
        items: list[SpooledItem] = []
        total = 0

        def take(row: tuple[Any, ...]) -> bool:
            nonlocal total
            created = None if row[6] is None else float(row[6])
            item = SpooledItem(
                int(row[0]),
                bytes(row[1]),
                float(row[2]),
                int(row[3]),
                str(row[4]),
                str(row[5]),
                created,
            )
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
        return dead_letters.newest(self._db, limit, error_contains)


@functools.cache
def _insert_sql(rows: int) -> str:
    """The INSERT of `rows` activities: one text per size (at most INSERT_CHUNK of them),
    built once, whose hash the sqlite3 module's statement cache then need not recompute."""
    marks = ",".join([_PUT_MARKS] * rows)
    return f"INSERT INTO queue ({schema.QUEUE_PUT}) VALUES {marks}"  # noqa: S608


def _db_error(exc: BaseException) -> SpoolError:
    error = SpoolError(f"spool database error: {exc}")
    error.__cause__ = exc
    return error
