"""Where accepted activities go: the durable spool (`queue`) or straight to Ortto (`sync`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import GatewayError, PayloadTooLarge, Unavailable
from gateway.metrics import Metrics, status_group
from gateway.reasons import Reason
from gateway.spool import QueuedActivity, Spool, SpoolClosed, SpoolError, SpoolFull
from gateway.upstream import (
    OrttoClient,
    UpstreamError,
    UpstreamResponse,
    encode_batch,
    read_answer,
)

log = logging.getLogger("gateway.sinks")

QUEUED = {"status": "queued", "person_status": "queued"}
# Sync mode never relays Ortto's text (it may quote anything, the key included): the
# browser gets these, the gateway's log gets Ortto's reason, redacted.
REFUSED_ACTIVITY = "Ortto refused this activity; its reason is in the gateway's log"
REFUSED_REQUEST = "Ortto refused the activities; its reason is in the gateway's log"
# Retry-After while the spool cannot be written: it tries a write every second.
UNWRITABLE_RETRY_AFTER = 5.0
# While the spool cannot be written every request is refused: at most one WARNING per this
# many seconds, with the count of refusals since the last one, not one a request (on a
# disk already full). The spool logs one ERROR when the state begins, one INFO when it ends.
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class SinkResult:
    """The answer for the accepted activities: a status and one entry per activity."""

    status: int
    entries: list[dict[str, Any]]
    delivered: bool = False  # True when Ortto answered for each (sync mode): see entries


class Sink(Protocol):
    """Takes the accepted, enriched activities of one request."""

    def reserve(self, count: int, nbytes: int) -> bool:
        """Hold room for `count` activities of `nbytes` in all; False when there is none
        now; a GatewayError when there will never be (too big) or none can be stored."""
        ...

    def unreserve(self, count: int, nbytes: int) -> None:
        """Give back reserved room that `submit` will not use."""
        ...

    async def submit(
        self, activities: list[QueuedActivity], *, async_: bool, merge_by: list[str] | None
    ) -> SinkResult: ...


class SpoolSink:
    """`queue` mode: commit to the spool, answer 202 once it is durable."""

    def __init__(
        self, spool: Spool, metrics: Metrics, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._monotonic = monotonic
        self._refusals = 0  # refused since the last WARNING
        self._warned_at: float | None = None

    def _refused(self, message: str, error: str) -> None:
        """Count a request refused for want of a writable spool; WARN at most so often."""
        self._refusals += 1
        now = self._monotonic()
        if self._warned_at is not None and now - self._warned_at < REFUSAL_LOG_INTERVAL:
            return
        log.warning(message, extra={"data": {"error": error, "refused": self._refusals}})
        self._refusals = 0
        self._warned_at = now

    def reserve(self, count: int, nbytes: int) -> bool:
        """Hold room in the spool (see `Spool.reserve`), before any limit is charged.

        413 for a request bigger than the whole spool: "try again later" would be a lie
        that a client retries forever. 503 while the spool cannot be written (full disk):
        refused here, so the limits are not charged for activities that are not kept.
        """
        spool = self._spool
        if count > spool.max_rows or nbytes > spool.max_bytes:
            raise PayloadTooLarge(
                f"{count} activities ({nbytes} bytes) can never fit the gateway's queue "
                f"(at most {spool.max_rows} activities and {spool.max_bytes} bytes): "
                "send fewer at a time"
            )
        if spool.write_error is not None:
            self._refused("requests refused: the spool cannot be written", spool.write_error)
            raise Unavailable(
                "the gateway cannot store activities now; try again later",
                retry_after=UNWRITABLE_RETRY_AFTER,
                reason="spool_unwritable",
            )
        return spool.reserve(count, nbytes)

    def unreserve(self, count: int, nbytes: int) -> None:
        """Give back room in the spool."""
        self._spool.unreserve(count, nbytes)

    async def submit(
        self, activities: list[QueuedActivity], *, async_: bool, merge_by: list[str] | None
    ) -> SinkResult:
        """Spool the activities, for which `reserve` holds room; `async` and `merge_by` do
        not apply to a queued batch."""
        started = time.perf_counter()
        try:
            await self._spool.put(activities, reserved=True)
            self._metrics.observe_spool_write(time.perf_counter() - started)
        except SpoolFull as exc:
            self._metrics.spool_full.inc()
            raise Unavailable(
                "the gateway's queue is full; try again later", retry_after=exc.retry_after
            ) from None
        except SpoolClosed:
            raise Unavailable(
                "the gateway is shutting down", retry_after=5.0, reason="shutting_down"
            ) from None
        except SpoolError as exc:
            # The spool logs one ERROR when writes begin to fail.
            self._refused("requests refused: spool write failed", str(exc))
            raise Unavailable(
                "the gateway cannot store activities now; try again later",
                retry_after=UNWRITABLE_RETRY_AFTER,
                reason="spool_unwritable",
            ) from None
        return SinkResult(202, [dict(QUEUED) for _ in activities])


class ForwardSink:
    """`sync` mode: forward the request to Ortto now and relay its answer."""

    def __init__(self, client: OrttoClient, metrics: Metrics) -> None:
        self._client = client
        self._metrics = metrics

    def reserve(self, count: int, nbytes: int) -> bool:
        """Forwarding has no queue to fill."""
        return True

    def unreserve(self, count: int, nbytes: int) -> None:
        """Nothing was held."""

    async def submit(
        self, activities: list[QueuedActivity], *, async_: bool, merge_by: list[str] | None
    ) -> SinkResult:
        """Post one request to Ortto and map its answer to the browser's, in the gateway's
        words: only a 2xx accounting for each activity counts as Ortto's answer."""
        body = encode_batch([a.payload for a in activities], async_=async_, merge_by=merge_by)
        self._metrics.upstream_batch_activities.observe(len(activities))
        try:
            resp = await self._client.post(body)
        except UpstreamError as exc:
            self._metrics.upstream_requests.labels("error").inc()
            raise UpstreamUnavailable(str(exc)) from None
        self._metrics.upstream_requests.labels(status_group(resp.status)).inc()
        self._metrics.upstream_request_seconds.observe(resp.elapsed)
        status = resp.status
        if 200 <= status < 300:
            entries = read_answer(resp.json(), len(activities))
            if entries is None:
                self._metrics.upstream_retries.labels("bad_answer").inc()
                self._log_answer("Ortto's answer did not account for each activity", resp)
                raise UpstreamUnavailable("Ortto did not confirm the activities; try again later")
            refused = [e.error for e in entries if e.error is not None]
            if refused:
                log.warning(
                    "Ortto refused activities",
                    extra={"data": {"errors": [self._client.redact(e) for e in refused]}},
                )
            # The gateway's own entries: Ortto's words (and what it knows of the person)
            # stay on the server.
            return SinkResult(
                200,
                [
                    {"status": e.status}
                    if e.delivered
                    else {
                        "status": "invalid",
                        "error": REFUSED_ACTIVITY,
                        "reason": "upstream_refused",
                    }
                    for e in entries
                ],
                delivered=True,
            )
        if status in (401, 403):
            log.error("Ortto refused the API key", extra={"data": {"status": status}})
            raise UpstreamUnavailable("the gateway could not authenticate with Ortto")
        if status == 429:
            raise UpstreamRateLimited(
                "Ortto's rate limit was reached; try again later",
                retry_after=resp.retry_after or 10.0,
            )
        self._log_answer("Ortto refused the request", resp)
        if status in (400, 422):
            raise UpstreamRefused(REFUSED_REQUEST)
        raise UpstreamUnavailable(f"Ortto answered {status}")

    def _log_answer(self, message: str, resp: UpstreamResponse) -> None:
        """A WARNING with the status and a bounded, masked excerpt of what Ortto said."""
        log.warning(
            message,
            extra={"data": {"status": resp.status, "answer": self._client.redact(resp.body)}},
        )


class UpstreamUnavailable(GatewayError):
    """Ortto did not answer usefully (sync mode)."""

    status = 502
    reason: Reason = "upstream_unavailable"


class UpstreamRefused(GatewayError):
    """Ortto refused the request's activities (sync mode); its reason is in the log."""

    status = 400
    reason: Reason = "upstream_refused"


class UpstreamRateLimited(GatewayError):
    """Ortto's own rate limit (sync mode)."""

    status = 429
    reason: Reason = "upstream_rate_limited"
