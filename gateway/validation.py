"""Parse, validate and normalise a browser's activity request into Ortto's shape.

Pure: no aiohttp, no I/O. The handler decodes the body with `decode_body` and the
relay calls `parse_request`, which raises `GatewayError` for a whole-request
problem and otherwise returns, per activity in order, either the normalised
activity or the refusal for it, so one bad activity does not sink a batch.

Never lose an activity over an optional part of it: a value Ortto would not take is
normalised when its meaning is plain (phone digits without spaces, `"1530"` for an
`int`) or else dropped, and each change is a warning for the browser's answer. A
whole activity is refused only for its identity (an activity id, a person identifier),
its size, or a named website-safety rule: person fields off the allowlist,
subscription fields. With strict mode (`GATEWAY_STRICT`, or `strict` per activity)
every drop is a 400 naming the field instead.

Everything a browser sends is untrusted. The gateway validates fully before
anything reaches Ortto, because Ortto bans an IP after 15 bad requests in 15 s
and behind one gateway that IP is every visitor's. The normalised activity is a
fresh dict holding only what was checked: `activity_id`, `fields` and
`attributes` (each omitted when empty), `location` (always present, `{}` unless
the browser gave a `custom` or `address` location) and `person_id` when given.
A browser's `created` and `location.source_ip` are dropped: enrichment sets the
accept time and the real client address. Its `key` is not forwarded either (each
activity gets a unique one) but kept aside as the activity's idempotency key.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Required, TypedDict

import orjson

from gateway.config import (
    ACTIVITY_ID_RE,
    FIELD_NAME_RE,
    ORTTO_MAX_ACTIVITIES,
    ORTTO_MAX_ACTIVITY_BYTES,
    ORTTO_MAX_ATTRIBUTES,
    SUBSCRIPTION_FIELDS,
    ActivitySpec,
    Settings,
)
from gateway.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.reasons import Reason

# A checked field or attribute value, by its name's type prefix: `str`, `txt`, `tme` and
# `geo`'s name as text; `int` (int64); `bol`; `sst` a list of text; `dtz`, `phn`, `geo` and
# `obj` objects (`obj` holds any JSON, bounded by `decode_body` and the size check).
FieldValue = str | int | bool | list[str] | dict[str, Any]


class Location(TypedDict, total=False):
    """An activity's `location`: the gateway's `source_ip`, or the browser's `custom`
    (`country_name`, `region_name`, `city_name`, `position_name`; `lat` and `lng` as
    numbers) or `address` (lines of text)."""

    source_ip: str
    custom: dict[str, str | float]
    address: dict[str, str]


class ActivityParts(TypedDict, total=False):
    """What an activity may carry besides its id, location, `created` and `key`: the
    person (`fields`, `person_id`), `attributes` and `merge_by`."""

    fields: dict[str, FieldValue]
    attributes: dict[str, FieldValue]
    person_id: str
    merge_by: list[str]


class ActivityBody(ActivityParts, total=False):
    """One activity as validation leaves it (the module docstring): only what was
    checked. Validation always sets `location` (`{}` when none was given)."""

    activity_id: Required[str]
    location: Location


class EnrichedActivity(ActivityParts):
    """One activity as it goes to Ortto: validated, then enriched (`enrich`)."""

    activity_id: str
    location: Location
    created: str
    key: str


# What was changed or dropped: `{"field", "reason": "dropped" | "normalised", "code",
# "message"}`; `code` is one of `reasons.WARNING_REASONS`.
FieldWarning = dict[str, str]

# Ortto's shape needs 5 levels (body, list, activity, attributes, an `obj` value);
# 32 leaves room for `obj` attributes while staying far under orjson's own 1024.
MAX_JSON_DEPTH = 32
# Ortto's `str` type: text up to 255 characters (also single selects and URLs).
MAX_STR_CHARS = 255
# Ortto's `txt` type: long text up to 4000 characters.
MAX_TXT_CHARS = 4000
# Ortto's `int` type is int64.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A multi-select is a short list of options; bounds the work per value.
MAX_SST_ITEMS = 100
# Ortto's `merge_by` takes at most three fields.
MAX_MERGE_BY = 3
# IANA zone names are at most about 30 characters; anything longer is not one.
MAX_TIMEZONE_CHARS = 64
# E.164: country calling codes have 1 to 3 digits, whole numbers at most 15.
MAX_PHONE_COUNTRY_DIGITS = 3
MAX_PHONE_NUMBER_DIGITS = 15
# An address is a handful of lines (street, city, region, postcode, country...).
MAX_ADDRESS_KEYS = 16
# Room for what enrichment adds after validation (`location.source_ip`, `created`,
# `key`: about 150 bytes), so the enriched activity stays within Ortto's 16 kB.
ENRICHMENT_RESERVE_BYTES = 256
MAX_ACTIVITY_BYTES = ORTTO_MAX_ACTIVITY_BYTES - ENRICHMENT_RESERVE_BYTES
# Longest piece of browser input echoed back in an error message.
MAX_ECHO_CHARS = 60
# Warnings per activity (and for the body) in an answer; past it, one counts the rest.
MAX_WARNINGS = 20

# JSON must be UTF-8 (RFC 8259); ASCII is a subset of it.
JSON_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})
# `text/plain` is what `navigator.sendBeacon` and preflight-free `fetch` send.
JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain", ""})

IDENTIFIER_FIELDS = frozenset({"str::email", "str::ei"})
# The website guide puts the person's email (and names) inside `attributes`.
MOVED_TO_FIELDS = ("str::email", "str::first", "str::last", "str::ei")
# Merging by a non-unique field (a name, a phone) could attach one browser's
# activity and person fields to somebody else, so only identifiers are allowed.
MERGE_BY_FIELDS = IDENTIFIER_FIELDS

BATCH_KEYS = frozenset({"activities", "async", "merge_by", "identity"})
ACTIVITY_KEYS = frozenset(
    {
        "activity_id",
        "fields",
        "attributes",
        "location",
        "created",
        "key",
        "person_id",
        "identity",
        "merge_by",
        "merge_strategy",
    }
)
LOCATION_KEYS = frozenset({"source_ip", "custom", "address"})
# Location keys a browser may not set: the gateway fills `source_ip` with the real client
# address (`ip` is what some clients send; Ortto took it in recorded answers).
CLIENT_SET_IP_KEYS = frozenset({"source_ip", "ip"})
CUSTOM_LOCATION_STRINGS = frozenset({"country_name", "region_name", "city_name", "position_name"})
CUSTOM_LOCATION_BOUNDS = {"lat": 90.0, "lng": 180.0}
# Other names public clients give the custom location's keys (Ortto answered 200 to
# them in recorded traffic), read as the documented ones.
CUSTOM_LOCATION_ALIASES = {
    "latitude": "lat",
    "longitude": "lng",
    "city": "city_name",
    "region": "region_name",
    "country": "country_name",
}

NO_IDENTIFIER = "no person identifier: give str::email, str::ei or person_id"

# One `@`, non-empty local and domain parts, no whitespace or control characters.
EMAIL_RE = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+")
# RFC 3339 as Go's time.RFC3339 (Ortto's parser) reads it: `T`, seconds, `Z` or an offset.
RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)
PHONE_COUNTRY_RE = re.compile(f"[0-9]{{1,{MAX_PHONE_COUNTRY_DIGITS}}}")
PHONE_NUMBER_RE = re.compile(f"[0-9]{{1,{MAX_PHONE_NUMBER_DIGITS}}}")
# What people type between a phone number's digits: spaces, dashes, dots, parentheses.
PHONE_SEPARATORS = str.maketrans("", "", " \t-.()/")
# A whole number sent as a string ("1530"), read as the `int` it means.
INT_TEXT_RE = re.compile(r"-?[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A request body: per activity in order the normalised activity or its refusal."""

    items: list[ActivityBody | GatewayError]
    async_: bool
    merge_by: list[str] | None
    tokens: list[str | None]  # per activity: its signed identity token, if any (never forwarded)
    warnings: list[list[FieldWarning]]  # per activity: what was normalised or dropped
    request_warnings: list[FieldWarning]  # the same for the body's own keys
    keys: list[str | None]  # per activity: the browser's `key`, its idempotency key


class Notes:
    """The warnings of one activity (or of the body); in strict mode a drop is a 400.

    At most `MAX_WARNINGS` are kept, then one that counts the rest: a body of thousands
    of unknown keys gets a short answer."""

    __slots__ = ("_items", "_more", "strict")

    def __init__(self, strict: bool) -> None:
        self._items: list[FieldWarning] = []
        self._more = 0
        self.strict = strict

    @property
    def items(self) -> list[FieldWarning]:
        """The warnings, the count of those past the bound last."""
        if not self._more:
            return self._items
        more = f"and {self._more} more parts left out or normalised"
        return [*self._items, warning("", "dropped", "more_warnings", more)]

    def _add(self, where: str, reason: str, code: Reason, message: str) -> None:
        if len(self._items) < MAX_WARNINGS:
            self._items.append(warning(where, reason, code, message))
        else:
            self._more += 1

    def drop(self, error: BadRequest) -> None:
        """Leave out the part `error` names, or refuse with it in strict mode."""
        if self.strict:
            raise error
        self._add(error.field or "", "dropped", error.reason, error.message)

    def normalised(self, where: str, message: str) -> None:
        self._add(where, "normalised", "normalised", message)

    def ignored(self, where: str, message: str, code: Reason) -> None:
        """A part never taken from the browser: left out in strict mode too."""
        self._add(where, "dropped", code, message)


def warning(field: str, reason: str, code: Reason, message: str) -> FieldWarning:
    """One warning: the field path, dropped or normalised, its reason code, a message."""
    return {"field": field, "reason": reason, "code": code, "message": message}


def decode_body(body: bytes, content_type: str, max_body_bytes: int) -> Any:
    """Decode a request body as JSON, refusing what Ortto's API would not take.

    `content_type` is the raw `Content-Type` header ("" when missing): JSON is
    accepted as `application/json`, `text/plain` (what `sendBeacon` and a
    preflight-free `fetch` send) or with no type at all (a `sendBeacon` Blob
    without one), with a UTF-8 charset if any. No NaN, Infinity or numbers
    that overflow a double (orjson refuses them), nesting at most MAX_JSON_DEPTH.
    """
    media_type, _, params = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"content type {_show(media_type)} is not supported: send application/json "
            "or text/plain"
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in JSON_CHARSETS:
                raise UnsupportedMediaType(f"charset {_show(charset)} is not supported: use utf-8")
    if len(body) > max_body_bytes:
        raise PayloadTooLarge(f"request body over {max_body_bytes} bytes")
    if not body or body.isspace():
        raise BadRequest("empty body: send a JSON object", reason="malformed_body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON: {exc.msg} at byte {exc.pos}", reason="malformed_body"
        ) from None
    # Nesting needs an open bracket per level: with few in the body, skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(data, MAX_JSON_DEPTH):
        raise BadRequest(
            f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels", reason="malformed_body"
        )
    return data


def is_batch(data: Any) -> bool:
    """Whether a decoded body is Ortto's `{"activities": [...]}` rather than one bare activity."""
    return isinstance(data, dict) and "activities" in data


def parse_request(data: Any, settings: Settings) -> ParsedRequest:
    """Validate a decoded body (Ortto's request, or one bare activity) and normalise it.

    Raises `GatewayError` for a problem with the request as a whole; a problem with
    one activity becomes that activity's entry in `items`.
    """
    if not isinstance(data, dict):
        raise BadRequest(
            f"body must be a JSON object with activities or activity_id, got {_kind(data)}"
        )
    if "activities" not in data:
        if "activity_id" not in data:
            raise BadRequest(
                'body must be {"activities": [...]} or one activity with activity_id',
                reason="malformed_body",
            )
        item, notes, key = _item(data, settings)
        return ParsedRequest([item], False, None, [_token(data, None)], [notes], [], [key])

    body_notes = Notes(settings.strict)
    for unknown in _unknowns(data, BATCH_KEYS):
        body_notes.drop(
            BadRequest(
                f"unknown key {unknown} in the request body", field=unknown, reason="unknown_key"
            )
        )
    activities = data["activities"]
    if not isinstance(activities, list):
        raise BadRequest(f"activities must be a list, got {_kind(activities)}", field="activities")
    if not activities:
        raise BadRequest("activities must not be empty", field="activities")
    if len(activities) > ORTTO_MAX_ACTIVITIES:
        raise BadRequest(
            f"at most {ORTTO_MAX_ACTIVITIES} activities per request, got {len(activities)}",
            field="activities",
        )
    async_ = data.get("async")
    if async_ is None:
        async_ = False
    elif not isinstance(async_, bool):
        raise BadRequest(f"async must be true or false, got {_kind(async_)}", field="async")
    merge_by: list[str] | None = None
    try:
        merge_by = _merge_by(data.get("merge_by"))
    except BadRequest as exc:
        body_notes.drop(exc)
    shared = _token(data, None)
    parsed = [_item(a, settings) for a in activities]
    return ParsedRequest(
        [item for item, _, _ in parsed],
        async_,
        merge_by,
        [_token(a, shared) for a in activities],
        [notes for _, notes, _ in parsed],
        body_notes.items,
        [key for _, _, key in parsed],
    )


def _token(raw: Any, default: str | None) -> str | None:
    """The `identity` token of a body or an activity; a non-string one counts as absent."""
    token = raw.get("identity") if isinstance(raw, dict) else None
    return token if isinstance(token, str) else default


def first_error(parsed: ParsedRequest) -> GatewayError | None:
    """The error to answer with when every activity was refused, else None.

    The first refusal that is not `NotFound` wins (a 400 explains a mistake the
    caller can fix); only when every activity is unknown or not enabled is the
    answer the first item's 404, as Ortto's website path answers.
    """
    errors = [item for item in parsed.items if isinstance(item, GatewayError)]
    if len(errors) < len(parsed.items) or not errors:
        return None
    for error in errors:
        if not isinstance(error, NotFound):
            return error
    return errors[0]


# -- whole request


def _merge_by(value: Any, where: str = "merge_by") -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list, got {_kind(value)}", field=where)
    if len(value) > MAX_MERGE_BY:
        raise BadRequest(f"{where} takes at most {MAX_MERGE_BY} fields", field=where)
    for name in value:
        if not isinstance(name, str) or name not in MERGE_BY_FIELDS:
            allowed = " or ".join(sorted(MERGE_BY_FIELDS))
            raise BadRequest(
                f"{where} field {_show(name)} is not allowed: use {allowed}", field=where
            )
    if len(set(value)) != len(value):
        raise BadRequest(f"{where} lists a field twice", field=where)
    return list(value) or None


# -- one activity


def _item(
    raw: Any, settings: Settings
) -> tuple[ActivityBody | GatewayError, list[FieldWarning], str | None]:
    notes = Notes(settings.strict)
    try:
        activity = _activity(raw, settings, notes)
    except GatewayError as exc:
        return exc, [], None
    key = raw.get("key")
    if key is not None:
        try:
            key = _browser_key(key)
        except BadRequest as exc:  # never forwarded anyway: left out in strict mode too
            notes.ignored("key", exc.message, "invalid_field")
            key = None
    return activity, notes.items, key


def _browser_key(value: Any) -> str:
    """The browser's `key` (Ortto's idempotency key), as text; a whole number is read as
    its digits, as Ortto's examples write keys."""
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_STR_CHARS:
        raise BadRequest(
            f"key must be a non-empty string of at most {MAX_STR_CHARS} characters", field="key"
        )
    return value


def _activity(raw: Any, settings: Settings, notes: Notes) -> ActivityBody:
    if not isinstance(raw, dict):
        raise BadRequest(f"an activity must be a JSON object, got {_kind(raw)}")
    activity_id = raw.get("activity_id")
    if activity_id is None:
        raise BadRequest("activity_id is required", field="activity_id")
    if not isinstance(activity_id, str):
        raise BadRequest(
            f"activity_id must be a string, got {_kind(activity_id)}", field="activity_id"
        )
    spec = settings.activities.get(activity_id)
    if spec is None:
        shown = _show(activity_id, quote=not ACTIVITY_ID_RE.fullmatch(activity_id))
        raise NotFound(f"activity {shown} is not enabled", field="activity_id")
    notes.strict = settings.is_strict(spec)
    for unknown in _unknowns(raw, ACTIVITY_KEYS):
        notes.drop(
            BadRequest(
                f"unknown key {unknown} in the activity", field=unknown, reason="unknown_key"
            )
        )
    if "created" in raw:
        notes.ignored(
            "created",
            "created is set by the gateway: when it accepted the activity",
            "set_by_gateway",
        )

    fields = _optional_object(raw.get("fields"), "fields", notes)
    attributes = _optional_object(raw.get("attributes"), "attributes", notes)
    if any(name in attributes for name in MOVED_TO_FIELDS):
        fields, attributes = _move_person_fields(fields, attributes)

    allowed = settings.allowed_person_fields(spec)
    out_fields: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in allowed and name != "str::ei":
            # A website-safety rule: a page sets only the person fields the site allows.
            raise BadRequest(
                f"person field {_show(name, quote=False)} is not allowed from the browser",
                field=f"fields.{_show(name, quote=False)}",
            )
        try:
            out_fields[name] = _value(name, value, "fields", notes)
        except BadRequest as exc:
            if name in IDENTIFIER_FIELDS:
                out_fields[name] = exc  # dropped below, unless it is the only identifier
            else:
                notes.drop(exc)
    identity_errors = _identifiers(out_fields)
    person_id = _person_id(raw.get("person_id"))
    if "str::email" not in out_fields and "str::ei" not in out_fields and person_id is None:
        raise identity_errors[0] if identity_errors else BadRequest(NO_IDENTIFIER, field="fields")
    for error in identity_errors:
        notes.drop(error)

    out_attributes = _attributes(attributes, spec, activity_id, notes)

    out: ActivityBody = {"activity_id": activity_id}
    if out_fields:
        out["fields"] = out_fields
    if out_attributes:
        out["attributes"] = out_attributes
    out["location"] = _location(raw.get("location"), notes)
    if person_id is not None:
        out["person_id"] = person_id
    if raw.get("merge_by") is not None:
        try:
            out["merge_by"] = _activity_merge_by(raw["merge_by"])
        except BadRequest as exc:
            notes.drop(exc)
    if "merge_strategy" in raw:
        # How existing people's fields merge is the site owner's choice, not a page's.
        notes.drop(
            BadRequest(
                "merge_strategy is not taken from the browser: Ortto's default applies",
                field="merge_strategy",
                reason="set_by_gateway",
            )
        )

    try:
        size = len(orjson.dumps(out))
    except orjson.JSONEncodeError as exc:  # only reachable for input not decoded from JSON
        raise BadRequest(f"activity cannot be encoded as JSON: {exc}") from None
    if size > MAX_ACTIVITY_BYTES:
        raise BadRequest(
            f"activity is {size} bytes as JSON, over the {MAX_ACTIVITY_BYTES}-byte limit"
        )
    return out


def _identifiers(out_fields: dict[str, Any]) -> list[BadRequest]:
    """Normalise the email and external id in `out_fields`; remove and return the bad ones.

    A value that failed its type check is there as its error."""
    errors: list[BadRequest] = []
    for name in ("str::email", "str::ei"):
        value = out_fields.get(name)
        if value is None:
            continue
        try:
            if isinstance(value, BadRequest):
                raise value
            out_fields[name] = _email(value) if name == "str::email" else _external_id(value)
        except BadRequest as exc:
            del out_fields[name]
            errors.append(exc)
    return errors


def _external_id(value: str) -> str:
    external_id = value.strip()
    if not external_id:
        raise BadRequest("fields.str::ei must not be blank", field="fields.str::ei")
    return external_id


def _attributes(
    attributes: dict[str, Any], spec: ActivitySpec, activity_id: str, notes: Notes
) -> dict[str, FieldValue]:
    out: dict[str, FieldValue] = {}
    for name, value in attributes.items():
        if not isinstance(name, str) or not FIELD_NAME_RE.fullmatch(name):
            notes.drop(
                BadRequest(
                    f"attribute name {_show(name)} is not a field name such as str:cm:plan",
                    field=f"attributes.{_show(name, quote=False)}",
                )
            )
            continue
        if name in SUBSCRIPTION_FIELDS:
            # A website-safety rule: never a real activity attribute, refused so it cannot
            # reach a subscription.
            raise BadRequest(
                f"attribute {name} is not allowed from the browser", field=f"attributes.{name}"
            )
        if spec.attributes is not None and name not in spec.attributes:
            notes.drop(
                BadRequest(
                    f"attribute {name} is not declared for {activity_id}",
                    field=f"attributes.{name}",
                    reason="not_declared",
                )
            )
            continue
        if len(out) == ORTTO_MAX_ATTRIBUTES:
            notes.drop(
                BadRequest(
                    f"attribute {name} is over Ortto's {ORTTO_MAX_ATTRIBUTES} per activity",
                    field=f"attributes.{name}",
                )
            )
            continue
        try:
            out[name] = _value(name, value, "attributes", notes)
        except BadRequest as exc:
            notes.drop(exc)
    return out


def merge_by_problem(activity: ActivityParts, merge_by: list[str]) -> str | None:
    """Why a browser's `merge_by` may not go to Ortto with this activity, or None.

    Ortto finds the person by the first `merge_by` field it can and then sets the others:
    merging by `str::ei` while setting `str::email` would let a page put its email on the
    record of whoever has that external id. So the first field must be the identifier the
    activity is counted under (and signed for): its email, else its external id; and none
    with a `person_id`, which names the record itself.
    """
    if activity.get("person_id") is not None:
        return "merge_by is not used with a person_id: the id names the record"
    fields = activity.get("fields") or {}
    first = "str::email" if "str::email" in fields else "str::ei"
    if merge_by[0] != first:
        return (
            f"merge_by must start with {first}, the activity's identifier, so that no other "
            "field can choose whose record it changes"
        )
    missing = [name for name in merge_by if name not in fields]
    if missing:
        return f"merge_by names {missing[0]}, which the activity does not set"
    return None


def _activity_merge_by(value: Any) -> list[str]:
    merge_by = _merge_by(value, "merge_by")
    if merge_by is None:
        raise BadRequest("merge_by must name at least one field", field="merge_by")
    return merge_by


def _move_person_fields(
    fields: dict[str, Any], attributes: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move person fields the website guide puts in `attributes` into `fields`."""
    fields = dict(fields)
    attributes = dict(attributes)
    for name in MOVED_TO_FIELDS:
        if name not in attributes:
            continue
        value = attributes.pop(name)
        if name in fields and not _same(name, fields[name], value):
            raise BadRequest(
                f"{name} differs between fields and attributes", field=f"fields.{name}"
            )
        fields.setdefault(name, value)
    return fields, attributes


def _same(name: str, a: Any, b: Any) -> bool:
    """Whether two values of a field are one, as the person key sees them."""
    if isinstance(a, str) and isinstance(b, str) and name in IDENTIFIER_FIELDS:
        if name == "str::email":  # the person key folds an email's case
            return a.strip().lower() == b.strip().lower()
        return a.strip() == b.strip()
    return bool(type(a) is type(b) and a == b)


def _email(value: str) -> str:
    email = value.strip()
    if len(email) > MAX_STR_CHARS or not EMAIL_RE.fullmatch(email):
        raise BadRequest(
            "fields.str::email must be an email address such as name@example.com",
            field="fields.str::email",
        )
    return email


def _person_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_STR_CHARS:
        raise BadRequest(
            f"person_id must be a non-empty string of at most {MAX_STR_CHARS} characters",
            field="person_id",
        )
    return value.strip()


def _location(value: Any, notes: Notes) -> Location:
    """Keep a `custom` or `address` location; drop a browser's `source_ip` (never trusted)."""
    location = _optional_object(value, "location", notes)
    out: Location = {}
    for key in location:
        if key in CLIENT_SET_IP_KEYS:
            notes.ignored(
                f"location.{key}",
                "the gateway sets location.source_ip to the client's address",
                "set_by_gateway",
            )
        elif key not in LOCATION_KEYS:
            where = f"location.{_show(key, quote=False)}"
            notes.drop(
                BadRequest(
                    f"unknown key {_show(key)} in location", field=where, reason="unknown_key"
                )
            )
    custom = _optional_object(location.get("custom"), "location.custom", notes)
    if custom:
        checked = _custom_location(custom, notes)
        if checked:
            out["custom"] = checked
    address = _optional_object(location.get("address"), "location.address", notes)
    if address:
        try:
            out["address"] = _address(address)
        except BadRequest as exc:
            notes.drop(exc)
    return out


def _custom_location(custom: dict[str, Any], notes: Notes) -> dict[str, str | float]:
    out: dict[str, str | float] = {}
    for given, value in custom.items():
        key = CUSTOM_LOCATION_ALIASES.get(given, given)
        where = f"location.custom.{_show(given, quote=False)}"
        try:
            if key in out:
                raise BadRequest(f"{where} repeats location.custom.{key}", field=where)
            if key in CUSTOM_LOCATION_STRINGS:
                out[key] = _string(value, MAX_STR_CHARS, where)
            elif key in CUSTOM_LOCATION_BOUNDS:
                out[key] = _coordinate(value, CUSTOM_LOCATION_BOUNDS[key], where)
            else:
                raise BadRequest(
                    f"unknown key {_show(given)} in location.custom",
                    field=where,
                    reason="unknown_key",
                )
        except BadRequest as exc:
            notes.drop(exc)
            continue
        if key != given:
            notes.normalised(where, f"{where} is sent as location.custom.{key}")
    if ("lat" in out) != ("lng" in out):
        notes.drop(BadRequest("location.custom needs both lat and lng", field="location.custom"))
        out.pop("lat", None)
        out.pop("lng", None)
    return out


def _coordinate(value: Any, bound: float, where: str) -> float:
    if isinstance(value, str):  # "-37.81": a number as text, as form fields give it
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or (isinstance(value, float) and not math.isfinite(value))
        or not -bound <= value <= bound
    ):
        raise BadRequest(f"{where} must be a number from {-bound:g} to {bound:g}", field=where)
    return value


def _address(address: dict[str, Any]) -> dict[str, str]:
    if len(address) > MAX_ADDRESS_KEYS:
        raise BadRequest(
            f"location.address has more than {MAX_ADDRESS_KEYS} keys", field="location.address"
        )
    return {
        key: _string(value, MAX_STR_CHARS, f"location.address.{_show(key, quote=False)}")
        for key, value in address.items()
    }


# -- values, by the type prefix of the field name


def _value(name: Any, value: Any, section: str, notes: Notes) -> FieldValue:
    """The checked value of field `name` in `section` ("fields" or "attributes"),
    normalised to Ortto's form where its meaning is plain (noted in `notes`)."""
    prefix = name[:3] if isinstance(name, str) else None
    # The common valid scalars first, before any error text is built (profiled: the
    # eager `where` strings cost more than the checks).
    if type(value) is str:
        if (prefix == "str" and len(value) <= MAX_STR_CHARS) or (
            prefix == "txt" and len(value) <= MAX_TXT_CHARS
        ):
            return value
    elif type(value) is int:
        if prefix == "int" and INT64_MIN <= value <= INT64_MAX:
            return value
    elif type(value) is bool and prefix == "bol":
        return value
    where = f"{section}.{_show(name, quote=False)}"
    check = _VALUE_CHECKS.get(prefix) if prefix is not None else None
    if check is None:
        raise BadRequest(f"{where} has no known type prefix such as str: or int:", field=where)
    if value is None:
        raise BadRequest(f"{where} must not be null (leave it out instead)", field=where)
    out = check(value, where)
    if type(out) is not type(value) or out != value:
        notes.normalised(where, f"{where} is sent in Ortto's form for its type")
    return out


def _str(value: Any, where: str) -> str:
    return _string(value, MAX_STR_CHARS, where)


def _txt(value: Any, where: str) -> str:
    return _string(value, MAX_TXT_CHARS, where)


def _int(value: Any, where: str) -> int:
    # Decimals and currencies travel as int x 1000, so a fraction is a mistake: refused.
    # A whole number as text ("1530") or as 1530.0 means that number.
    if type(value) is float and value.is_integer():
        value = int(value)
    elif type(value) is str and INT_TEXT_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if type(value) is not int:
        raise BadRequest(
            f"{where} must be a whole number (decimals are sent as int x 1000), got {_kind(value)}",
            field=where,
        )
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest(f"{where} is outside the int64 range", field=where)
    return value


def _bol(value: Any, where: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise BadRequest(f"{where} must be true or false, got {_kind(value)}", field=where)
    return value


def _dtz(value: Any, where: str) -> dict[str, int | str]:
    if not isinstance(value, dict):
        raise BadRequest(
            f'{where} must be a date object {{"year", "month", "day", "timezone"}}, '
            f"got {_kind(value)}",
            field=where,
        )
    unknown = _unknown(value, frozenset({"year", "month", "day", "timezone"}))
    if unknown is not None:
        raise BadRequest(f"unknown key {unknown} in {where}", field=where)
    year, month, day = value.get("year"), value.get("month"), value.get("day")
    if not (
        type(year) is int
        and type(month) is int
        and type(day) is int
        and _real_date(year, month, day)
    ):
        raise BadRequest(
            f"{where} must have integer year, month and day forming a real date", field=where
        )
    out: dict[str, int | str] = {"year": year, "month": month, "day": day}
    if "timezone" in value:
        out["timezone"] = _string(value["timezone"], MAX_TIMEZONE_CHARS, f"{where}.timezone")
    return out


def _real_date(year: int, month: int, day: int) -> bool:
    try:
        date(year, month, day)
    except (ValueError, OverflowError):
        return False
    return True


def _tme(value: Any, where: str) -> str:
    if isinstance(value, str) and RFC3339_RE.fullmatch(value):
        try:
            datetime.fromisoformat(value)  # ranges: month 13, hour 25, Feb 30, second 60
        except ValueError:
            pass
        else:
            return value
    raise BadRequest(
        f"{where} must be an RFC 3339 date-time such as 2020-02-17T01:30:17.601Z", field=where
    )


def _phn(value: Any, where: str) -> dict[str, str | bool]:
    """`{"c", "n"}` (`c` may be left out) in digits, separators removed; a number given
    with a leading `+` becomes `{"phone", "parse_with_country_code": true}`; or
    `{"phone", "parse_with_country_code"?}` as given."""
    if isinstance(value, dict) and "phone" not in value and value.keys() <= {"c", "n"}:
        c, n = value.get("c", ""), value.get("n")
        if isinstance(c, str) and isinstance(n, str):
            c = c.translate(PHONE_SEPARATORS).removeprefix("+")
            digits = n.translate(PHONE_SEPARATORS)
            if not digits and not c:
                raise BadRequest(f"{where} is blank", field=where)
            if digits.startswith("+") and not c and PHONE_NUMBER_RE.fullmatch(digits[1:]):
                return {"phone": digits, "parse_with_country_code": True}
            if (not c or PHONE_COUNTRY_RE.fullmatch(c)) and PHONE_NUMBER_RE.fullmatch(digits):
                return {"c": c, "n": digits} if c else {"n": digits}
    elif isinstance(value, dict) and "phone" in value:
        unknown = _unknown(value, frozenset({"phone", "parse_with_country_code"}))
        if unknown is not None:
            raise BadRequest(f"unknown key {unknown} in {where}", field=where)
        phone = _string(value["phone"], MAX_STR_CHARS, f"{where}.phone")
        if not phone.strip():
            raise BadRequest(f"{where} is blank", field=where)
        out: dict[str, str | bool] = {"phone": phone}
        if "parse_with_country_code" in value:
            out["parse_with_country_code"] = _bol(
                value["parse_with_country_code"], f"{where}.parse_with_country_code"
            )
        return out
    raise BadRequest(
        f'{where} must be {{"c": "61", "n": "401234567"}} (digits) '
        f'or {{"phone": "...", "parse_with_country_code": true}}',
        field=where,
    )


def _geo(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or value.keys() != {"name"}:
        raise BadRequest(f'{where} must be {{"name": "Melbourne"}}', field=where)
    name = _string(value["name"], MAX_STR_CHARS, f"{where}.name")
    if not name.strip():
        raise BadRequest(f"{where} is blank", field=where)
    return {"name": name}


def _sst(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SST_ITEMS:
        raise BadRequest(f"{where} must be a list of at most {MAX_SST_ITEMS} strings", field=where)
    return [_string(item, MAX_STR_CHARS, where) for item in value]


def _obj(value: Any, where: str) -> dict[str, Any]:
    # Depth is bounded by decode_body; encodability and size by the activity check.
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, got {_kind(value)}", field=where)
    return value


_VALUE_CHECKS: dict[str, Callable[[Any, str], FieldValue]] = {
    "str": _str,
    "txt": _txt,
    "int": _int,
    "bol": _bol,
    "dtz": _dtz,
    "tme": _tme,
    "phn": _phn,
    "geo": _geo,
    "sst": _sst,
    "obj": _obj,
}


# -- helpers


def _string(value: Any, max_chars: int, where: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string, got {_kind(value)}", field=where)
    if len(value) > max_chars:
        raise BadRequest(
            f"{where} is {len(value)} characters, over the limit of {max_chars}", field=where
        )
    return value


def _optional_object(value: Any, where: str, notes: Notes) -> dict[str, Any]:
    """An optional object member: absent or null reads as empty, another type is dropped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        notes.drop(BadRequest(f"{where} must be an object, got {_kind(value)}", field=where))
        return {}
    return value


def _unknowns(obj: dict[Any, Any], known: frozenset[str]) -> list[str]:
    """The keys (sorted, shown) that are not known."""
    if obj.keys() <= known:  # the usual case, in C
        return []
    return sorted(_show(key, quote=False) for key in obj if key not in known)


def _unknown(obj: dict[Any, Any], known: frozenset[str]) -> str | None:
    """The first key (sorted, shown) that is not known, or None."""
    if obj.keys() <= known:  # the usual case, in C
        return None
    extra = [key for key in obj if key not in known]
    if not extra:
        return None
    return _show(min(extra, key=str), quote=False)


def _too_deep(value: Any, limit: int) -> bool:
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _kind(value: Any) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any, *, quote: bool = True) -> str:
    """Browser input for an error message: shortened, and quoted unless asked not to."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + "..."
    return repr(text) if quote else text
