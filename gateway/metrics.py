"""Prometheus metrics of every step, on an injected registry (no module globals).

A sink: it imports no gateway module but the leaf `reasons` (the closed set of reason
codes). Label values are bounded: activity ids come from the catalogue (anything else is
counted as `other`), statuses are grouped, reasons are the fixed codes.
"""

from __future__ import annotations

import asyncio
import platform
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway import __version__, compiled
from gateway.reasons import REFUSAL_REASONS, WARNING_REASONS

PREFIX = "ortto_gateway"
OUTCOMES = (
    "accepted",
    "rate_limited_person",
    "rate_limited_ip",
    "duplicate",
    "invalid",
    "forbidden",
    "delivered",
    "dead_lettered",
)
OTHER_ACTIVITY = "other"
ROUTES = ("activities", "preflight", "shim", "health", "ready", "demo", "index", "other")
# Latency buckets in seconds: the gateway answers in well under a millisecond to ~a second.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 75, 90, 99, 100)
UPSTREAM_STATUSES = ("2xx", "400", "401", "403", "404", "413", "429", "4xx", "503", "5xx", "error")
PAUSE_REASONS = ("auth", "circuit", "rate_limit", "backoff")
# Why a batch was given back: bad_answer is a 2xx that did not account for each activity
# (a proxy's page, a wrong URL); internal is an error of the gateway's own while sending.
RETRY_REASONS = ("server_error", "rate_limit", "network", "bad_answer", "internal")


class TallyHistogram(Histogram):
    """prometheus-client's Histogram whose observations can be tallied: `tally` is a
    list of one count per bucket, then the sum; `add` applies one at once (what
    `observe` does one value at a time)."""

    def tally(self) -> list[float]:
        """An empty tally: a count per bucket (`le`), then the sum."""
        return [0.0] * (len(self._upper_bounds) + 1)

    def count(self, tally: list[float], value: float) -> None:
        """Count one observation in a tally."""
        tally[bisect_left(self._upper_bounds, value)] += 1
        tally[-1] += value

    def add(self, tally: Sequence[float]) -> None:
        """Apply a tally: its counts to their buckets, its sum to the sum."""
        self._sum.inc(tally[-1])
        for bucket, count in zip(self._buckets, tally[:-1], strict=True):
            if count:
                bucket.inc(count)


class Tally:
    """The counts and observations of one loop turn, applied to their metrics at its end.

    prometheus-client takes a lock for each increment (and with `--workers` writes it to a
    file): a request made eight of them (figures in docs/benchmarks.md).
    Here each is a dict update (and a bisect); each series gets one increment per loop
    turn. A scrape sees them one turn late at most: `flush` runs before the registry is
    collected (`_FlushFirst`), and at the end of the turn. Without a running loop (a
    test, a thread) a count is applied at once.
    """

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._observed: dict[TallyHistogram, list[float]] = {}  # TallyHistogram.tally
        self._due = False

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        """Count `amount` on a counter (a labelled child) at the end of the turn."""
        if self._due or self._schedule():
            counts = self._counts
            counts[counter] = counts.get(counter, 0.0) + amount
        else:
            counter.inc(amount)

    def observe(self, histogram: TallyHistogram, value: float) -> None:
        """Observe a value on a histogram (a labelled child) at the end of the turn."""
        if not (self._due or self._schedule()):
            histogram.observe(value)
            return
        tally = self._observed.get(histogram)
        if tally is None:
            tally = self._observed[histogram] = histogram.tally()
        histogram.count(tally, value)

    def _schedule(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._due = True
        return True

    def flush(self) -> None:
        """Apply what the turn counted."""
        self._due = False
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for histogram, tally in observed.items():
            histogram.add(tally)


class _FlushFirst:
    """A collector registered before every metric: a scrape flushes the tally first."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._tally.flush()
        return []


def status_group(status: int) -> str:
    """An HTTP status as its class (`2xx`), except the ones operators act on."""
    if status in (400, 401, 403, 404, 413, 429, 503):
        return str(status)
    return f"{status // 100}xx"


class Metrics:
    """Every metric the gateway exports, registered on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        activity_ids: Iterable[str] = (),
        *,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.activity_ids = frozenset(activity_ids)
        # The hot path's counts go through the tally (see Tally); registered first.
        self.tally = Tally()
        r.register(_FlushFirst(self.tally))
        # A gauge rather than an Info: Info does not work in multiprocess mode (--workers).
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Version of the gateway (always 1); compiled: whether its compiled core runs.",
            ["version", "python", "compiled"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(
            __version__, platform.python_version(), "yes" if compiled.active() else "no"
        ).set(1)
        self.activities = Counter(
            f"{PREFIX}_activities",
            "Activities by outcome at each step of the flow.",
            ["activity_id", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Refused activities by reason code (whole requests refused before their "
            "activities are known count as activity_id `other`).",
            ["activity_id", "reason"],
            registry=r,
        )
        self.warnings = Counter(
            f"{PREFIX}_warnings",
            "Parts of accepted activities normalised or left out, by reason code.",
            ["activity_id", "reason"],
            registry=r,
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "Public HTTP requests by route and grouped status.",
            ["route", "status"],
            registry=r,
        )
        self.http_request_seconds = TallyHistogram(
            f"{PREFIX}_http_request_seconds",
            "Time to answer a public HTTP request.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            f"{PREFIX}_upstream_requests",
            "Requests to Ortto by grouped status (`error` for no answer).",
            ["status"],
            registry=r,
        )
        self.upstream_request_seconds = Histogram(
            f"{PREFIX}_upstream_request_seconds",
            "Time Ortto took to answer.",
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_batch_activities = Histogram(
            f"{PREFIX}_upstream_batch_activities",
            "Activities per request to Ortto.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            f"{PREFIX}_upstream_retries",
            "Batches given back for a later retry, by reason (" + ", ".join(RETRY_REASONS) + ").",
            ["reason"],
            registry=r,
        )
        self.spool_depth = Gauge(
            f"{PREFIX}_spool_depth",
            "Activities waiting in the spool.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            f"{PREFIX}_spool_bytes",
            "Bytes of activities waiting in the spool.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_oldest_age_seconds = Gauge(
            f"{PREFIX}_spool_oldest_age_seconds",
            "Age of the oldest activity waiting in the spool.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.dead_letters = Gauge(
            f"{PREFIX}_dead_letters",
            "Activities in the dead-letter store.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_commit_mode = Gauge(
            f"{PREFIX}_spool_commit_mode",
            "Where spool groups commit (GATEWAY_SPOOL_COMMIT as chosen): 1 for the mode in use.",
            ["mode"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spool_full = Counter(
            f"{PREFIX}_spool_full",
            "Requests refused with 503 because the spool was full.",
            registry=r,
        )
        self.delivery_paused = Gauge(
            f"{PREFIX}_delivery_paused",
            "1 while delivery is paused, by reason (auth, circuit, rate_limit).",
            ["reason"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.delivery_batches_in_flight = Gauge(
            f"{PREFIX}_delivery_batches_in_flight",
            "Batches sent to Ortto and not yet answered and settled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.delivery_restarts = Counter(
            f"{PREFIX}_delivery_restarts",
            "Times the delivery worker stopped on an error and was started again.",
            registry=r,
        )
        self.spool_writable = Gauge(
            f"{PREFIX}_spool_writable",
            "0 while the spool cannot be written (full or read-only disk), else 1.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.spool_writable.set(1)
        self.delivery_pauses = Counter(
            f"{PREFIX}_delivery_pauses",
            "Times sending to Ortto paused, by reason (backoff: after 5xx or no answer).",
            ["reason"],
            registry=r,
        )
        self.upstream_rate_fallback = Counter(
            f"{PREFIX}_upstream_rate_fallback",
            "Requests to Ortto paced by this process's own share, and pauses not shared, "
            "because the shared upstream rate in Redis failed.",
            registry=r,
        )
        self.spool_write_seconds = TallyHistogram(
            f"{PREFIX}_spool_write_seconds",
            "Time to commit a request's activities to the spool (group commit and fsync).",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.limiter_seconds = TallyHistogram(
            f"{PREFIX}_limiter_seconds",
            "Time to check and charge a request's limits.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.limiter_keys = Gauge(
            f"{PREFIX}_limiter_keys",
            "Keys held by the rate limiter store.",
            registry=r,
            # Several workers share one Redis and report the same count: not a sum.
            multiprocess_mode="livemax",
        )
        self.limiter_errors = Counter(
            f"{PREFIX}_limiter_errors",
            "Limiter store failures (the on-error policy was applied).",
            registry=r,
        )
        self.limiter_evictions = Counter(
            f"{PREFIX}_limiter_evictions",
            "Limiter keys evicted to keep the in-process store bounded.",
            registry=r,
        )
        self.body_inflated_bytes = Counter(
            f"{PREFIX}_body_inflated_bytes",
            "Bytes inflated from gzip and deflate request bodies (each stops one past the limit).",
            registry=r,
        )
        self.body_readers = Gauge(
            f"{PREFIX}_body_readers",
            "Requests holding a slot while a slow body arrives (GATEWAY_MAX_BODY_READERS).",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Label lookups cost more than the increment: children are kept once bound.
        self._activity_children: dict[tuple[str, str], Any] = {}
        self._request_children: dict[tuple[str, str], Any] = {}
        self._refusal_children: dict[tuple[str, str], Any] = {}
        self._warning_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        if process_metrics:
            ProcessCollector(namespace=PREFIX, registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._initialise()

    def _initialise(self) -> None:
        """Create the expected series at zero so dashboards and rate() see them."""
        for activity_id in (*self.activity_ids, OTHER_ACTIVITY):
            for outcome in OUTCOMES:
                self.activities.labels(activity_id, outcome)
            for code in REFUSAL_REASONS:
                self.refusals.labels(activity_id, code)
            for code in WARNING_REASONS:
                self.warnings.labels(activity_id, code)
        for reason in ("auth", "circuit", "rate_limit"):
            self.delivery_paused.labels(reason).set(0)
        for reason in RETRY_REASONS:
            self.upstream_retries.labels(reason)
        for route in ROUTES:
            self.http_request_seconds.labels(route)
        for route, status in (
            *(("activities", s) for s in ("2xx", "400", "403", "404", "413", "429", "503")),
            ("preflight", "2xx"),
            ("preflight", "403"),
        ):
            self.http_requests.labels(route, status)
        for status in UPSTREAM_STATUSES:
            self.upstream_requests.labels(status)
        for reason in PAUSE_REASONS:
            self.delivery_pauses.labels(reason)

    def activity_label(self, activity_id: object) -> str:
        """A bounded label value: the id if it is in the catalogue, else `other`."""
        if isinstance(activity_id, str) and activity_id in self.activity_ids:
            return activity_id
        return OTHER_ACTIVITY

    def count_activity(self, activity_id: object, outcome: str, n: int = 1) -> None:
        """Count `n` activities with an outcome."""
        key = (self.activity_label(activity_id), outcome)
        child = self._activity_children.get(key)
        if child is None:
            child = self._activity_children[key] = self.activities.labels(*key)
        self.tally.inc(child, n)

    def count_refusal(self, activity_id: object, reason: str) -> None:
        """Count one refused activity (or request) with its reason code."""
        key = (self.activity_label(activity_id), reason)
        child = self._refusal_children.get(key)
        if child is None:
            child = self._refusal_children[key] = self.refusals.labels(*key)
        self.tally.inc(child)

    def count_warning(self, activity_id: object, reason: str) -> None:
        """Count one warning of an activity (or of the body) with its reason code."""
        key = (self.activity_label(activity_id), reason)
        child = self._warning_children.get(key)
        if child is None:
            child = self._warning_children[key] = self.warnings.labels(*key)
        self.tally.inc(child)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count and time one public request."""
        key = (route, status_group(status))
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.http_requests.labels(*key)
        self.tally.inc(counter)
        timer = self._latency_children.get(route)
        if timer is None:
            timer = self._latency_children[route] = self.http_request_seconds.labels(route)
        self.tally.observe(timer, seconds)

    def observe_limiter(self, seconds: float) -> None:
        """Time one request's limit check."""
        self.tally.observe(self.limiter_seconds, seconds)

    def observe_spool_write(self, seconds: float) -> None:
        """Time one request's commit to the spool."""
        self.tally.observe(self.spool_write_seconds, seconds)
