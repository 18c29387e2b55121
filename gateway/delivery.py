"""Delivery: a background worker that moves spooled activities to Ortto in batches.

Order of work for one batch: take an in-flight slot, wait for the upstream pacer
(`gateway.upstream_rate`: `upstream_rate` requests a second, for this process or, with
Redis, for every host of the account), then lease the oldest
activities (at most 100 and under 2 MB encoded), so a batch is as full as it can
be at the moment it may be sent. Each activity was given its `created` and `key`
when it was accepted, so a retry after an ambiguous failure (a timeout after Ortto
processed it, a crash before the acknowledgement was committed) merges at Ortto
instead of duplicating.

What Ortto answers decides what happens to the batch:

- 2xx with one entry per activity (`read_answer`): the taken ones are acknowledged,
  the refused ones (`invalid` or an `error`) go to the dead letters. Any other 2xx (a
  proxy's HTML page, an empty 204, an error object) proves nothing: it is retried with
  backoff like a 5xx, and an activity answered so `BAD_ANSWER_ATTEMPTS` times goes to
  the dead letters with the reason.
- 400 and other 4xx: split in halves until the refused activities are isolated;
  a single refused activity goes to the dead letters with Ortto's message.
- 401/403: the key is wrong (or the IP is banned): nothing is discarded; delivery
  pauses and probes again later, logging an error at most once a minute.
- 429, 5xx, timeouts, connection errors: given back to the spool; sending waits
  with exponential backoff and full jitter, at least as long as Ortto asked
  (`Retry-After` or the body's `try-in-seconds`). So does any error of the gateway's
  own while sending a batch.

Ortto's text is never kept as it came: logs and dead letters get `OrttoClient.redact`'s
bounded excerpt, with the key and every other secret masked.

The spool can fail too (a full or read-only disk). A batch whose acknowledgement cannot
be written keeps its rows leased (not sent again) and the acknowledgement is retried,
with backoff, before anything else is leased; after a restart meanwhile the rows are
sent again and Ortto merges them by `key`. The worker itself is supervised: if it stops
on an error it is started again after a backoff (`delivery_restarts_total`), so nothing
waits for a restart of the process once the disk has room.

Ortto bans the caller's IP for 15 s after 15 bad requests within 15 s, which would
stop every site behind the gateway. Every 4xx answer (bisection included) is
counted in a sliding window; at `BAD_REQUEST_BUDGET` the circuit opens and sending
pauses for `CIRCUIT_PAUSE` seconds instead of feeding the ban.

The pauses (429, auth, circuit) concern the whole account: each is also given to the
pacer, which shares it with every host through Redis when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from gateway.config import ORTTO_MAX_ACTIVITIES, ORTTO_MAX_BODY_BYTES
from gateway.feed import Feed, FeedEvent, Forwarded, mask_strings
from gateway.metrics import Metrics, status_group
from gateway.spool import Spool, SpoolClosed, SpooledItem, SpoolError
from gateway.upstream import (
    BATCH_OVERHEAD,
    MASKED,
    Entry,
    OrttoClient,
    UpstreamError,
    UpstreamResponse,
    encode_batch,
    mask_emails,
    read_answer,
)
from gateway.upstream_rate import LocalPacer, UpstreamPacer

log = logging.getLogger("gateway.delivery")

# Ortto bans after 15 bad requests in 15 s; stay well below it.
BAD_REQUEST_BUDGET = 10
BAD_REQUEST_WINDOW = 15.0
# Long enough for Ortto's own 15 s window to forget our bad requests.
CIRCUIT_PAUSE = 15.0
# A wrong key is an operator's problem; probe again at this pace, never discard.
AUTH_PAUSE = 30.0
AUTH_LOG_INTERVAL = 60.0
# Backoff for 5xx and network errors: full jitter over base * 2**n, capped.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
# A 2xx that does not account for each activity is retried this many times (about a
# minute of backoff: longer than a proxy's hiccup), then dead-lettered, replayable: a
# wrong GATEWAY_UPSTREAM_URL shows as dead letters, not as activities counted delivered.
BAD_ANSWER_ATTEMPTS = 8
# What a dead letter says when Ortto's answer never accounted for the activity.
UNCONFIRMED = "not confirmed by Ortto"
# Ortto's 429 without a hint: its documented windows are 10 s and 60 s.
DEFAULT_RATE_LIMIT_PAUSE = 10.0
# Ortto refuses activities created more than 90 days ago; keep an hour's margin.
MAX_AGE = 90 * 86400.0 - 3600.0
# Leave room under Ortto's 2 MB for the envelope and separators.
MAX_BATCH_BYTES = ORTTO_MAX_BODY_BYTES - BATCH_OVERHEAD - ORTTO_MAX_ACTIVITIES
# A string of a forwarded body the console shows is cut to this many characters.
FORWARDED_VALUE_CHARS = 2000
# How often the spool gauges are refreshed while idle.
GAUGE_INTERVAL = 1.0
# A worker that stopped on an error starts again after base * 2**n, capped: soon enough
# that delivery resumes within seconds of the cause going away (disk space freed).
RESTART_BASE = 0.1
RESTART_CAP = 5.0
# A worker that ran this long before stopping starts the backoff over.
RESTART_RESET = 60.0
# A failed acknowledgement is retried after base * 2**n, capped, before any new lease.
ACK_RETRY_BASE = 0.1
ACK_RETRY_CAP = 5.0


def full_jitter(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """AWS's "full jitter": uniform in [0, min(cap, base * 2**attempt)]."""
    return rng() * exponential(attempt, BACKOFF_BASE, BACKOFF_CAP)


def exponential(attempt: int, base: float, cap: float) -> float:
    """base * 2**attempt, at most `cap` (the exponent bounded so it cannot overflow)."""
    return min(cap, base * 2.0 ** min(attempt, 30))


_MERGE_BY = b'"merge_by"'


def _merge_by(payload: bytes) -> list[str] | None:
    """An activity's own `merge_by` (the relay gives it the browser's request-level one)."""
    if _MERGE_BY not in payload:  # nearly every activity: no parse
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    merge_by = data.get("merge_by") if isinstance(data, dict) else None
    return merge_by if isinstance(merge_by, list) and merge_by else None


_KEY = b'"key":"'


def _key_of(payload: bytes) -> str:
    """The key enrichment gave a spooled activity (its last key: no JSON parse)."""
    at = payload.rfind(_KEY)
    if at < 0:
        return ""
    start = at + len(_KEY)
    end = payload.find(b'"', start)
    return payload[start:end].decode("ascii", "replace") if end > 0 else ""


def _by_merge_by(items: list[SpooledItem]) -> list[list[SpooledItem]]:
    """The items by their `merge_by`, each group in spool order, groups by first item."""
    groups: dict[tuple[str, ...], list[SpooledItem]] = {}
    for item in items:
        groups.setdefault(tuple(_merge_by(item.payload) or ()), []).append(item)
    return list(groups.values())


class Delivery:
    """The background worker; `start()` in the app's cleanup context, `stop()` on the way out."""

    def __init__(
        self,
        spool: Spool,
        client: OrttoClient,
        metrics: Metrics,
        *,
        rate: float,
        concurrency: int,
        batch_max_wait: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        circuit_pause: float = CIRCUIT_PAUSE,
        auth_pause: float = AUTH_PAUSE,
        feed: Feed | None = None,
        personal: bool = False,
        pacer: UpstreamPacer | None = None,
    ) -> None:
        self._spool = spool
        # The console's events, and what was sent (emails masked unless `personal`).
        self._feed = feed
        self._personal = personal
        self._client = client
        self._metrics = metrics
        self._pacer = pacer if pacer is not None else LocalPacer(rate)
        self._slots = asyncio.Semaphore(concurrency)
        self._batch_max_wait = batch_max_wait
        self._clock = clock  # wall time: `created` ages, the spool's oldest item
        self._monotonic = monotonic  # pauses and backoff (tests inject both with `sleep`)
        self._sleep = sleep
        self._rng = rng
        self._circuit_pause = circuit_pause
        self._auth_pause = auth_pause
        self._task: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._drain_deadline: float | None = None  # loop time; set when the drain begins
        self._leasing = False  # between taking a slot and handing the batch to a task
        self._not_before = 0.0  # monotonic time before which nothing is sent
        self._pause_reason: str | None = None
        self._failures = 0  # consecutive retryable failures, for the backoff exponent
        self._bad_requests: deque[float] = deque()
        self._last_auth_log = -AUTH_LOG_INTERVAL
        # Spool id -> 2xx answers that did not account for it (this process's count: a
        # restart starts it again, which only delays the dead letter).
        self._unconfirmed: dict[int, int] = {}
        self._unacked: set[int] = set()  # delivered; the acknowledgement failed
        self._ack_failures = 0
        self._ack_not_before = 0.0  # monotonic

    # -- lifecycle

    def start(self) -> None:
        """Start the (supervised) worker task, and the task that keeps the gauges fresh."""
        self._task = asyncio.create_task(self._supervise(), name="ortto-gateway-delivery")
        self._gauges = asyncio.create_task(self._gauge_loop(), name="ortto-gateway-gauges")

    async def _gauge_loop(self) -> None:
        """Refresh the spool gauges every second, paused or not."""
        while True:
            await self._refresh_gauges()
            await asyncio.sleep(GAUGE_INTERVAL)

    async def drain(self, drain_timeout: float) -> None:
        """Deliver what is spooled, retries included, until nothing is left or the timeout.

        The worker keeps going while batches are in flight, so a batch that fails during
        the drain is given back and sent again after its backoff. The deadline is set by
        the first call: `stop` after `drain` waits no longer than the one timeout.
        """
        self._stopping.set()
        loop = asyncio.get_running_loop()
        if self._drain_deadline is None:
            self._drain_deadline = loop.time() + drain_timeout
        task = self._task
        while task is not None and not task.done():
            remaining = self._drain_deadline - loop.time()
            # Done once nothing is available, being leased (a lease under way may hold the
            # last items while the spool counts none available) or in flight. The loop may
            # sit idle meanwhile: a batch that fails is given back and wakes it.
            busy = self._spool.available or self._leasing or self._inflight or self._unacked
            if remaining <= 0 or not busy:
                return
            await asyncio.wait(
                {task, *self._inflight}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )

    async def stop(self, drain_timeout: float) -> None:
        """`drain` for up to `drain_timeout` (unless already drained), then keep the rest
        in the spool for the next start."""
        await self.drain(drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = self._drain_deadline or loop.time()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            _, pending = await asyncio.wait(
                self._inflight, timeout=max(0.0, deadline - loop.time())
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        left = self._spool.depth
        if left:
            timed_out = loop.time() >= deadline
            log.warning(
                ("drain timeout" if timed_out else "drain ended")
                + ": activities left in the spool for the next start",
                extra={"data": {"activities": left, "paused": self._paused_for()}},
            )
        await self._refresh_gauges()

    # -- the loop

    async def _supervise(self) -> None:
        """Run the worker; when it stops on an error, count it, wait and start it again."""
        restarts = 0
        while True:
            started = self._monotonic()
            try:
                await self._run()
                return
            except Exception as exc:
                if self._monotonic() - started >= RESTART_RESET:
                    restarts = 0
                delay = exponential(restarts, RESTART_BASE, RESTART_CAP)
                restarts += 1
                self._metrics.delivery_restarts.inc()
                log.error(
                    "delivery worker stopped; starting it again",
                    # A spool error says it all; anything else is a bug: keep its traceback.
                    exc_info=None if isinstance(exc, SpoolError) else exc,
                    extra={"data": {"error": str(exc), "restart_in": round(delay, 3)}},
                )
                await self._sleep(delay)

    async def _run(self) -> None:
        while not (
            self._stopping.is_set()
            and self._spool.available == 0
            and not self._inflight
            and not self._unacked
        ):
            await self._settle_acks()  # first: sending more while none can be written piles up
            if self._stopping.is_set() and self._spool.available == 0:
                if self._inflight:
                    # Draining, with batches still out: one that fails comes back to be
                    # sent again, so wait for them rather than end.
                    await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._wait_until_allowed()
            if not await self._spool.wait_for_items(GAUGE_INTERVAL):
                continue
            if not self._stopping.is_set():
                await self._fill_wait()
            await self._slots.acquire()
            self._leasing = True  # `stop` lets this iteration finish (see there)
            try:
                await self._wait_until_allowed()
                await self._pacer.acquire()  # may wait out a pause shared by another host
                while self._paused_for() is not None:  # a local one began meanwhile
                    await self._wait_until_allowed()
                    await self._pacer.acquire()
                items = await self._spool.lease(ORTTO_MAX_ACTIVITIES, MAX_BATCH_BYTES)
            except BaseException:
                self._slots.release()
                raise
            finally:
                self._leasing = False
            if not items:
                self._slots.release()
                continue
            task = asyncio.create_task(self._deliver(items))
            self._inflight.add(task)
            self._metrics.delivery_batches_in_flight.set(len(self._inflight))
            task.add_done_callback(self._batch_done)

    @property
    def idle(self) -> bool:
        """No batch is being delivered now (each one sent so far has been settled)."""
        return not self._inflight

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """A batch task ended: forget it, and say so if it failed (its rows were given
        back, or stay leased in a spool that is closing)."""
        self._inflight.discard(task)
        self._metrics.delivery_batches_in_flight.set(len(self._inflight))
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("delivery of a batch failed", exc_info=exc)

    async def _ack(self, ids: list[int]) -> None:
        """Acknowledge delivered rows; if that cannot be written, keep them (leased, so not
        sent again) for `_settle_acks` to retry."""
        try:
            await self._spool.ack(ids)
        except SpoolError as exc:
            if not self._unacked:
                self._ack_failures = 1
                self._ack_not_before = self._monotonic() + ACK_RETRY_BASE
            self._unacked.update(ids)
            log.warning(
                "acknowledgement failed; will retry",
                extra={"data": {"error": str(exc), "activities": len(self._unacked)}},
            )

    async def _settle_acks(self) -> None:
        """Retry failed acknowledgements, with backoff, until they are written."""
        while self._unacked:
            delay = self._ack_not_before - self._monotonic()
            if delay > 0:
                await self._sleep(delay)
            ids = sorted(self._unacked)
            try:
                await self._spool.ack(ids)
            except SpoolClosed:
                raise  # nothing to retry on; the supervisor says so
            except SpoolError as exc:
                delay = exponential(self._ack_failures, ACK_RETRY_BASE, ACK_RETRY_CAP)
                self._ack_failures += 1
                self._ack_not_before = self._monotonic() + delay
                log.warning(
                    "acknowledgement failed again; will retry",
                    extra={
                        "data": {
                            "error": str(exc),
                            "activities": len(ids),
                            "retry_in": round(delay, 3),
                        }
                    },
                )
                continue
            self._unacked.difference_update(ids)
            self._ack_failures = 0
            log.info("acknowledgement written", extra={"data": {"activities": len(ids)}})

    async def _fill_wait(self) -> None:
        """Give a batch up to `batch_max_wait` to fill: it goes as soon as 100 are waiting.

        Sleeping the whole wait instead would let several batches pile up and go out
        back to back, a burst of loop work that stalls the requests arriving meanwhile.
        """
        await self._spool.wait_for_items(self._batch_max_wait, ORTTO_MAX_ACTIVITIES)

    async def _wait_until_allowed(self) -> None:
        delay = self._not_before - self._monotonic()
        while delay > 0:
            # A pause can be extended while we wait (another batch hit a 429): check again.
            await self._sleep(delay)
            delay = self._not_before - self._monotonic()
        if self._pause_reason is not None:
            self._metrics.delivery_paused.labels(self._pause_reason).set(0)
            self._pause_reason = None

    def _paused_for(self) -> str | None:
        """Why sending waits now: a pause's reason, `backoff` after failures, or None."""
        if self._pause_reason is not None:
            return self._pause_reason
        return "backoff" if self._not_before > self._monotonic() else None

    def _pause(self, reason: str, seconds: float) -> None:
        self._pacer.pause(reason, seconds)  # every host of the account, with Redis
        until = self._monotonic() + seconds
        if until <= self._not_before:
            return  # a longer pause is already in force
        self._not_before = until
        self._metrics.delivery_pauses.labels(reason).inc()
        if self._pause_reason and self._pause_reason != reason:
            self._metrics.delivery_paused.labels(self._pause_reason).set(0)
        self._pause_reason = reason
        self._metrics.delivery_paused.labels(reason).set(1)

    # -- one batch

    async def _deliver(self, items: list[SpooledItem]) -> None:
        # The rows this batch still holds: leased to it, and neither acknowledged,
        # dead-lettered nor given back yet. A batch that fails gives back these only: a row
        # given back earlier (by one merge_by's request, one half of a bisection) may be
        # another batch's by now, and giving it back again would have it sent twice at once.
        held = {i.id for i in items}
        try:
            items = await self._drop_too_old(items, held)
            # One request per merge_by (most sites have one): a browser's choice reaches
            # Ortto as its request's `merge_by`. The first goes under the rate slot taken.
            for n, group in enumerate(_by_merge_by(items)):
                await self._send(group, held, bisecting=n > 0)
        except asyncio.CancelledError:
            # Rows whose acknowledgement waits for a retry were delivered: never given back.
            ids = sorted(held - self._unacked)
            await asyncio.shield(self._spool.release(ids, attempt=False))
            raise
        except Exception as exc:
            # A bug or a bad setting fails every batch alike: back off, never spin.
            error = f"{type(exc).__name__}: {self._client.redact(str(exc))}"
            ids = sorted(held - self._unacked)
            self._retry_later(ids, "internal", None, error, self._failures, level=logging.ERROR)
            await self._spool.release(ids)
        finally:
            self._slots.release()
            await self._refresh_gauges()

    async def _drop_too_old(self, items: list[SpooledItem], held: set[int]) -> list[SpooledItem]:
        now = self._clock()
        keep: list[SpooledItem] = []
        dead: list[tuple[int, str, str, str]] = []
        for item in items:
            if item.created is not None and now - item.created > MAX_AGE:
                dead.append(
                    (
                        item.id,
                        item.activity_id,
                        item.person,
                        "Created date is more than 90 days ago (gateway)",
                    )
                )
            else:
                keep.append(item)
        if dead:
            await self._dead_letter(dead, held, items)
        return keep

    async def _send(self, items: Sequence[SpooledItem], held: set[int], *, bisecting: bool) -> None:
        ids = [i.id for i in items]
        if bisecting:
            await self._wait_until_allowed()
            await self._pacer.acquire()
        body = encode_batch([i.payload for i in items], merge_by=_merge_by(items[0].payload))
        self._metrics.upstream_batch_activities.observe(len(items))
        failures = self._failures  # the backoff exponent this batch was sent under
        try:
            resp = await self._client.post(body)
        except UpstreamError as exc:
            self._metrics.upstream_requests.labels("error").inc()
            self._retry_later(ids, "network", None, str(exc), failures)
            self._publish("retried", 0, items, str(exc))
            await self._give_back(ids, held)
            return
        self._metrics.upstream_requests.labels(status_group(resp.status)).inc()
        self._metrics.upstream_request_seconds.observe(resp.elapsed)
        status = resp.status
        if 200 <= status < 300:
            await self._accepted(items, held, resp, failures)
        elif status in (401, 403):
            self._note_bad_request()
            self._pause("auth", self._auth_pause)
            now = self._monotonic()
            if now - self._last_auth_log >= AUTH_LOG_INTERVAL:
                self._last_auth_log = now
                log.error(
                    "Ortto refused the API key; delivery paused, nothing discarded",
                    extra={"data": {"status": status, "spooled": self._spool.depth}},
                )
            self._publish("retried", status, items, "Ortto refused the API key", resp.elapsed)
            await self._give_back(ids, held, attempt=False)
        elif status == 429:
            self._metrics.upstream_retries.labels("rate_limit").inc()
            wait = DEFAULT_RATE_LIMIT_PAUSE if resp.retry_after is None else resp.retry_after
            self._pause("rate_limit", wait + self._rng())
            log.warning("Ortto rate limit; pausing", extra={"data": {"seconds": round(wait, 3)}})
            self._publish("retried", status, items, "Ortto's rate limit", resp.elapsed)
            await self._give_back(ids, held, attempt=False)
        elif status >= 500 or status < 400:
            self._retry_later(
                ids, "server_error", resp.retry_after, f"Ortto answered {status}", failures
            )
            self._publish("retried", status, items, f"Ortto answered {status}", resp.elapsed)
            await self._give_back(ids, held)
        else:
            await self._refused(items, held, status, resp.json(), resp.elapsed)

    async def _give_back(self, ids: Sequence[int], held: set[int], *, attempt: bool = True) -> None:
        """Give rows of the batch holding them back to the spool for another try."""
        held.difference_update(ids)
        await self._spool.release(ids, attempt=attempt)

    def _retry_later(
        self,
        ids: Sequence[int],
        reason: str,
        hint: float | None,
        message: str,
        failures: int,
        *,
        level: int = logging.WARNING,
    ) -> None:
        """Back off after a failed batch sent under backoff exponent `failures`.

        Batches in flight together fail together in an outage: only the first failure of
        such a wave raises the exponent. Counting each would turn a short outage with
        four batches in flight into a 4-step backoff (minutes of waiting after recovery).
        """
        self._metrics.upstream_retries.labels(reason).inc()
        delay = max(hint or 0.0, full_jitter(failures, self._rng))
        if self._failures == failures:
            self._failures += 1
        if delay > 0:
            self._not_before = max(self._not_before, self._monotonic() + delay)
            self._metrics.delivery_pauses.labels("backoff").inc()
        log.log(
            level,
            "delivery failed; will retry",
            extra={
                "data": {
                    "reason": message,
                    "activities": len(ids),
                    "retry_in": round(delay, 3),
                }
            },
        )

    async def _accepted(
        self, items: Sequence[SpooledItem], held: set[int], resp: UpstreamResponse, failures: int
    ) -> None:
        """A 2xx: acknowledge only what Ortto's answer shows it took."""
        entries = read_answer(resp.json(), len(items))
        if entries is None:
            await self._unproven(items, held, resp, failures)
            return
        self._failures = 0
        dead: list[tuple[int, str, str, str]] = []
        done: list[int] = []
        delivered: list[str] = []
        for item, entry in zip(items, entries, strict=True):
            if entry.error is not None:
                dead.append(
                    (item.id, item.activity_id, item.person, self._client.redact(entry.error))
                )
            else:
                done.append(item.id)
                delivered.append(item.activity_id)
        if self._feed is not None:
            self._delivered(items, entries, resp)
        if done:
            held.difference_update(done)  # delivered: never given back, acknowledged or not
            for item_id in done:
                self._unconfirmed.pop(item_id, None)
            for activity_id in delivered:  # Ortto has them, whether or not the ack is written
                self._metrics.count_activity(activity_id, "delivered")
            await self._ack(done)
        if dead:
            await self._dead_letter(dead, held, items, resp.status)

    def _delivered(
        self, items: Sequence[SpooledItem], entries: Sequence[Entry], resp: UpstreamResponse
    ) -> None:
        """The console's event for what Ortto took of a batch, and what it was sent and
        answered for each (the refused ones are recorded as dead letters)."""
        assert self._feed is not None
        answers = resp.json()["activities"]  # read_answer found one entry per activity
        taken = [
            (item, answer)
            for item, entry, answer in zip(items, entries, answers, strict=True)
            if entry.delivered
        ]
        if taken:
            self._publish("delivered", resp.status, [item for item, _ in taken], None, resp.elapsed)
        for item, answer in taken:
            self._forward(item, resp.status, answer)

    def _publish(
        self,
        outcome: str,
        status: int,
        items: Sequence[SpooledItem],
        error: str | None,
        elapsed: float | None = None,
    ) -> None:
        """One `delivery` event for the console (`error` already redacted)."""
        if self._feed is None:
            return
        event: FeedEvent = {
            "kind": "delivery",
            "time": self._clock(),
            "outcome": outcome,
            "status": status,
            "count": len(items),
            "keys": [_key_of(item.payload) for item in items],
        }
        if error:
            event["error"] = error
        if elapsed is not None:
            event["ms"] = round(elapsed * 1000, 3)
        self._feed.publish(event)

    def _mask_sent(self, text: str) -> str:
        """A string of an activity as sent, for the console: emails and secrets masked,
        cut to `FORWARDED_VALUE_CHARS`. The gateway's own validated output, so the cheap
        checks do (`redact`, for Ortto's text, also looks for parts of secrets)."""
        text = mask_emails(text)
        for secret in self._client.secrets:
            if secret in text:
                text = text.replace(secret, MASKED)
        return (
            text if len(text) <= FORWARDED_VALUE_CHARS else text[:FORWARDED_VALUE_CHARS] + "\u2026"
        )

    def _forward(self, item: SpooledItem, status: int, answer: Any) -> None:
        """Remember what Ortto was sent for one activity and what it answered; masked only
        if the console asks (`_show`)."""
        assert self._feed is not None
        show = functools.partial(self._show, item.payload, self._clock(), status, answer)
        self._feed.record_forward(_key_of(item.payload), show)

    def _show(self, payload: bytes, at: float, status: int, answer: Any) -> Forwarded:
        """What was forwarded for one activity, for the console: the body's emails masked
        unless the console is personal, Ortto's text always redacted (so the key and the
        other secrets are masked in both)."""
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        if not self._personal:
            body = mask_strings(body, self._mask_sent)
        return {
            "key": _key_of(payload),
            "time": at,
            "body": body,
            "status": status,
            "answer": mask_strings(answer, self._client.redact),
        }

    async def _unproven(
        self, items: Sequence[SpooledItem], held: set[int], resp: UpstreamResponse, failures: int
    ) -> None:
        """A 2xx that does not account for each activity: retry, at most so many times."""
        what = self._client.redact(resp.body) if resp.body.strip() else "an empty body"
        reason = f"{UNCONFIRMED}: it answered {resp.status} with {what}"
        again: list[int] = []
        dead: list[tuple[int, str, str, str]] = []
        for item in items:
            seen = self._unconfirmed.get(item.id, 0) + 1
            if seen >= BAD_ANSWER_ATTEMPTS:
                dead.append((item.id, item.activity_id, item.person, reason))
            else:
                self._unconfirmed[item.id] = seen
                again.append(item.id)
        # Counted and backed off whichever way the batch goes: the next batch waits too.
        self._retry_later([i.id for i in items], "bad_answer", resp.retry_after, reason, failures)
        if dead:
            await self._dead_letter(dead, held, items, resp.status)
        if again:
            self._publish(
                "retried", resp.status, [i for i in items if i.id in again], reason, resp.elapsed
            )
            await self._give_back(again, held)

    async def _refused(
        self,
        items: Sequence[SpooledItem],
        held: set[int],
        status: int,
        data: Any,
        elapsed: float | None = None,
    ) -> None:
        """A 4xx for the batch: isolate the refused activities by bisection."""
        self._note_bad_request()
        details = data.get("details") if isinstance(data, dict) else None
        if isinstance(details, list) and len(details) == len(items) and len(items) > 1:
            # Ortto named each activity's fate: no need to bisect.
            dead: list[tuple[int, str, str, str]] = []
            rest: list[SpooledItem] = []
            for item, detail in zip(items, details, strict=True):
                if isinstance(detail, dict) and detail.get("status") == "invalid":
                    reason = self._client.redact(str(detail.get("error", "invalid")))
                    dead.append((item.id, item.activity_id, item.person, reason))
                else:
                    rest.append(item)
            if dead:
                await self._dead_letter(dead, held, items, status)
                if rest:
                    await self._send(rest, held, bisecting=True)
                return
        if len(items) == 1:
            error = data.get("error") if isinstance(data, dict) else None
            message = self._client.redact(str(error)) if error else ""
            message = message or f"Ortto answered {status}"
            first = items[0]
            await self._dead_letter(
                [(first.id, first.activity_id, first.person, message)], held, items, status
            )
            return
        self._publish(
            "retried", status, items, "refused: sent again in halves to find which", elapsed
        )
        middle = len(items) // 2
        for half in (items[:middle], items[middle:]):
            await self._send(half, held, bisecting=True)

    def _note_bad_request(self) -> None:
        now = self._monotonic()
        window = self._bad_requests
        window.append(now)
        while window and window[0] <= now - BAD_REQUEST_WINDOW:
            window.popleft()
        if len(window) >= BAD_REQUEST_BUDGET:
            window.clear()
            self._pause("circuit", self._circuit_pause)
            log.error(
                "too many refused requests to Ortto; pausing to avoid its IP ban",
                extra={"data": {"seconds": self._circuit_pause}},
            )

    async def _dead_letter(
        self,
        dead: list[tuple[int, str, str, str]],
        held: set[int],
        sent: Sequence[SpooledItem] = (),
        status: int = 0,
    ) -> None:
        """Dead-letter rows (of the items `sent`: the console is shown what they held)."""
        await self._spool.dead_letter(dead)
        if self._feed is not None:
            by_id = {item.id: item for item in sent}
            items = [by_id[item_id] for item_id, *_ in dead if item_id in by_id]
            self._publish("dead_lettered", status, items, dead[0][3])
            errors = {item_id: error for item_id, _, _, error in dead}
            for item in items:
                self._forward(item, status, {"error": errors[item.id]})
        held.difference_update(item_id for item_id, *_ in dead)
        for item_id, activity_id, who, error in dead:
            self._unconfirmed.pop(item_id, None)
            self._metrics.count_activity(activity_id, "dead_lettered")
            log.error(
                "activity dead-lettered",
                extra={"data": {"activity_id": activity_id, "person": who, "error": error}},
            )

    async def _refresh_gauges(self) -> None:
        stats = await self._spool.stats()
        self._metrics.spool_depth.set(stats.depth)
        self._metrics.spool_bytes.set(stats.bytes)
        oldest = stats.oldest_enqueued_at
        self._metrics.spool_oldest_age_seconds.set(
            max(0.0, self._clock() - oldest) if oldest is not None else 0.0
        )
        self._metrics.dead_letters.set(stats.dead_letters)
        self._metrics.spool_writable.set(self._spool.write_error is None)
