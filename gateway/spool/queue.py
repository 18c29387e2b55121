"""The queue: a bounded durable FIFO of encoded activities with in-memory leases.

Every call builds an operation carrying an ``asyncio.Future`` and drops it on a
``queue.SimpleQueue``; the `Writer` (the only ``sqlite3`` connection; ``check_same_thread``
stays on and guards against misuse) takes what is queued as one group, commits it once,
and only then resolves the futures. The group runs in one of two places (``commit_on``,
see `gateway.spool.commit`):

- ``"thread"``: a daemon thread blocks for the first operation, takes everything else
  already queued (optionally lingering ``commit_interval`` seconds for more), and resolves
  the futures through ``loop.call_soon_threadsafe``. While one group is being fsynced the
  next one accumulates, so the commit rate adapts to load without a timer. Each time the
  thread comes back from SQLite it must take the GIL from the busy event loop.
- ``"loop"``: the first queued operation schedules a flush with ``call_soon`` (or
  ``call_later(commit_interval)``); every request read in the same loop turn joins that
  group, and the loop blocks for its one fsync. No hand-off, no GIL wait: on a disk that
  flushes in well under a millisecond this has the lower latency.

Either way durability costs one fsync per group, not per request.

Durability. WAL with ``synchronous=FULL`` fsyncs the log at every commit, so a commit that
returned survives power loss, not only a process crash (``NORMAL`` would only survive the
latter). ``put`` resolves, and the handler answers 202, strictly after ``COMMIT``
returned. Moves (ack = delete, dead letter = insert + delete, replay = insert + delete)
are single transactions, so a SIGKILL or power cut at any instant leaves every committed
row either queued or acked/dead-lettered, never both or neither. If a COMMIT fails, every
operation of that group is reported failed (a caller may then retry: at-least-once, and
Ortto merges repeats by ``key`` + ``created``). Row ids come from AUTOINCREMENT, so they
are never reused and delivery order is id order, across restarts too.

Room. The writer decides whether a put fits (it serialises all writes, so concurrent puts
cannot overshoot the bound). On the loop side, `has_room` and `reserve` count the rows
and bytes of puts submitted but not yet answered, and of reservations: the relay reserves
room before it charges the rate limits, then puts (``reserved=True``) or `unreserve`\\s.

A full or read-only disk. A write that fails for a database error (not another process's
lock) sets `write_error`, logged once as an ERROR; the next write that commits clears it
(logged as INFO). Meanwhile the writer tries a small write every PROBE_INTERVAL, since
puts are refused and nothing else might write. A failed ack leaves its rows leased, so
the caller can retry it without the rows being sent again meanwhile. Counters (depth,
bytes, oldest, dead letters) are computed once at open and maintained by the writer,
which publishes a snapshot with every group. Another process may open the same file (the
dead-letters CLI replaying while the gateway runs): SQLite's locking keeps that safe, and
the writer notices foreign commits via ``PRAGMA data_version`` (per group, and every
second when idle) and recounts.

``path=":memory:"`` runs the very same code against an in-memory database (not durable):
the honest baseline for measuring what durability costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from gateway.spool import commit, schema
from gateway.spool.commit import COMMIT_MODES
from gateway.spool.dead_letters import DeadLetter
from gateway.spool.errors import SpoolClosed, SpoolOpenError
from gateway.spool.items import QueuedActivity, SpooledItem, SpoolStats
from gateway.spool.lock import claim
from gateway.spool.writer import (
    EXTERNAL_CHECK_INTERVAL,
    Ack,
    Busy,
    DeadLetterOp,
    Lease,
    ListDead,
    Op,
    Outcome,
    Purge,
    Put,
    Release,
    Replay,
    Snapshot,
    Writer,
    logger,
)

__all__ = ["Spool"]

# "loop" mode: how soon a group retries while another process holds the write lock.
BUSY_RETRY_SECONDS = 0.01

T = TypeVar("T")


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
        self._inline: Writer | None = None
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._busy_group: list[Op[Any]] = []  # "loop" mode: to retry once the lock is free
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._commit_interval = commit_interval
        self._max_group = max_group
        self._ops: queue.SimpleQueue[Op[Any] | None] = queue.SimpleQueue()
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._snapshot = Snapshot()
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
            if self._exclusive and self._path != schema.MEMORY:
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
        writer = Writer(
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
            self._commit_on = await asyncio.to_thread(commit.choose_commit_mode, self._path)
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

    async def put(
        self, activities: Sequence[QueuedActivity], *, reserved: bool = False
    ) -> list[int]:
        """Durably append one request's activities together; their row ids, in order.

        `reserved`: `reserve` already holds room for exactly these payloads; the put takes
        it over (and gives it back if it cannot be submitted).
        """
        items = tuple(activities)
        nbytes = sum(len(item.payload) for item in items)
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
        # Not through `_submit`: a cancelled put has nothing to give back, and one
        # coroutine frame fewer is measurable on the hottest path.
        op = Put(self._future(), items, nbytes)
        self._enqueue(op)
        return await op.future

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
        return await self._submit(Lease(self._future(), max_items, max_bytes))

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
            await self._submit(Ack(self._future(), tuple(ids)))

    async def release(self, ids: Sequence[int], *, attempt: bool = True) -> None:
        """Give leased rows back for another try, counting an attempt unless told not to.

        The rows are given back even when the count cannot be written (see `_failed`)."""
        self._check_open()
        if ids:
            await self._submit(Release(self._future(), tuple(ids), attempt))

    async def dead_letter(self, items: Sequence[tuple[int, str, str, str]]) -> None:
        """Move rows (id, activity_id, person_hash, error) to the dead letters atomically."""
        self._check_open()
        if items:
            await self._submit(DeadLetterOp(self._future(), tuple(items)))

    async def stats(self) -> SpoolStats:
        """Current gauges, from counters kept in memory."""
        s = self._snapshot
        return SpoolStats(s.depth, s.bytes, s.oldest_enqueued_at, s.dead_letters)

    async def list_dead_letters(
        self, *, limit: int = 100, error_contains: str | None = None
    ) -> list[DeadLetter]:
        """Newest dead letters first; ``error_contains`` matches case-insensitively."""
        self._check_open()
        return await self._submit(ListDead(self._future(), limit, error_contains))

    async def replay_dead_letters(
        self, *, ids: Sequence[int] | None = None, error_contains: str | None = None
    ) -> int:
        """Requeue matching dead letters at the end (new ids, attempts 0); all or none fit."""
        self._check_open()
        key = None if ids is None else tuple(ids)
        return await self._submit(Replay(self._future(), key, error_contains))

    async def purge_dead_letters(
        self, *, ids: Sequence[int] | None = None, error_contains: str | None = None
    ) -> int:
        """Delete matching dead letters (all of them when no filter is given)."""
        self._check_open()
        key = None if ids is None else tuple(ids)
        return await self._submit(Purge(self._future(), key, error_contains))

    # -- loop side plumbing ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise SpoolClosed(f"spool is {self._state}")

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    async def _submit(self, op: Op[T]) -> T:
        self._enqueue(op)
        try:
            return await op.future
        except asyncio.CancelledError:
            # Cancelled after the answer arrived but before it was taken: a lease's items
            # reached nobody, so give them back (as `_on_group` does for an earlier cancel).
            future = op.future
            answered = future.done() and not future.cancelled() and future.exception() is None
            if isinstance(op, Lease) and answered and self._state == "open":
                items: list[SpooledItem] = op.future.result()
                if items:
                    self._give_back(items)
            raise

    def _enqueue(self, op: Op[Any]) -> None:
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

    def _open_inline(self, writer: Writer) -> None:
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
        """Run the queued operations as groups, one commit each (see `Writer._process`)."""
        self._flush_handle = None
        writer = self._inline
        assert writer is not None
        while group := (self._busy_group or writer.take_group()):
            self._busy_group = []
            try:
                writer.process_or_fail(group)
            except Busy:
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
            writer.set_busy_timeout(schema.BUSY_TIMEOUT_MS)  # shutting down: waiting is fine now
            self._flush()  # what was submitted before close still commits
        for op in self._busy_group:  # still locked out: fail them with the rest (_on_stop)
            self._ops.put(op)
        self._busy_group = []
        self._cancel_timers()
        writer.close_db()
        assert self._loop is not None
        # One turn later: whoever awaited the last group resumes before `close` returns.
        self._loop.call_soon(self._on_stop, None)

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
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

    def _settle(self, op: Op[Any]) -> None:
        """An operation got its answer: it no longer counts as pending."""
        if isinstance(op, Put):
            self._pending_rows -= len(op.items)
            self._pending_bytes -= op.nbytes

    def _on_open(self, result: Snapshot | BaseException) -> None:
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

    def _on_group(self, outcomes: list[Outcome], snapshot: Snapshot) -> None:
        self._apply_snapshot(snapshot)
        for op, ok, value in outcomes:
            self._settle(op)
            future = op.future
            if future.done():  # the caller was cancelled
                if ok and isinstance(op, Lease) and value and self._state == "open":
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
        release = Release(self._future(), tuple(i.id for i in items), False)
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
