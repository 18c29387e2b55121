"""Sandbox upstream: a faithful stand-in for Ortto's activities API (tests, demo, staging).

It answers ``POST /v1/activities/create`` the way Ortto's documentation and answers recorded
from real Ortto say Ortto does (``X-Api-Key`` check, 100 activities / 2 MB per request, the
90-day ``created`` rule, Ortto's built-in person fields plus declared custom ones, values
type-checked by their ``type:`` prefix in ``fields`` and ``attributes``, a ``person_id`` only
for a person that exists, 50 activities per activity per contact per 24 h, ``key`` +
``created`` dedupe, ``async`` queueing, answers ``ingested`` or ``queued`` by a setting, the
15-bad-requests-in-15-s ban, an optional request rate), and records everything it receives so
tests can assert on it. Every entry has a ``person_status``; a request's ``person_id`` is
echoed. Faults (errors, delays, ambiguous failures that process the request and then answer an
error) can be programmed in order. docs/sandbox.md gives the evidence for each rule.

The control API under ``/_sandbox/`` (received activities, faults, reset, config, stats) has
NO authentication: anyone who reaches it can read every activity received and change the API
key. Only ever listen on loopback (127.0.0.1 / ::1) with it; it is not for production.

Order of checks for each activities request: the ban (403), then the next queued fault, then
the key (401), ``rate_per_second`` (429, counting only requests let through), Content-Type,
size and JSON shape (400), the ``created`` rules (whole request 400), then each activity
(unknown person field or a value of the wrong type, no identifier, an unknown ``person_id``,
more than 15 attributes or 16,000 bytes, 50 per activity per contact per 24 h: an ``invalid``
entry; all invalid: 400 with ``details``). All callers
count as one client IP (the gateway), so the ban (400/401/403 answers, 15 within 15 s) is
sandbox-wide.

Control API (JSON): ``GET /_sandbox/received?since=N``, ``GET /_sandbox/stats``,
``POST /_sandbox/faults`` (a Fault's fields), ``DELETE /_sandbox/faults``,
``POST /_sandbox/reset``, ``PUT /_sandbox/config`` (``api_key``, ``latency``,
``rate_per_second``, ``answers``, ``person_fields``, ``person_ids``).

A fault's ``answer`` stands for an upstream that misbehaves rather than refuses, at any
status including 2xx: ``html`` (a proxy's or captive portal's page), ``empty`` (no body,
as a 204), ``echo_key`` (Ortto's error shape whose message quotes the ``X-Api-Key`` it
received: the gateway must never pass it on).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.config import ORTTO_MAX_ACTIVITY_BYTES, is_ascii_digits

__all__ = [
    "ANSWER_MODES",
    "BUILTIN_PERSON_FIELDS",
    "DEFAULT_PERSON_FIELDS",
    "SANDBOX_STATE",
    "Fault",
    "ReceivedActivity",
    "ReceivedRequest",
    "SandboxState",
    "create_sandbox_app",
    "wait_for",
]

ACTIVITIES_PATH = "/v1/activities/create"
MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_ACTIVITIES = 100
# Ortto documents "at most 16 kB" per activity (design.md, Limits) without saying whether a
# kB is 1,000 or 1,024 bytes. The sandbox must never be more lenient than Ortto may be, or
# tests against it cannot catch an oversize activity, so it takes the stricter decimal
# reading, 16,000 bytes: the same constant the gateway uses (one source of truth).
MAX_ACTIVITY_BYTES = ORTTO_MAX_ACTIVITY_BYTES
MAX_ATTRIBUTES = 15
CONTACT_LIMIT = 50
CONTACT_WINDOW = 24 * 3600.0
CREATED_MAX_AGE = timedelta(days=90)
BAN_THRESHOLD = 15
BAN_WINDOW = 15.0
BAN_DURATION = 15.0
BAD_STATUSES = frozenset({400, 401, 403})
FAULT_ANSWERS = ("html", "empty", "echo_key")
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in to the network</title></head>\n"
    b"<body><h1>Welcome</h1><p>Accept the terms to continue.</p></body></html>\n"
)
_UNSET: Any = object()

# Ortto's built-in person fields that a request may set: the writable (not ``read_only``)
# person fields of an instance schema recorded from real Ortto on 2025-11-04 (public fixture
# phpdevkits/ortto-sdk tests/Fixtures/Saloon/account/get_account_schema_all_namespaces.json),
# plus ``str::u-ctx``, read-only there but sent by Ortto's own subscription example
# (ortto-examples/05-subscription.json). Custom ``str:cm:*`` person fields exist only in the
# instance that declares them: a sandbox setting (``person_fields``) declares them.
BUILTIN_PERSON_FIELDS: frozenset[str] = frozenset(
    {
        "bol::gdpr",
        "bol::p",
        "bol::sp",
        "dtz::b",
        "geo::city",
        "geo::country",
        "geo::region",
        "phn::phone",
        "str::ei",
        "str::email",
        "str::first",
        "str::iuc",
        "str::ium",
        "str::iun",
        "str::ius",
        "str::iut",
        "str::language",
        "str::last",
        "str::lt",
        "str::name",
        "str::postal",
        "str::s-ctx",
        "str::soi-ctx",
        "str::u-ctx",
    }
)
DEFAULT_PERSON_FIELDS = BUILTIN_PERSON_FIELDS  # the name earlier callers import
# How the sandbox answers an accepted activity without ``async``: ``ingested`` with a
# person_id, person_status and activity id (the guide's documented answer), or ``queued``
# (what real Ortto answered in every recording of 2025-11-05, phpdevkits/ortto-sdk).
ANSWER_MODES = ("ingested", "queued")
# Ortto's ``int`` is int64 (design.md).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_STR_CHARS = 255
MAX_TXT_CHARS = 4000

_FIELD_NAME = re.compile(r"^(str|txt|int|bol|dtz|tme|phn|geo|sst|obj):[a-z0-9-]*:[A-Za-z0-9_.-]+$")
# Digits only, as the documented ``{"c": "61", "n": "401234567"}``: E.164 allows 1 to 3
# country digits and at most 15 in all.
_PHONE_COUNTRY = re.compile(r"^[0-9]{1,3}$")
_PHONE_NUMBER = re.compile(r"^[0-9]{1,15}$")
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)


@dataclass
class Fault:
    """One programmed answer or behaviour, applied to the next ``count`` activity requests."""

    status: int = 503
    count: int = 1
    retry_after: float | None = None
    try_in_seconds: int | None = None
    delay: float = 0.0
    process: bool = False
    answer: str | None = None  # one of FAULT_ANSWERS: a misbehaving upstream's body

    def __post_init__(self) -> None:
        """Validate the fault, so a bad one from the control API is refused up front."""
        if not _is_int(self.status) or not 200 <= self.status <= 599:
            raise ValueError("status must be an HTTP status between 200 and 599")
        if self.answer is not None and self.answer not in FAULT_ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(FAULT_ANSWERS)} or null")
        if self.status < 400 and not (
            self.status < 300 and (self.process or self.answer is not None)
        ):
            raise ValueError("status below 400 needs process=true or an answer, and must be 2xx")
        if not _is_int(self.count) or self.count < 1:
            raise ValueError("count must be an integer >= 1")
        if self.retry_after is not None and (
            not _is_number(self.retry_after) or self.retry_after < 0
        ):
            raise ValueError("retry_after must be a number >= 0 or null")
        if self.try_in_seconds is not None and (
            not _is_int(self.try_in_seconds) or self.try_in_seconds < 0
        ):
            raise ValueError("try_in_seconds must be an integer >= 0 or null")
        if not _is_number(self.delay) or self.delay < 0:
            raise ValueError("delay must be a number >= 0")
        if not isinstance(self.process, bool):
            raise ValueError("process must be a boolean")


@dataclass(frozen=True)
class ReceivedRequest:
    """One POST to the activities path, as received and answered."""

    time: float
    path: str
    api_key_ok: bool
    status: int
    body: bytes
    n_activities: int


@dataclass(frozen=True)
class ReceivedActivity:
    """One ingested activity, exactly as received."""

    time: float
    activity: dict[str, Any]

    @property
    def activity_id(self) -> str:
        """The activity's ``activity_id`` (e.g. ``act:cm:logged-in``)."""
        return str(self.activity.get("activity_id", ""))

    @property
    def email(self) -> str | None:
        """The person's ``fields["str::email"]``, or None."""
        return _str_or_none(_dict_or_empty(self.activity.get("fields")).get("str::email"))

    @property
    def source_ip(self) -> str | None:
        """The ``location.source_ip``, or None."""
        return _str_or_none(_dict_or_empty(self.activity.get("location")).get("source_ip"))

    @property
    def key(self) -> str | None:
        """The activity's idempotency ``key``, or None."""
        return _str_or_none(self.activity.get("key"))

    @property
    def created(self) -> str | None:
        """The activity's ``created`` string as received, or None."""
        return _str_or_none(self.activity.get("created"))


@dataclass
class _Outcome:
    """An answer decided by the sandbox, before any delay."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # a body that is not JSON (a fault's `answer`)
    content_type: str = "application/json"


@dataclass
class _QueuedFault:
    """A queued fault and how many more requests it applies to."""

    fault: Fault
    remaining: int


@dataclass
class _Merged:
    """What a (key, created) pair was answered with the first time."""

    person_id: str
    activity_id: str


class SandboxState:
    """Everything the sandbox received and everything that shapes its answers."""

    def __init__(
        self,
        api_key: str = "sandbox-key",
        *,
        person_fields: Iterable[str] = (),
        person_ids: Iterable[str] = (),
        answers: str = "ingested",
        clock: Callable[[], float] = time.time,
        latency: float = 0.0,
        rate_per_second: float | None = None,
    ) -> None:
        """Create a sandbox with a key, declared custom person fields, known person ids,
        an answer mode (``ingested`` or ``queued``), a clock and optional pacing."""
        self.api_key = api_key
        self.custom_person_fields: frozenset[str] = frozenset()
        self.person_fields: frozenset[str] = BUILTIN_PERSON_FIELDS
        self.declare_person_fields(person_fields)
        self.person_ids: frozenset[str] = frozenset()
        self.declare_person_ids(person_ids)
        if answers not in ANSWER_MODES:
            raise ValueError(f"answers must be one of {', '.join(ANSWER_MODES)}")
        self.answers = answers
        self.clock = clock
        self.latency = latency
        self.rate_per_second = rate_per_second
        self.requests: list[ReceivedRequest] = []
        self.activities: list[ReceivedActivity] = []
        self.duplicates = 0
        self.banned_until = 0.0
        self.bans = 0
        self._keys_seen: collections.Counter[str] = collections.Counter()
        self._faults: collections.deque[_QueuedFault] = collections.deque()
        self._bad_times: collections.deque[float] = collections.deque()
        self._rate_times: collections.deque[float] = collections.deque()
        self._persons: dict[str, str] = {}
        self._ids_given: set[str] = set()
        self._merged: dict[tuple[str, datetime], _Merged] = {}
        self._per_contact: dict[tuple[str, str], collections.deque[float]] = {}

    def declare_person_fields(self, names: Iterable[str]) -> None:
        """Set the instance's custom person fields (built-in ones are always known)."""
        declared = frozenset(names)
        for name in declared:
            if not isinstance(name, str) or not _FIELD_NAME.match(name):
                raise ValueError(f"not a person field name (type:namespace:name): {name!r}")
        self.custom_person_fields = declared - BUILTIN_PERSON_FIELDS
        self.person_fields = BUILTIN_PERSON_FIELDS | declared

    def declare_person_ids(self, person_ids: Iterable[str]) -> None:
        """Set the person ids that exist before any request (people the sandbox creates count
        too): an activity naming any other ``person_id`` is invalid."""
        declared = frozenset(person_ids)
        for person_id in declared:
            if not isinstance(person_id, str) or not person_id.strip():
                raise ValueError(f"not a person id: {person_id!r}")
        self.person_ids = declared

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; faults apply in the order added."""
        self._faults.append(_QueuedFault(fault, fault.count))

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """How many requests the queued faults will still apply to."""
        return sum(queued.remaining for queued in self._faults)

    def reset(self) -> None:
        """Forget everything received, faults, counters, people and bans (config stays)."""
        self.requests.clear()
        self.activities.clear()
        self.duplicates = 0
        self.banned_until = 0.0
        self.bans = 0
        self._keys_seen.clear()
        self._faults.clear()
        self._bad_times.clear()
        self._rate_times.clear()
        self._persons.clear()
        self._ids_given.clear()
        self._merged.clear()
        self._per_contact.clear()

    def keys_seen(self) -> collections.Counter[str]:
        """Activity ``key`` -> times received and accepted (ingested or merged as duplicate)."""
        return collections.Counter(self._keys_seen)

    def is_banned(self) -> bool:
        """Whether the bad-request ban is in force now (clears an expired ban)."""
        if self.banned_until and self.clock() >= self.banned_until:
            self.banned_until = 0.0
        return self.banned_until > 0.0

    def stats(self) -> dict[str, Any]:
        """Counters for the control API."""
        return {
            "requests": len(self.requests),
            "activities": len(self.activities),
            "duplicates": self.duplicates,
            "bans": self.bans,
            "banned": self.is_banned(),
            "keys_received_twice": sum(1 for n in self._keys_seen.values() if n >= 2),
        }

    def _next_fault(self) -> Fault | None:
        """Consume one use of the first queued fault, if any."""
        if not self._faults:
            return None
        queued = self._faults[0]
        queued.remaining -= 1
        if queued.remaining <= 0:
            self._faults.popleft()
        return queued.fault

    def _note_answer(self, status: int, now: float) -> None:
        """Count a bad answer toward the ban and trip it on the threshold."""
        if status not in BAD_STATUSES:
            return
        bad = self._bad_times
        bad.append(now)
        while bad and bad[0] <= now - BAN_WINDOW:
            bad.popleft()
        if len(bad) >= BAN_THRESHOLD:
            self.banned_until = now + BAN_DURATION
            self.bans += 1
            bad.clear()

    def _rate_limited(self, now: float) -> _Outcome | None:
        """Apply ``rate_per_second`` over a sliding second."""
        rate = self.rate_per_second
        if rate is None:
            return None
        times = self._rate_times
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) + 1 > rate:
            wait = times[0] + 1.0 - now if times else 1.0
            return _Outcome(429, _rate_limit_body(max(1, math.ceil(wait))))
        times.append(now)
        return None

    def _process(
        self, api_key_ok: bool, content_type: str, charset: str | None, body: bytes | None
    ) -> _Outcome:
        """Decide the normal answer to one activities request."""
        if not api_key_ok:
            return _error(401, "Invalid API key")
        limited = self._rate_limited(self.clock())
        if limited is not None:
            return limited
        if content_type != "application/json" or (
            charset is not None and charset.lower() not in ("utf-8", "utf8")
        ):
            return _error(400, "Content-Type must be application/json")
        if body is None:
            return _error(400, "Request body exceeds the 2 MB limit")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON body")
        if not isinstance(payload, dict):
            return _error(400, "Request body must be a JSON object")
        activities = payload.get("activities")
        if not isinstance(activities, list):
            return _error(400, "activities is required and must be a list")
        count = len(activities)
        if count == 0:
            return _error(400, "activities must not be empty")
        if count > MAX_ACTIVITIES:
            return _error(
                400, f"Too many activities: {count} (at most {MAX_ACTIVITIES} per request)"
            )
        is_async = payload.get("async", False)
        if not isinstance(is_async, bool):
            return _error(400, "async must be a boolean")
        merge_by = payload.get("merge_by")
        if merge_by is not None and not (
            isinstance(merge_by, list) and all(isinstance(m, str) for m in merge_by)
        ):
            return _error(400, "merge_by must be a list of strings")
        now = self.clock()
        created_at: list[datetime | None] = []
        for activity in activities:
            created, problem = _check_created(activity, now)
            if problem is not None:
                return _error(400, problem)
            created_at.append(created)
        entries: list[dict[str, Any]] = []
        for activity, created in zip(activities, created_at, strict=True):
            problem = self._validate(activity)
            if problem is not None:
                entries.append(_invalid(activity, problem))
            else:
                entries.append(self._ingest(activity, created, is_async, now))
        if all(entry["status"] == "invalid" for entry in entries):
            outcome = _error(400, f"No valid contacts provided ({entries[0]['error']})")
            # The documented batch error's details carry only status and error.
            outcome.body["details"] = [
                {"status": "invalid", "error": entry["error"]} for entry in entries
            ]
            return outcome
        return _Outcome(200, {"activities": entries})

    def _validate(self, activity: Any) -> str | None:
        """Return why an activity is invalid, or None."""
        if not isinstance(activity, dict):
            return "activity must be a JSON object"
        activity_id = activity.get("activity_id")
        if not isinstance(activity_id, str) or not activity_id.startswith("act:"):
            return "activity_id is required (e.g. act:cm:logged-in)"
        person_fields = activity.get("fields")
        if person_fields is None:
            person_fields = {}
        if not isinstance(person_fields, dict):
            return "fields must be an object"
        for name, value in person_fields.items():
            if name not in self.person_fields:
                return f"failed to validate field {name} in schema: {name}: Object not found"
            problem = _value_problem(name, value)
            if problem is not None:
                return f"failed to validate field {name} in schema: {name}: {problem}"
        if _person_key(activity) is None:
            return "no person identifier: str::email, str::ei or person_id is required"
        person_id = _given_person_id(activity)
        if person_id is not None and not self._person_exists(person_id):
            return f"person {person_id} not found"
        attributes = activity.get("attributes")
        if attributes is not None and not isinstance(attributes, dict):
            return "attributes must be an object"
        if attributes and len(attributes) > MAX_ATTRIBUTES:
            return f"too many attributes: {len(attributes)} (at most {MAX_ATTRIBUTES})"
        for name, value in (attributes or {}).items():
            # Unknown attributes are ignored (design.md), but a value that cannot be read as
            # its type prefix says fails ingestion (issue 16, seed 002).
            if isinstance(name, str) and _FIELD_NAME.match(name):
                problem = _value_problem(name, value)
                if problem is not None:
                    return f"failed to validate attribute {name}: {problem}"
        location = activity.get("location")
        if location is not None and not isinstance(location, dict):
            return "location must be an object"
        key = activity.get("key")
        if key is not None and not isinstance(key, str):
            return "key must be a string"
        if len(orjson.dumps(activity)) > MAX_ACTIVITY_BYTES:
            return "activity is larger than 16 kB"
        return None

    def _person_exists(self, person_id: str) -> bool:
        """Whether a person id was declared or handed out by this sandbox."""
        return person_id in self.person_ids or person_id in self._ids_given

    def _ingest(
        self, activity: dict[str, Any], created: datetime | None, is_async: bool, now: float
    ) -> dict[str, Any]:
        """Record one valid activity (or merge its duplicate) and return its answer entry."""
        key = activity.get("key")
        given_id = _given_person_id(activity)
        queued = is_async or self.answers == "queued"
        pair = (key, created) if isinstance(key, str) and created is not None else None
        if pair is not None and pair in self._merged:
            merged = self._merged[pair]
            self.duplicates += 1
            self._keys_seen[pair[0]] += 1
            if queued:
                return _queued(given_id)
            return {
                "person_id": merged.person_id,
                "person_status": "updated",
                "activity_id": merged.activity_id,
                "status": "ingested",
            }
        person_key = _person_key(activity)
        assert person_key is not None  # validated
        times = self._per_contact.setdefault((activity["activity_id"], person_key), _deque())
        while times and times[0] <= now - CONTACT_WINDOW:
            times.popleft()
        if len(times) >= CONTACT_LIMIT:
            return _invalid(activity, "Activity limit of 50 per contact per 24 hours reached")
        times.append(now)
        if given_id is not None:
            # The guide: person_id given and found, the activity is applied to that person.
            person_id, person_status = given_id, "matched"
        else:
            known = self._persons.get(person_key)
            person_status = "created" if known is None else "updated"
            person_id = known if known is not None else secrets.token_hex(12)
            self._persons[person_key] = person_id
            self._ids_given.add(person_id)
        activity_hex = secrets.token_hex(12)
        self.activities.append(ReceivedActivity(now, activity))
        if isinstance(key, str):
            self._keys_seen[key] += 1
        if pair is not None:
            self._merged[pair] = _Merged(person_id, activity_hex)
        if queued:
            return _queued(given_id)
        return {
            "person_id": person_id,
            "person_status": person_status,
            "activity_id": activity_hex,
            "status": "ingested",
        }


SANDBOX_STATE: web.AppKey[SandboxState] = web.AppKey("sandbox_state", SandboxState)


def create_sandbox_app(state: SandboxState | None = None) -> web.Application:
    """Build the sandbox aiohttp app around ``state`` (a fresh one by default)."""
    app = web.Application(middlewares=[_ortto_errors])
    app[SANDBOX_STATE] = state if state is not None else SandboxState()
    app.router.add_post(ACTIVITIES_PATH, _handle_activities)
    app.router.add_get("/_sandbox/received", _handle_received)
    app.router.add_get("/_sandbox/stats", _handle_stats)
    app.router.add_post("/_sandbox/faults", _handle_add_fault)
    app.router.add_delete("/_sandbox/faults", _handle_clear_faults)
    app.router.add_post("/_sandbox/reset", _handle_reset)
    app.router.add_put("/_sandbox/config", _handle_config)
    return app


async def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 15.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)


async def _handle_activities(request: web.Request) -> web.StreamResponse:
    """Answer ``POST /v1/activities/create`` as Ortto would, with faults and recording."""
    state = request.app[SANDBOX_STATE]
    body = await _read_limited(request, MAX_BODY_BYTES)
    now = state.clock()
    api_key = request.headers.get("X-Api-Key")
    api_key_ok = api_key is not None and hmac.compare_digest(
        api_key.encode("utf-8", "surrogateescape"), state.api_key.encode()
    )
    delay = state.latency
    if state.is_banned():
        outcome = _error(403, "Too many bad requests; IP banned")
    else:
        fault = state._next_fault()
        if fault is not None and not fault.process:
            outcome = _fault_outcome(fault, api_key)
        else:
            outcome = state._process(api_key_ok, request.content_type, request.charset, body)
            if fault is not None and (not 200 <= fault.status < 300 or fault.answer is not None):
                outcome = _fault_outcome(fault, api_key)
        if fault is not None:
            delay += fault.delay
            if fault.retry_after is not None:
                outcome.headers["Retry-After"] = _seconds(fault.retry_after)
        state._note_answer(outcome.status, now)
    state.requests.append(
        ReceivedRequest(
            now, request.path, api_key_ok, outcome.status, body or b"", _count_activities(body)
        )
    )
    if delay > 0:
        await asyncio.sleep(delay)
    if outcome.raw is not None:
        return web.Response(
            status=outcome.status,
            body=outcome.raw,
            headers={**outcome.headers, "Content-Type": outcome.content_type},
        )
    return _json(outcome.status, outcome.body, outcome.headers)


async def _handle_received(request: web.Request) -> web.StreamResponse:
    """List ingested activities from index ``since`` on."""
    state = request.app[SANDBOX_STATE]
    since_text = request.query.get("since", "0")
    if not is_ascii_digits(since_text):
        return _json(400, _error(400, "since must be a non-negative integer").body)
    since = int(since_text)
    items = [
        {
            "index": index,
            "time": received.time,
            "activity_id": received.activity_id,
            "email": received.email,
            "source_ip": received.source_ip,
            "key": received.key,
            "created": received.created,
            "attributes": received.activity.get("attributes") or {},
            "fields": received.activity.get("fields") or {},
            "location": received.activity.get("location"),
        }
        for index, received in enumerate(state.activities[since:], start=since)
    ]
    body = {"total": len(state.activities), "duplicates": state.duplicates, "activities": items}
    return _json(200, body)


async def _handle_stats(request: web.Request) -> web.StreamResponse:
    """Counters: requests, activities, duplicates, bans, banned, keys received twice."""
    return _json(200, request.app[SANDBOX_STATE].stats())


async def _handle_add_fault(request: web.Request) -> web.StreamResponse:
    """Queue a fault given as a JSON object with Fault's field names."""
    payload = await _control_json(request)
    if isinstance(payload, web.StreamResponse):
        return payload
    names = {f.name for f in fields(Fault)}
    unknown = sorted(set(payload) - names)
    if unknown:
        return _json(400, _error(400, f"unknown fault fields: {', '.join(unknown)}").body)
    try:
        fault = Fault(**payload)
    except ValueError as exc:
        return _json(400, _error(400, str(exc)).body)
    request.app[SANDBOX_STATE].add_fault(fault)
    return web.Response(status=204)


async def _handle_clear_faults(request: web.Request) -> web.StreamResponse:
    """Drop every queued fault."""
    request.app[SANDBOX_STATE].clear_faults()
    return web.Response(status=204)


async def _handle_reset(request: web.Request) -> web.StreamResponse:
    """Forget everything received."""
    request.app[SANDBOX_STATE].reset()
    return web.Response(status=204)


async def _handle_config(request: web.Request) -> web.StreamResponse:
    """Change ``api_key``, ``latency``, ``rate_per_second``, ``answers`` (``ingested`` or
    ``queued``), ``person_fields`` (the custom person fields) and/or ``person_ids``."""
    payload = await _control_json(request)
    if isinstance(payload, web.StreamResponse):
        return payload
    known = {"api_key", "latency", "rate_per_second", "answers", "person_fields", "person_ids"}
    unknown = sorted(set(payload) - known)
    if unknown:
        return _json(400, _error(400, f"unknown config fields: {', '.join(unknown)}").body)
    api_key = payload.get("api_key", _UNSET)
    latency = payload.get("latency", _UNSET)
    rate = payload.get("rate_per_second", _UNSET)
    answers = payload.get("answers", _UNSET)
    person_fields = payload.get("person_fields", _UNSET)
    person_ids = payload.get("person_ids", _UNSET)
    if api_key is not _UNSET and not (isinstance(api_key, str) and api_key):
        return _json(400, _error(400, "api_key must be a non-empty string").body)
    if latency is not _UNSET and not (_is_number(latency) and latency >= 0):
        return _json(400, _error(400, "latency must be a number >= 0").body)
    if rate is not _UNSET and rate is not None and not (_is_number(rate) and rate > 0):
        return _json(400, _error(400, "rate_per_second must be a number > 0 or null").body)
    if answers is not _UNSET and answers not in ANSWER_MODES:
        return _json(400, _error(400, f"answers must be one of {', '.join(ANSWER_MODES)}").body)
    for name, names in (("person_fields", person_fields), ("person_ids", person_ids)):
        if names is not _UNSET and not isinstance(names, list):
            return _json(400, _error(400, f"{name} must be a list of strings").body)
    state = request.app[SANDBOX_STATE]
    try:
        if person_fields is not _UNSET:
            state.declare_person_fields(person_fields)
        if person_ids is not _UNSET:
            state.declare_person_ids(person_ids)
    except (ValueError, TypeError) as exc:
        return _json(400, _error(400, str(exc)).body)
    if isinstance(api_key, str):
        state.api_key = api_key
    if _is_number(latency):
        state.latency = float(latency)
    if rate is None or _is_number(rate):
        state.rate_per_second = None if rate is None else float(rate)
    if isinstance(answers, str):
        state.answers = answers
    return web.Response(status=204)


@web.middleware
async def _ortto_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer unknown paths (404) and wrong methods (405) in Ortto's error shape."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return _json(405, _error(405, "Method Not Allowed").body, {"Allow": exc.headers["Allow"]})
    except web.HTTPNotFound:
        return _json(404, _error(404, "Not Found").body)


async def _control_json(request: web.Request) -> dict[str, Any] | web.StreamResponse:
    """Parse a control request's JSON object body, or answer 400."""
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json(400, _error(400, "Invalid JSON body").body)
    if not isinstance(payload, dict):
        return _json(400, _error(400, "Request body must be a JSON object").body)
    return payload


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """Read the request body, or return None as soon as it exceeds ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _count_activities(body: bytes | None) -> int:
    """How many activities a request body carries (0 when it is not a valid request)."""
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return 0
    activities = payload.get("activities") if isinstance(payload, dict) else None
    return len(activities) if isinstance(activities, list) else 0


def _check_created(activity: Any, now: float) -> tuple[datetime | None, str | None]:
    """Parse an activity's ``created``; return it and a whole-request error, if any."""
    if not isinstance(activity, dict) or activity.get("created") is None:
        return None, None
    created = _parse_rfc3339(activity["created"])
    if created is None:
        return None, " Created date is not a valid RFC 3339 date-time"
    current = datetime.fromtimestamp(now, UTC)
    if current - created > CREATED_MAX_AGE:
        return created, " Created date is more than 90 days ago"
    # No rule for a ``created`` in the future: Ortto documents none, so the sandbox has none.
    return created, None


def _parse_rfc3339(value: Any) -> datetime | None:
    """Parse an RFC 3339 date-time with any number of fraction digits; None if invalid."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.match(value)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, tz_h, tz_m = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    if zulu:
        tz = UTC
    else:
        offset = timedelta(hours=int(tz_h), minutes=int(tz_m))
        tz = timezone(-offset if sign == "-" else offset)
    try:
        parsed = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz
        )
    except ValueError:
        return None
    return parsed.astimezone(UTC)


def _person_key(activity: dict[str, Any]) -> str | None:
    """The person identifier: ``person_id``, else normalised email, else external id."""
    person_id = activity.get("person_id")
    if isinstance(person_id, str) and person_id.strip():
        return "id:" + person_id.strip()
    person_fields = _dict_or_empty(activity.get("fields"))
    email = person_fields.get("str::email")
    if isinstance(email, str) and email.strip():
        return "email:" + email.strip().lower()
    external = person_fields.get("str::ei")
    if isinstance(external, str) and external.strip():
        return "ei:" + external.strip()
    return None


def _given_person_id(activity: dict[str, Any]) -> str | None:
    """The activity's own ``person_id`` (trimmed), or None."""
    person_id = activity.get("person_id")
    if isinstance(person_id, str) and person_id.strip():
        return person_id.strip()
    return None


def _queued(person_id: str | None) -> dict[str, Any]:
    """A queued entry, echoing the request's ``person_id`` as recorded Ortto answers do."""
    entry: dict[str, Any] = {"status": "queued", "person_status": "queued"}
    if person_id is not None:
        entry["person_id"] = person_id
    return entry


def _invalid(activity: Any, problem: str) -> dict[str, Any]:
    """An invalid entry: always a ``person_status``, the request's ``person_id`` echoed."""
    entry: dict[str, Any] = {"status": "invalid", "person_status": "invalid", "error": problem}
    person_id = _given_person_id(activity) if isinstance(activity, dict) else None
    if person_id is not None:
        entry["person_id"] = person_id
    return entry


def _value_problem(name: str, value: Any) -> str | None:
    """Why a field or attribute value cannot be read as its ``type:`` prefix says, or None.

    Seed 002 (issue 16): a value that cannot be unmarshaled into its type fails ingestion;
    Ortto answers in Go's style, and Go reads a JSON ``15.3`` or ``"1530"`` into no int64
    and ``"yes"`` into no bool. Shapes are the documented ones (design.md), except what a
    public client's production traffic shows: ``geo`` ``{}`` and ``phn`` without ``c``
    (RudderStack's Ortto destination), and ``dtz`` without ``timezone`` (same source).
    ``null`` leaves a field unset (Go reads null into any type as a no-op).
    """
    if value is None:
        return None
    kind = name.split(":", 1)[0]
    check = _VALUE_CHECKS.get(kind)
    return None if check is None else check(value)


def _check_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return "cannot unmarshal a non-string into str"
    return None if len(value) <= MAX_STR_CHARS else f"longer than {MAX_STR_CHARS} characters"


def _check_txt(value: Any) -> str | None:
    if not isinstance(value, str):
        return "cannot unmarshal a non-string into txt"
    return None if len(value) <= MAX_TXT_CHARS else f"longer than {MAX_TXT_CHARS} characters"


def _check_int(value: Any) -> str | None:
    # orjson reads 15.0 as a float: Go refuses any number with a fraction for an int64 too.
    if not _is_int(value):
        return "cannot unmarshal into int64 (a whole JSON number)"
    return None if INT64_MIN <= value <= INT64_MAX else "outside the int64 range"


def _check_bol(value: Any) -> str | None:
    return None if isinstance(value, bool) else "cannot unmarshal into bool (true or false)"


def _check_dtz(value: Any) -> str | None:
    problem = 'must be a date object {"year", "month", "day", "timezone"}'
    if not isinstance(value, dict):
        return problem
    parts = [value.get("year"), value.get("month"), value.get("day")]
    if not all(_is_int(part) for part in parts):
        return problem
    year, month, day = (int(part) for part in parts if isinstance(part, int))
    try:
        date(year, month, day)
    except (ValueError, OverflowError):
        return "not a real date"
    timezone_name = value.get("timezone")
    if timezone_name is not None and not isinstance(timezone_name, str):
        return "timezone must be a string"
    return None


def _check_tme(value: Any) -> str | None:
    return None if _parse_rfc3339(value) is not None else "not an RFC 3339 date-time"


def _check_phn(value: Any) -> str | None:
    problem = 'must be {"c": "61", "n": "401234567"} (digits) or {"phone": "..."}'
    if not isinstance(value, dict):
        return problem
    if "phone" in value:
        phone = value["phone"]
        flag = value.get("parse_with_country_code", False)
        if isinstance(phone, str) and phone.strip() and isinstance(flag, bool):
            return None
        return problem
    country, number = value.get("c"), value.get("n")
    if not (isinstance(number, str) and _PHONE_NUMBER.match(number)):
        return problem
    if country is not None and not (isinstance(country, str) and _PHONE_COUNTRY.match(country)):
        return problem
    return None


def _check_geo(value: Any) -> str | None:
    if not isinstance(value, dict) or not value.keys() <= {"name"}:
        return 'must be {"name": "Melbourne"}'
    return _check_str(value["name"]) if "name" in value else None


def _check_sst(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    return "must be a list of strings"


def _check_obj(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a JSON object"


_VALUE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "str": _check_str,
    "txt": _check_txt,
    "int": _check_int,
    "bol": _check_bol,
    "dtz": _check_dtz,
    "tme": _check_tme,
    "phn": _check_phn,
    "geo": _check_geo,
    "sst": _check_sst,
    "obj": _check_obj,
}


def _fault_outcome(fault: Fault, api_key: str | None) -> _Outcome:
    """The answer a fault gives instead of the normal one."""
    if fault.answer == "html":
        return _Outcome(fault.status, {}, raw=_HTML_PAGE, content_type="text/html")
    if fault.answer == "empty":
        return _Outcome(fault.status, {}, raw=b"", content_type="text/plain")
    if fault.answer == "echo_key":
        return _error(fault.status, f"the API key {api_key!r} is not allowed here")
    if fault.status == 429:
        return _Outcome(429, _rate_limit_body(fault.try_in_seconds))
    try:
        message = HTTPStatus(fault.status).phrase
    except ValueError:
        message = "Sandbox fault"
    return _error(fault.status, message)


def _rate_limit_body(try_in_seconds: int | None) -> dict[str, Any]:
    """Ortto's 429 body, with ``try-in-seconds`` when known."""
    inner: dict[str, Any] = {"code": "rate-limit", "message": "rate limit"}
    if try_in_seconds is not None:
        inner["try-in-seconds"] = try_in_seconds
    return {"error": inner}


def _error(status: int, message: str) -> _Outcome:
    """Ortto's error shape ``{"request_id", "code", "error"}``."""
    return _Outcome(status, {"request_id": str(uuid.uuid4()), "code": status, "error": message})


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response."""
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _seconds(value: float) -> str:
    """Format seconds for Retry-After (an integer when whole)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _deque() -> collections.deque[float]:
    """An empty deque of timestamps."""
    return collections.deque()


def _dict_or_empty(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _str_or_none(value: Any) -> str | None:
    """``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float and not a bool."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
