"""The relay core: validate, identify, limit, enrich, hand over to the sink.

Plain asyncio, no aiohttp.web: the handler reads the body and renders the answer;
everything between is here, one step after another as in the design's data flow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import orjson

from gateway.client_ip import limit_key, parse_ip
from gateway.config import Settings
from gateway.enrich import anonymize_ip, enrich
from gateway.errors import (
    GatewayError,
    RateLimited,
    Unauthorized,
    Unavailable,
    retry_after_header,
)
from gateway.feed import Feed, FeedEvent
from gateway.identity import person_hash, person_key, verify_identity
from gateway.limits import Check, Limiter, LimiterUnavailable
from gateway.limits.limiter import IN_FLIGHT_RETRY
from gateway.logs import log_field
from gateway.metrics import Metrics
from gateway.reasons import Reason
from gateway.sinks import QUEUED, Sink, SinkResult
from gateway.spool import QueuedActivity
from gateway.validation import (
    ActivityBody,
    EnrichedActivity,
    FieldWarning,
    ParsedRequest,
    first_error,
    is_batch,
    merge_by_problem,
    parse_request,
    warning,
)

# The limiter's key count is a gauge: once a second is fresh enough.
KEYS_REPORT_INTERVAL = 1.0
# The request log line names at most this many distinct field paths of refusals.
MAX_LOGGED_FIELDS = 10
# A refused activity's id as the console's event shows it: the browser's text, cut.
MAX_EVENT_ACTIVITY_ID = 128
# The request log line (middlewares.py) is where a request's summary goes.
REQUEST_LOG = logging.getLogger("gateway.http")
log = logging.getLogger("gateway.relay")


@dataclass(slots=True)
class RelayResult:
    """What to answer: status, Ortto-shaped body and an optional Retry-After."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None
    log: dict[str, Any] | None = None  # merged into the request's log line


def _keep_signed_identifier(item: ActivityBody, warnings: list[FieldWarning]) -> None:
    """Where a signed identity is required, only the identifier it signs goes to Ortto
    (the `person_id`, else the email): another one, unverified, could choose whose
    record the activity changes."""
    fields = item.get("fields")
    if not fields:
        return
    unsigned = ("str::email", "str::ei") if "person_id" in item else ("str::ei",)
    for name in unsigned:
        if name in fields:
            del fields[name]
            warnings.append(
                warning(
                    f"fields.{name}",
                    "dropped",
                    "not_signed",
                    f"{name} is not the identifier the signed identity covers",
                )
            )
    if not fields:
        del item["fields"]


def _settle_merge_by(
    item: ActivityBody, request_merge_by: list[str] | None, warnings: list[FieldWarning]
) -> None:
    """The activity's `merge_by` (its own, else the request's), kept only when it cannot
    choose another person's record (`merge_by_problem`). Kept on the activity, it travels
    through the spool; delivery groups by it and sends it as the request's `merge_by`."""
    merge_by = item.get("merge_by") or request_merge_by
    if not merge_by:
        return
    problem = merge_by_problem(item, merge_by)
    if problem is None:
        item["merge_by"] = merge_by
        return
    item.pop("merge_by", None)
    warnings.append(warning("merge_by", "dropped", "merge_by_not_allowed", problem))


def _person(activity: Any) -> str:
    """The person key of an activity for the feed, or "" when it has no usable one."""
    try:
        return person_key(activity)
    except (GatewayError, AttributeError, TypeError):  # e.g. a refused one's `fields` a list
        return ""


class Relay:
    """One request's way through the gateway, from parsed JSON to the sink."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        sink: Sink,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        feed: Feed | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.sink = sink
        self.metrics = metrics
        self.feed = feed  # the console's events: one per activity (None: none)
        self._clock = clock
        self._keys_reported = 0.0

    async def submit(
        self,
        data: Any,
        client_ip: str | None,
        request_id: str,
        log_data: dict[str, Any] | None = None,
        *,
        test: bool = False,
    ) -> RelayResult:
        """Run one decoded request body through the flow; raise GatewayError to refuse it whole.

        Each refused activity is counted by its reason code, and `log_data` (the request's
        log line) gets the codes and field paths, never a value. A refusal of the body as
        a whole, before its activities are known, is left to the shell to count (and to
        publish). Each activity is published to the feed, marked `test` when the request
        carried the console's test marker."""
        parsed: ParsedRequest = parse_request(data, self.settings)
        raw = data["activities"] if is_batch(data) else [data]
        entries: list[dict[str, Any] | None] = [None] * len(parsed.items)
        # Each accepted activity's person hash, as spooled: the feed's event reuses it.
        hashes: list[str | None] = [None] * len(parsed.items)
        refusal: GatewayError | None = None
        # The address as the activities (and the feed's events) carry it: anonymised once.
        source_ip = (
            anonymize_ip(client_ip) if client_ip and self.settings.ip_anonymize else client_ip
        )
        try:
            result = await self._submit(
                parsed, raw, entries, hashes, client_ip, source_ip, request_id
            )
            if result.status >= 400 and log_data is not None:  # e.g. 429: refused, with entries
                log_data["reason"] = result.body.get("reason")
            return result
        except GatewayError as exc:
            refusal = exc
            exc.counted = True
            raise
        finally:
            self._account(raw, entries, refusal, parsed, log_data)
            if self.feed is not None:
                self._publish(
                    raw, entries, hashes, refusal, parsed, source_ip or "", request_id, test
                )

    def _account(
        self,
        raw: list[Any],
        entries: list[dict[str, Any] | None],
        refusal: GatewayError | None,
        parsed: ParsedRequest,
        log_data: dict[str, Any] | None,
    ) -> None:
        """Count each refused activity by reason (those left without an entry by a refusal
        of the whole request get its reason) and summarise reasons, field paths and
        warning codes for the request's log line."""
        reasons: dict[str, int] = {}
        fields: set[str] = set()
        for activity, entry in zip(raw, entries, strict=True):
            if entry is None:
                if refusal is None:
                    continue
                reason, field = refusal.reason, refusal.field
            elif "reason" in entry:
                reason, field = entry["reason"], entry.get("field")
            else:
                continue
            activity_id = activity.get("activity_id") if isinstance(activity, dict) else None
            self.metrics.count_refusal(activity_id, reason)
            reasons[reason] = reasons.get(reason, 0) + 1
            if field:
                fields.add(log_field(field))
        if log_data is None or not REQUEST_LOG.isEnabledFor(logging.INFO):
            return
        if len(raw) > 1:  # one activity's reason and field are the request's (the shell's)
            if reasons:
                log_data["reasons"] = reasons
            if fields:
                log_data["fields"] = sorted(fields)[:MAX_LOGGED_FIELDS]
        codes = Counter(w["code"] for ws in (parsed.request_warnings, *parsed.warnings) for w in ws)
        if codes:
            log_data["warnings"] = dict(codes)

    def _publish(
        self,
        raw: list[Any],
        entries: list[dict[str, Any] | None],
        hashes: list[str | None],
        refusal: GatewayError | None,
        parsed: ParsedRequest,
        client: str,
        request_id: str,
        test: bool,
    ) -> None:
        """One `activity` event per activity with an outcome: who (hashed unless the
        console is personal), from where (anonymised as the activity's `source_ip`), why
        refused or what was normalised, and the key its delivery will show."""
        feed = self.feed
        assert feed is not None
        settings = self.settings
        now = self._clock()
        for activity, entry, item, warnings, hashed in zip(
            raw, entries, parsed.items, parsed.warnings, hashes, strict=True
        ):
            if entry is None:
                if refusal is None:
                    continue  # no outcome (the request failed otherwise): nothing to show
                reason: str | None = refusal.reason
                field = refusal.field
            else:
                reason, field = entry.get("reason"), entry.get("field")
            event: FeedEvent = {
                "kind": "activity",
                "time": now,
                "outcome": "refused" if reason else "accepted",
                "request_id": request_id,
                "client": client,
            }
            if isinstance(activity, dict) and isinstance(activity.get("activity_id"), str):
                # The browser's text: as long as an activity id may be, no longer (the
                # console masks an email in it).
                event["activity_id"] = activity["activity_id"][:MAX_EVENT_ACTIVITY_ID]
            if reason:
                event["reason"] = reason
                event["field"] = log_field(field) if field else None  # never a value
            if warnings:
                event["warnings"] = [w["code"] for w in warnings]
            if hashed is not None and not settings.console_personal:
                event["person"] = hashed
            elif person := _person(item if isinstance(item, dict) else activity):
                event["person"] = person if settings.console_personal else person_hash(person)
            if entry is not None and entry.get("duplicate"):
                event["duplicate"] = True  # what Ortto gets is the first copy, another key
            elif not reason and isinstance(item, dict) and "key" in item:
                event["key"] = cast(EnrichedActivity, item)["key"]  # enriched in place
            if test:
                event["test"] = True
            feed.publish(event)

    async def _submit(
        self,
        parsed: ParsedRequest,
        raw: list[Any],
        entries: list[dict[str, Any] | None],
        hashes: list[str | None],
        client_ip: str | None,
        source_ip: str | None,
        request_id: str,
    ) -> RelayResult:
        settings = self.settings
        items = parsed.items
        now = self._clock()
        ip_key = limit_key(parse_ip(client_ip)) if client_ip else ""
        checks: list[Check] = []
        positions: list[int] = []
        valid: list[ActivityBody] = []  # the activity at each of `positions`
        errors: list[GatewayError] = []
        for i, item in enumerate(items):
            if not isinstance(item, GatewayError):
                spec = settings.activities[item["activity_id"]]
                try:
                    if "person_id" in item and not spec.person_id:
                        self._check_person_id(item, parsed, i, now)
                    if settings.needs_identity(spec):
                        verify_identity(parsed.tokens[i], item, settings.identity_secrets, now)
                        _keep_signed_identifier(item, parsed.warnings[i])
                except GatewayError as exc:
                    item = items[i] = exc
            if isinstance(item, GatewayError):
                entries[i] = item.entry()
                errors.append(item)
                activity_id = raw[i].get("activity_id") if isinstance(raw[i], dict) else None
                self.metrics.count_activity(activity_id, "invalid")
                continue
            checks.append(
                Check(
                    activity_id=item["activity_id"],
                    person_key=person_key(item),
                    ip=ip_key,
                    person_rate=settings.person_rate(spec),
                    ip_rate=settings.ip_rate(spec),
                    idempotency_key=parsed.keys[i],
                )
            )
            _settle_merge_by(item, parsed.merge_by, parsed.warnings[i])
            positions.append(i)
            valid.append(item)
        if not checks:
            raise first_error(parsed) or errors[0]

        # Enriched and encoded before the limits: the exact size reserves room in the spool
        # first, so a request the spool cannot take is refused before any limit is charged,
        # and one that was charged cannot then find the spool full.
        encoded = [orjson.dumps(enrich(activity, source_ip, now)) for activity in valid]
        held_rows, held_bytes = len(encoded), sum(map(len, encoded))
        if not self.sink.reserve(held_rows, held_bytes):
            self.metrics.spool_full.inc()
            raise Unavailable(
                "the gateway's queue is full; try again later",
                retry_after=5.0,
                reason="spool_full",
            )
        started = time.perf_counter()
        try:
            results = await self.limiter.check_many(checks)
        except BaseException as exc:  # cancelled, or a failure: nothing will be put
            self.sink.unreserve(held_rows, held_bytes)
            if isinstance(exc, LimiterUnavailable):  # Redis down, LIMITER_ON_ERROR=closed
                raise Unavailable(
                    "rate limiting is unavailable; try again later",
                    retry_after=5.0,
                    reason="limiter_unavailable",
                ) from None
            raise
        self.metrics.observe_limiter(time.perf_counter() - started)
        if now - self._keys_reported >= KEYS_REPORT_INTERVAL:
            self._keys_reported = now
            self.metrics.limiter_keys.set(self.limiter.store.key_count())
        accepted: list[QueuedActivity] = []
        accepted_at: list[int] = []
        accepted_items: list[ActivityBody] = []
        accepted_checks: list[Check] = []
        # Only the INFO request line lists who was accepted (each hash is spooled anyway).
        summarize = REQUEST_LOG.isEnabledFor(logging.INFO)
        people: list[str] = []
        limited_after: list[float] = []
        limited_by: list[Reason] = []
        duplicates = in_flight = 0
        for pos, activity, check, result, payload in zip(
            positions, valid, checks, results, encoded, strict=True
        ):
            if result.verdict == "duplicate":  # stored before under the browser's key
                entries[pos] = {**QUEUED, "duplicate": True}
                duplicates += 1
                self.metrics.count_activity(check.activity_id, "duplicate")
                continue
            if result.verdict == "in_flight":  # its first copy is being stored right now
                entries[pos] = {
                    "status": "rate_limited",
                    "error": "the same activity (its key) is being stored now; "
                    f"retry in {retry_after_header(result.retry_after)} s",
                    "reason": "in_flight",
                }
                in_flight += 1
                continue
            if result.verdict != "accepted":
                by_person = result.verdict == "rate_limited_person"
                reason: Reason = "person_limit" if by_person else "ip_limit"
                entries[pos] = {
                    "status": "rate_limited",
                    "error": f"limit per {'person' if by_person else 'IP'} reached for "
                    f"{check.activity_id}; retry in {retry_after_header(result.retry_after)} s",
                    "reason": reason,
                }
                limited_after.append(result.retry_after)
                limited_by.append(reason)
                self.metrics.count_activity(check.activity_id, result.verdict)
                continue
            person = hashes[pos] = person_hash(check.person_key)
            accepted.append(QueuedActivity(payload, check.activity_id, person, now))
            accepted_at.append(pos)
            accepted_items.append(activity)
            accepted_checks.append(check)
            if summarize:
                people.append(person)
        if len(accepted) < held_rows:  # the refused ones' room goes back; the put takes the rest
            self.sink.unreserve(
                held_rows - len(accepted), held_bytes - sum(len(a.payload) for a in accepted)
            )

        if not accepted:
            if in_flight:  # a repeat of what another request is storing: ask again
                self._in_flight()
            if limited_after:
                first = retry_after_header(min(limited_after))
                what = (
                    "rate limit reached for every activity"
                    if not errors
                    else f"no activity accepted: {len(limited_after)} over a rate limit, "
                    f"{len(errors)} invalid (see activities)"
                )
                err = RateLimited(
                    f"{what}; retry in {first} s", retry_after=first, reason=limited_by[0]
                )
                body = err.body(request_id)
                body["activities"] = entries
                return RelayResult(429, body, first)
            if duplicates:  # nothing new: every accepted one was a repeat
                return RelayResult(202, self._answer(entries, parsed, self.metrics, duplicate=True))
            raise first_error(parsed) or errors[0]

        # The request's merge_by as each accepted activity settled it (`_settle_merge_by`):
        # sent as the request's only when they all agree (sync mode; queue mode's delivery
        # groups by each activity's own).
        merge_bys = {tuple(a.get("merge_by") or ()) for a in accepted_items}
        merge_by = list(merge_bys.pop()) or None if len(merge_bys) == 1 else None
        store = self._store(accepted, accepted_checks, async_=parsed.async_, merge_by=merge_by)
        if any(check.idempotency_key is not None for check in accepted_checks):
            # Shielded: a request cancelled meanwhile (a client gone at shutdown) still has
            # its write finish and its keys settled, so a retry is neither lost nor sent twice.
            task = asyncio.ensure_future(store)
            # Read here, or (cancelled meanwhile) by nobody: never logged as lost.
            task.add_done_callback(lambda task: task.cancelled() or task.exception())
            outcome = await asyncio.shield(task)
        else:
            # No key to settle after the write: awaited as it is (the task and the shield
            # were 6 % of a request's instructions). Cancelled meanwhile, the put is written
            # all the same: the spool holds it from before this first waits.
            outcome = await store
        for pos, check_pos in zip(accepted_at, range(len(accepted)), strict=True):
            activity_id = accepted_items[check_pos]["activity_id"]
            self.metrics.count_activity(activity_id, "accepted")
            if outcome.delivered and outcome.entries[check_pos].get("status") != "invalid":
                self.metrics.count_activity(activity_id, "delivered")
            entries[pos] = outcome.entries[check_pos]
        if in_flight:
            # Stored what it could; a final answer would end the browser's attempts at the
            # one still in flight, whose first copy may fail. On the retry the stored ones
            # are duplicates.
            self._in_flight()
        body = self._answer(entries, parsed, self.metrics)
        if not summarize:
            return RelayResult(outcome.status, body)
        summary = {
            "accepted": len(accepted),
            "refused": len(items) - len(accepted),
            "people": sorted(set(people)),
        }
        return RelayResult(outcome.status, body, log=summary)

    def _check_person_id(
        self, item: ActivityBody, parsed: ParsedRequest, i: int, now: float
    ) -> None:
        """A browser-chosen `person_id` needs a signed identity for it (a website-safety
        rule: anyone who learns an id could otherwise act on that person's record).
        Without one it is dropped with a warning, or, as the only identifier, refused."""
        try:
            verify_identity(parsed.tokens[i], item, self.settings.identity_secrets, now)
        except GatewayError as exc:
            fields = item.get("fields") or {}
            if "str::email" not in fields and "str::ei" not in fields:
                raise Unauthorized(
                    "person_id from a browser needs a signed identity for it "
                    "(or person_id = true for the activity)",
                    field="person_id",
                ) from None
            del item["person_id"]
            parsed.warnings[i].append(
                warning(
                    "person_id",
                    "dropped",
                    "not_signed",
                    f"person_id needs a signed identity for it ({exc.message})",
                )
            )

    async def _store(
        self,
        accepted: list[QueuedActivity],
        checks: list[Check],
        *,
        async_: bool,
        merge_by: list[str] | None,
    ) -> SinkResult:
        """Hand the accepted activities to the sink, then settle their keys."""
        try:
            outcome = await self.sink.submit(accepted, async_=async_, merge_by=merge_by)
        except Exception:
            # Not stored (or, in sync mode, not known to have reached Ortto): the browser's
            # retry under the same key is taken as new; nothing accepted may be lost.
            await self._settle_keys(checks, stored=False)
            raise
        # Keys of what was stored (sync mode: what Ortto took) mark repeats from now on.
        stored: list[Check] = []
        refused: list[Check] = []
        for check, entry in zip(checks, outcome.entries, strict=True):
            (refused if entry.get("status") == "invalid" else stored).append(check)
        await self._settle_keys(stored, stored=True)
        await self._settle_keys(refused, stored=False)
        return outcome

    @staticmethod
    def _in_flight() -> NoReturn:
        """A 503 for a request with an activity whose key's first copy is being stored:
        the browser tries again in a second, and nothing it sent is answered as final."""
        raise Unavailable(
            "the same activity (its key) is being stored now; try again",
            retry_after=IN_FLIGHT_RETRY,
            reason="in_flight",
        )

    async def _settle_keys(self, checks: list[Check], *, stored: bool) -> None:
        """Confirm the keys of stored activities (repeats are duplicates from now on), or
        forget those of activities not stored (a repeat is new). If the store fails, a key
        stays pending for its window (`PENDING_WINDOW`): repeats meanwhile are asked to
        try again, and after it one is taken as new."""
        if not any(check.idempotency_key is not None for check in checks):
            return
        try:
            settle = self.limiter.confirm if stored else self.limiter.forget
            await asyncio.shield(settle(checks))
        except LimiterUnavailable:
            log.warning(
                "could not settle idempotency keys",
                extra={"data": {"activities": len(checks), "stored": stored}},
            )

    @staticmethod
    def _answer(
        entries: list[dict[str, Any] | None],
        parsed: ParsedRequest,
        metrics: Metrics,
        *,
        duplicate: bool = False,
    ) -> dict[str, Any]:
        """The answer's body; what validation normalised or dropped is told per activity
        (`warnings` in its entry) and for the body's own keys (top-level `warnings`), and
        counted by code as told; a request whose every accepted activity was a repeat says
        `duplicate: true`."""
        for entry, warnings, item in zip(entries, parsed.warnings, parsed.items, strict=True):
            if warnings and entry is not None:
                entry["warnings"] = warnings
                activity_id = item.get("activity_id") if isinstance(item, dict) else None
                for w in warnings:
                    metrics.count_warning(activity_id, w["code"])
        for w in parsed.request_warnings:
            metrics.count_warning(None, w["code"])
        body: dict[str, Any] = {"activities": entries}
        if duplicate:
            body["duplicate"] = True
        if parsed.request_warnings:
            body["warnings"] = parsed.request_warnings
        return body
