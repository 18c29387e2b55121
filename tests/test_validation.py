"""Validation: Ortto's documented bodies pass, everything else is refused with the field named."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import (
    ORTTO_MAX_ACTIVITIES,
    ORTTO_MAX_ACTIVITY_BYTES,
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
from gateway.identity import person_key
from gateway.validation import (
    MAX_ACTIVITY_BYTES,
    MAX_JSON_DEPTH,
    MAX_WARNINGS,
    ActivityBody,
    ParsedRequest,
    decode_body,
    first_error,
    is_batch,
    parse_request,
)

EXAMPLES = Path("/work/shared/ortto-examples")
if not EXAMPLES.is_dir():  # a copy may live beside the tests in other checkouts
    EXAMPLES = Path(__file__).parent / "ortto-examples"
ENABLED = ("act:cm:logged-in", "act:cm:flight-booked", "act:cm:login")
# Strict: the refusals below are what strict mode answers; the default drops and warns.
SETTINGS = Settings(activities={a: ActivitySpec(a) for a in ENABLED}, strict=True)
LENIENT = Settings(activities={a: ActivitySpec(a) for a in ENABLED})
LIMIT = 64 * 1024
JSON = "application/json"
EMAIL = "chris.smith@example.com"


def example(name: str) -> Any:
    return orjson.loads((EXAMPLES / name).read_bytes())


def good() -> dict[str, Any]:
    """A valid activity to break one piece at a time."""
    return {
        "activity_id": "act:cm:logged-in",
        "fields": {"str::email": EMAIL, "str::first": "Chris"},
        "attributes": {"str:cm:payment-plan": "starter", "int::v": 1530},
    }


def parse_one(activity: Any, s: Settings = SETTINGS) -> ActivityBody | GatewayError:
    parsed = parse_request({"activities": [activity]}, s)
    assert len(parsed.items) == 1
    return parsed.items[0]


def accepted(parsed: ParsedRequest) -> list[ActivityBody]:
    assert all(not isinstance(item, GatewayError) for item in parsed.items), parsed.items
    return [item for item in parsed.items if not isinstance(item, GatewayError)]


# -- Ortto's documented examples


@pytest.mark.parametrize(
    "name",
    [
        "01-single.json",
        "02-two-at-once.json",
        "03-async.json",
        "04-backdated.json",
        "06-api-reference.json",
    ],
)
def test_documented_bodies_parse(name: str) -> None:
    body = (EXAMPLES / name).read_bytes()
    data = decode_body(body, "application/json", LIMIT)
    parsed = parse_request(data, SETTINGS)
    activities = accepted(parsed)
    assert len(activities) == len(data["activities"])
    for out, raw in zip(activities, data["activities"], strict=True):
        assert out["activity_id"] == raw["activity_id"]
        assert out["fields"] == raw["fields"]
        assert "created" not in out and "key" not in out
        assert "source_ip" not in out["location"]
        assert set(out) <= {"activity_id", "fields", "attributes", "location", "person_id"}
        assert len(orjson.dumps(out)) <= MAX_ACTIVITY_BYTES


def test_single_example_normalised_exactly() -> None:
    parsed = parse_request(example("01-single.json"), SETTINGS)
    assert parsed.async_ is False and parsed.merge_by is None
    assert parsed.items == [
        {
            "activity_id": "act:cm:logged-in",
            "fields": {"str::first": "Chris", "str::last": "Smith", "str::email": EMAIL},
            "attributes": {
                "str:cm:payment-plan": "$100 starter plan",
                "bol:cm:account-owner": True,
                "str:cm:web-browser": "Google Chrome",
                "int::v": 1530,
            },
            "location": {},
        }
    ]


def test_two_at_once_keeps_custom_location_and_moves_email() -> None:
    second = accepted(parse_request(example("02-two-at-once.json"), SETTINGS))[1]
    assert "str::email" not in second["attributes"]
    assert second["fields"]["str::email"] == EMAIL
    assert second["location"] == {
        "custom": {
            "country_name": "USA",
            "region_name": "NY",
            "city_name": "New York",
            "position_name": "Vandalay Industries",
            "lat": 40.730610,
            "lng": -73.935242,
        }
    }


def test_async_and_merge_by_and_null_locations() -> None:
    assert parse_request(example("03-async.json"), SETTINGS).async_ is True
    parsed = parse_request(example("06-api-reference.json"), SETTINGS)
    assert parsed.merge_by == ["str::email"]
    assert accepted(parsed)[0]["location"] == {}  # source_ip dropped, null custom/address too


def test_backdated_created_and_key_are_dropped() -> None:
    out = accepted(parse_request(example("04-backdated.json"), SETTINGS))[0]
    assert "created" not in out and "key" not in out


def test_subscription_fields_refused_with_the_field_named() -> None:
    item = parse_request(example("05-subscription.json"), SETTINGS).items[0]
    assert isinstance(item, BadRequest)
    assert item.field == "fields.bol::p"
    assert item.message == "person field bol::p is not allowed from the browser"


def test_website_snippet_activity_is_normalised() -> None:
    html = (EXAMPLES / "website-snippet.html").read_text()
    match = re.search(r"ap3c\.activity\((\{.*?\})\);", html, re.DOTALL)
    assert match is not None
    data = orjson.loads(match[1])
    assert not is_batch(data)
    parsed = parse_request(data, SETTINGS)
    assert parsed.items == [
        {
            "activity_id": "act:cm:login",
            "fields": {"str::email": "john.apple@example.com"},
            "attributes": {
                "str:cm:payment-plan": "$100 starter plan",
                "bol:cm:account-owner": True,
                "str:cm:web-browser": "Google Chrome",
            },
            "location": {},
        }
    ]


# -- decode_body


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "text/plain;charset=UTF-8",
        'text/plain; charset="utf-8"',
        "",
    ],
)
def test_decode_accepts_json_plain_and_missing_types(content_type: str) -> None:
    assert decode_body(b'{"a": [1, 2.5, "x"]}', content_type, LIMIT) == {"a": [1, 2.5, "x"]}


@pytest.mark.parametrize(
    ("body", "content_type", "error", "fragment"),
    [
        (b"{}", "application/x-www-form-urlencoded", UnsupportedMediaType, "content type"),
        (b"{}", "multipart/form-data; boundary=x", UnsupportedMediaType, "content type"),
        (b"{}", "application/octet-stream", UnsupportedMediaType, "content type"),
        (b"{}", "text/plain; charset=iso-8859-1", UnsupportedMediaType, "charset"),
        (b"", JSON, BadRequest, "empty body"),
        (b" \r\n\t", JSON, BadRequest, "empty body"),
        (b"{" + b" " * LIMIT + b"}", JSON, PayloadTooLarge, "over"),
        (b'{"activities": [', JSON, BadRequest, "malformed JSON"),
        (b"{'a': 1}", JSON, BadRequest, "malformed JSON"),
        (b'{"a": 1,}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": NaN}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": Infinity}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": -Infinity}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": 1e400}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": "\xff\xfe"}', JSON, BadRequest, "malformed JSON"),
        (b'{"a": "\\ud800"}', JSON, BadRequest, "malformed JSON"),
        (b"\xef\xbb\xbf{}", JSON, BadRequest, "malformed JSON"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), JSON, BadRequest, "deeper"),
        (b"[" * 2000 + b"]" * 2000, JSON, BadRequest, "malformed JSON"),
    ],
)
def test_decode_refusals(
    body: bytes, content_type: str, error: type[GatewayError], fragment: str
) -> None:
    with pytest.raises(error) as info:
        decode_body(body, content_type, LIMIT)
    assert type(info.value) is error
    assert fragment in info.value.message


def test_decode_depth_limit_is_inclusive() -> None:
    deepest = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_body(deepest, JSON, LIMIT) is not None


# -- whole-request refusals


@pytest.mark.parametrize(
    ("data", "fragment", "field"),
    [
        ([good()], "body must be a JSON object", None),
        ("hello", "body must be a JSON object", None),
        (None, "body must be a JSON object", None),
        ({"v": 0, "email": EMAIL}, "one activity with activity_id", None),
        ({"activities": [good()], "api_key": "x"}, "unknown key api_key", "api_key"),
        ({"activities": [good()], "activity_id": "act:cm:login"}, "unknown key", "activity_id"),
        ({"activities": good()}, "activities must be a list", "activities"),
        ({"activities": []}, "must not be empty", "activities"),
        ({"activities": [good()] * (ORTTO_MAX_ACTIVITIES + 1)}, "at most 100", "activities"),
        ({"activities": [good()], "async": "yes"}, "async must be true or false", "async"),
        ({"activities": [good()], "async": 1}, "async must be true or false", "async"),
        ({"activities": [good()], "merge_by": "str::email"}, "must be a list", "merge_by"),
        ({"activities": [good()], "merge_by": ["str::first"]}, "not allowed", "merge_by"),
        ({"activities": [good()], "merge_by": [1]}, "not allowed", "merge_by"),
        (
            {"activities": [good()], "merge_by": ["str::email", "str::email"]},
            "twice",
            "merge_by",
        ),
        (
            {"activities": [good()], "merge_by": ["str::email", "str::ei", "str::ei", "str::ei"]},
            "at most 3",
            "merge_by",
        ),
    ],
)
def test_whole_request_refusals(data: Any, fragment: str, field: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(data, SETTINGS)
    assert fragment in info.value.message
    assert info.value.field == field


def test_exactly_max_activities_pass() -> None:
    parsed = parse_request({"activities": [good()] * ORTTO_MAX_ACTIVITIES}, SETTINGS)
    assert len(accepted(parsed)) == ORTTO_MAX_ACTIVITIES


def test_merge_by_and_async_may_be_null_or_empty() -> None:
    parsed = parse_request({"activities": [good()], "async": None, "merge_by": []}, SETTINGS)
    assert parsed.async_ is False and parsed.merge_by is None
    parsed = parse_request(
        {"activities": [good()], "merge_by": ["str::ei", "str::email"]}, SETTINGS
    )
    assert parsed.merge_by == ["str::ei", "str::email"]


# -- per-activity refusals


def with_(path: str, value: Any) -> dict[str, Any]:
    """`good()` with `a/b/c` set to value (DELETE removes it)."""
    activity = good()
    *parents, last = path.split("/")
    node = activity
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return activity


DELETE = object()
LONG_TXT = "x" * 4000


def big_activity() -> dict[str, Any]:
    activity = good()
    activity["attributes"] = {f"txt:cm:t{i}": LONG_TXT for i in range(4)}
    return activity


@pytest.mark.parametrize(
    ("activity", "error", "field"),
    [
        ("not an object", BadRequest, None),
        ([good()], BadRequest, None),
        (with_("created_at", "now"), BadRequest, "created_at"),
        (with_("X-Api-Key", "secret"), BadRequest, "X-Api-Key"),
        (with_("activity_id", DELETE), BadRequest, "activity_id"),
        (with_("activity_id", 7), BadRequest, "activity_id"),
        (with_("activity_id", "act:cm:unknown"), NotFound, "activity_id"),
        (with_("activity_id", "x" * 5000), NotFound, "activity_id"),
        (with_("fields", ["str::email"]), BadRequest, "fields"),
        (with_("attributes", "plan"), BadRequest, "attributes"),
        # identifiers
        (with_("fields", {"str::first": "Chris"}), BadRequest, "fields"),
        (with_("fields/str::email", "chris"), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "a@b@c"), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "@example.com"), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "chris@"), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "chris smith@example.com"), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "   "), BadRequest, "fields.str::email"),
        (with_("fields/str::email", "a@" + "b" * 254), BadRequest, "fields.str::email"),
        (with_("fields/str::email", 42), BadRequest, "fields.str::email"),
        (with_("fields/str::email", None), BadRequest, "fields.str::email"),
        (with_("fields/str::ei", " "), BadRequest, "fields.str::ei"),
        (with_("person_id", ""), BadRequest, "person_id"),
        (with_("person_id", 12345), BadRequest, "person_id"),
        (with_("person_id", "p" * 256), BadRequest, "person_id"),
        # person fields
        (with_("fields/bol::p", False), BadRequest, "fields.bol::p"),
        (with_("fields/str::u-ctx", "x"), BadRequest, "fields.str::u-ctx"),
        (with_("fields/phn::phone", {"c": "61", "n": "4"}), BadRequest, "fields.phn::phone"),
        (with_("attributes/str::email", "other@example.com"), BadRequest, "fields.str::email"),
        (with_("attributes/str::first", "Alex"), BadRequest, "fields.str::first"),
        # attributes
        (with_("attributes/plan", "x"), BadRequest, "attributes.plan"),
        (with_("attributes/Str:cm:plan", "x"), BadRequest, "attributes.Str:cm:plan"),
        (with_("attributes/str:cm:plan\n", "x"), BadRequest, "attributes.str:cm:plan\n"),
        (with_("attributes/bol::p", False), BadRequest, "attributes.bol::p"),
        (
            with_("attributes", {f"str:cm:a{i}": "x" for i in range(16)}),
            BadRequest,
            "attributes.str:cm:a15",
        ),
        (big_activity(), BadRequest, None),
        # values by type prefix
        (with_("attributes/str:cm:s", "x" * 256), BadRequest, "attributes.str:cm:s"),
        (with_("attributes/str:cm:s", 5), BadRequest, "attributes.str:cm:s"),
        (with_("attributes/str:cm:s", None), BadRequest, "attributes.str:cm:s"),
        (with_("attributes/txt:cm:t", "x" * 4001), BadRequest, "attributes.txt:cm:t"),
        (with_("attributes/int:cm:n", 2**63), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", -(2**63) - 1), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", 1.8446744073709552e19), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", True), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", 15.3), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", 15.5), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/int:cm:n", "15 kg"), BadRequest, "attributes.int:cm:n"),
        (with_("attributes/bol:cm:b", 1), BadRequest, "attributes.bol:cm:b"),
        (with_("attributes/bol:cm:b", "yes"), BadRequest, "attributes.bol:cm:b"),
        (with_("attributes/dtz:cm:d", "2020-02-17"), BadRequest, "attributes.dtz:cm:d"),
        (
            with_("attributes/dtz:cm:d", {"year": 2023, "month": 2, "day": 29}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 2024, "month": 13, "day": 1}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 0, "month": 1, "day": 1}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 10**30, "month": 1, "day": 1}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": "2024", "month": 1, "day": 1}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 2024, "month": True, "day": 1}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 2024, "month": 1, "day": 1, "tz": "UTC"}),
            BadRequest,
            "attributes.dtz:cm:d",
        ),
        (
            with_("attributes/dtz:cm:d", {"year": 2024, "month": 1, "day": 1, "timezone": 10}),
            BadRequest,
            "attributes.dtz:cm:d.timezone",
        ),
        (with_("attributes/tme:cm:t", "2020-02-17"), BadRequest, "attributes.tme:cm:t"),
        (with_("attributes/tme:cm:t", "2020-02-17T01:30:17"), BadRequest, "attributes.tme:cm:t"),
        (with_("attributes/tme:cm:t", "2020-02-30T01:30:17Z"), BadRequest, "attributes.tme:cm:t"),
        (with_("attributes/tme:cm:t", "2020-02-17T25:30:17Z"), BadRequest, "attributes.tme:cm:t"),
        (
            with_("attributes/tme:cm:t", "2020-02-17 01:30:17Z"),
            BadRequest,
            "attributes.tme:cm:t",
        ),
        (
            with_("attributes/tme:cm:t", "\uff12\uff10\uff12\uff10-02-17T01:30:17Z"),
            BadRequest,
            "attributes.tme:cm:t",
        ),
        (with_("attributes/tme:cm:t", 1581903017), BadRequest, "attributes.tme:cm:t"),
        (with_("attributes/phn:cm:p", "+61401234567"), BadRequest, "attributes.phn:cm:p"),
        (
            with_("attributes/phn:cm:p", {"c": "+61", "n": "401 234 567 ext 2"}),
            BadRequest,
            "attributes.phn:cm:p",
        ),
        (
            with_("attributes/phn:cm:p", {"c": "", "n": " "}),
            BadRequest,
            "attributes.phn:cm:p",
        ),
        (
            with_("attributes/phn:cm:p", {"c": "61", "n": 401234567}),
            BadRequest,
            "attributes.phn:cm:p",
        ),
        (
            with_("attributes/phn:cm:p", {"phone": "+61 401", "parse_with_country_code": "y"}),
            BadRequest,
            "attributes.phn:cm:p.parse_with_country_code",
        ),
        (
            with_("attributes/phn:cm:p", {"phone": "+61 401", "extra": 1}),
            BadRequest,
            "attributes.phn:cm:p",
        ),
        (with_("attributes/geo:cm:g", "Melbourne"), BadRequest, "attributes.geo:cm:g"),
        (
            with_("attributes/geo:cm:g", {"name": "Melbourne", "lat": 1}),
            BadRequest,
            "attributes.geo:cm:g",
        ),
        (with_("attributes/geo:cm:g", {"name": 3}), BadRequest, "attributes.geo:cm:g.name"),
        (with_("attributes/sst:cm:s", "a,b"), BadRequest, "attributes.sst:cm:s"),
        (with_("attributes/sst:cm:s", ["a", 2]), BadRequest, "attributes.sst:cm:s"),
        (with_("attributes/sst:cm:s", ["a"] * 101), BadRequest, "attributes.sst:cm:s"),
        (with_("attributes/obj:cm:o", [1, 2]), BadRequest, "attributes.obj:cm:o"),
        (with_("attributes/obj:cm:o", "{}"), BadRequest, "attributes.obj:cm:o"),
        # location
        (with_("location", "1.2.3.4"), BadRequest, "location"),
        (with_("location/geo", {}), BadRequest, "location.geo"),
        (with_("location/custom", "NY"), BadRequest, "location.custom"),
        (with_("location/custom/lat", 91), BadRequest, "location.custom.lat"),
        (with_("location/custom/lng", -180.5), BadRequest, "location.custom.lng"),
        (with_("location/custom/lat", "north"), BadRequest, "location.custom.lat"),
        (with_("location/custom/lat", True), BadRequest, "location.custom.lat"),
        (with_("location/custom/lat", 10**400), BadRequest, "location.custom.lat"),
        (with_("location/custom/lat", float("nan")), BadRequest, "location.custom.lat"),
        (with_("location/custom/lat", 40.7), BadRequest, "location.custom"),
        (with_("location/custom/city_name", 5), BadRequest, "location.custom.city_name"),
        (with_("location/custom/altitude", 5), BadRequest, "location.custom.altitude"),
        (with_("location/address", ["1 Main St"]), BadRequest, "location.address"),
        (with_("location/address/city", None), BadRequest, "location.address.city"),
        (
            with_("location/address", {f"line{i}": "x" for i in range(17)}),
            BadRequest,
            "location.address",
        ),
    ],
)
def test_activity_refusals(activity: Any, error: type[GatewayError], field: str | None) -> None:
    item = parse_one(activity)
    assert isinstance(item, GatewayError), item
    assert type(item) is error, item.message
    assert item.field == field, item.message


def test_error_messages_name_the_problem() -> None:
    unknown = parse_one(with_("activity_id", "act:cm:unknown"))
    assert isinstance(unknown, NotFound)
    assert unknown.message == "activity act:cm:unknown is not enabled"
    garbage = parse_one(with_("activity_id", "<script>" + "x" * 5000))
    assert isinstance(garbage, NotFound)
    assert len(garbage.message) < 100  # browser input is echoed shortened
    missing = parse_one(with_("fields", {"str::first": "Chris"}))
    assert isinstance(missing, BadRequest)
    assert missing.message == "no person identifier: give str::email, str::ei or person_id"
    conflict = parse_one(with_("attributes/str::email", "other@example.com"))
    assert isinstance(conflict, BadRequest)
    assert "str::email differs between fields and attributes" in conflict.message
    too_big = parse_one(big_activity())
    assert isinstance(too_big, BadRequest)
    assert "bytes as JSON" in too_big.message
    many = parse_one(with_("attributes", {f"str:cm:a{i}": "x" for i in range(16)}))
    assert isinstance(many, BadRequest)
    assert "over Ortto's 15 per activity" in many.message


# -- what passes, normalised


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("str:cm:s", "x" * 255),
        ("str:cm:s", ""),
        ("txt:cm:t", "x" * 4000),
        ("int:cm:n", 2**63 - 1),
        ("int:cm:n", -(2**63)),
        ("int::v", 0),
        ("bol:cm:b", False),
        ("dtz:cm:d", {"year": 2024, "month": 2, "day": 29}),
        ("dtz:cm:d", {"year": 1990, "month": 12, "day": 31, "timezone": "Australia/Melbourne"}),
        ("tme:cm:t", "2020-02-17T01:30:17.601Z"),
        ("tme:cm:t", "2020-02-17T01:30:17Z"),
        ("tme:cm:t", "2020-02-17T01:30:17+10:00"),
        ("tme:cm:t", "2020-02-17T01:30:17.123456789-05:30"),
        ("phn:cm:p", {"c": "61", "n": "401234567"}),
        ("phn:cm:p", {"phone": "+61 401 234 567", "parse_with_country_code": True}),
        ("phn:cm:p", {"phone": "0401 234 567"}),
        ("geo:cm:g", {"name": "Melbourne"}),
        ("sst:cm:s", ["a", "b"]),
        ("sst:cm:s", []),
        ("obj:cm:o", {"nested": {"list": [1, 2.5, None, "x"]}}),
        ("obj:cm:o", {}),
    ],
)
def test_values_accepted_per_type(name: str, value: Any) -> None:
    item = parse_one(with_(f"attributes/{name}", copy.deepcopy(value)))
    assert not isinstance(item, GatewayError), item.message
    assert item["attributes"][name] == value


def test_output_is_fresh_and_in_ortto_shape() -> None:
    raw = with_("location", {"source_ip": "6.6.6.6", "custom": None, "address": None})
    raw["created"] = "2020-02-17T01:30:17.601Z"
    raw["key"] = {"garbage": True}  # ignored whatever its type: the gateway sets its own
    before = copy.deepcopy(raw)
    out = parse_one(raw)
    assert not isinstance(out, GatewayError)
    assert raw == before  # input untouched
    assert out == {
        "activity_id": "act:cm:logged-in",
        "fields": {"str::email": EMAIL, "str::first": "Chris"},
        "attributes": {"str:cm:payment-plan": "starter", "int::v": 1530},
        "location": {},
    }
    assert out["fields"] is not raw["fields"] and out["attributes"] is not raw["attributes"]


def test_email_trimmed_and_identifiers() -> None:
    out = parse_one(with_("fields/str::email", "  Chris.Smith@Example.com\t"))
    assert not isinstance(out, GatewayError)
    assert out["fields"]["str::email"] == "Chris.Smith@Example.com"

    by_ei = parse_one({"activity_id": "act:cm:login", "fields": {"str::ei": " u-42 "}})
    assert by_ei == {"activity_id": "act:cm:login", "fields": {"str::ei": "u-42"}, "location": {}}

    by_person = parse_one({"activity_id": "act:cm:login", "person_id": "006a0f", "fields": None})
    assert by_person == {"activity_id": "act:cm:login", "location": {}, "person_id": "006a0f"}


def test_person_fields_moved_from_attributes_when_equal() -> None:
    raw = good()
    raw["fields"] = {"str::email": EMAIL}
    raw["attributes"] = {
        "str::email": f" {EMAIL} ",
        "str::first": "Chris",
        "str::last": "Smith",
        "str::ei": "u-1",
        **{f"str:cm:a{i}": "x" for i in range(15)},
    }
    out = parse_one(raw)  # 19 attributes sent, 15 once the person fields moved out
    assert not isinstance(out, GatewayError), out.message
    assert out["fields"] == {
        "str::email": EMAIL,
        "str::first": "Chris",
        "str::last": "Smith",
        "str::ei": "u-1",
    }
    assert len(out["attributes"]) == 15


def test_an_email_in_both_places_may_differ_in_case_only() -> None:
    raw = good()
    raw["fields"] = {"str::email": EMAIL.upper()}
    raw["attributes"] = {"str::email": f" {EMAIL} "}
    out = parse_one(raw)  # one person to the limiter, so one email
    assert not isinstance(out, GatewayError), out.message
    raw["fields"] = {"str::ei": "U-1"}
    raw["attributes"] = {"str::ei": "u-1"}  # external ids are case-sensitive
    conflict = parse_one(raw)
    assert isinstance(conflict, BadRequest) and "str::ei differs" in conflict.message


def test_location_custom_and_address_kept_source_ip_dropped() -> None:
    custom = {"city_name": "Melbourne", "lat": -37.8, "lng": 144}
    address = {"city": "Melbourne", "country": "Australia"}
    out = parse_one(
        with_("location", {"source_ip": "6.6.6.6", "custom": custom, "address": address})
    )
    assert not isinstance(out, GatewayError)
    assert out["location"] == {"custom": custom, "address": address}
    empty = parse_one(with_("location", {"custom": {}, "address": {}}))
    assert not isinstance(empty, GatewayError)
    assert empty["location"] == {}


def test_activity_catalogue_attributes_and_person_fields() -> None:
    spec = ActivitySpec(
        "act:cm:logged-in",
        attributes=frozenset({"str:cm:payment-plan", "int::v"}),
        person_fields=frozenset({"str::email", "phn::phone"}),
    )
    s = Settings(activities={"act:cm:logged-in": spec}, strict=True)
    raw = with_("attributes/str:cm:other", "x")
    raw["fields"] = {"str::email": EMAIL}
    undeclared = parse_one(raw, s)
    assert isinstance(undeclared, BadRequest)
    assert undeclared.field == "attributes.str:cm:other"
    assert "not declared" in undeclared.message
    first = parse_one(good(), s)  # str::first not in this activity's person fields
    assert isinstance(first, BadRequest) and first.field == "fields.str::first"
    raw = good()
    raw["fields"] = {"str::email": EMAIL, "str::ei": "u-1", "phn::phone": {"c": "61", "n": "4"}}
    out = parse_one(raw, s)
    assert not isinstance(out, GatewayError), out.message
    assert out["fields"]["phn::phone"] == {"c": "61", "n": "4"}


def test_global_person_fields_setting() -> None:
    s = Settings(
        activities={"act:cm:login": ActivitySpec("act:cm:login")},
        person_fields=frozenset({"str::email", "geo::city"}),
    )
    raw: dict[str, Any] = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": EMAIL, "geo::city": {"name": "X"}},
    }
    assert not isinstance(parse_one(raw, s), GatewayError)
    raw["fields"]["str::first"] = "Chris"
    item = parse_one(raw, s)
    assert isinstance(item, BadRequest) and item.field == "fields.str::first"


def test_an_empty_person_fields_list_allows_identifiers_only() -> None:
    spec = ActivitySpec("act:cm:login", person_fields=frozenset())
    s = Settings(activities={"act:cm:login": spec})  # the global allowlist has str::email
    raw: dict[str, Any] = {"activity_id": "act:cm:login", "fields": {"str::ei": "u-1"}}
    assert not isinstance(parse_one(raw, s), GatewayError)
    raw["fields"]["str::email"] = EMAIL
    item = parse_one(raw, s)
    assert isinstance(item, BadRequest) and item.field == "fields.str::email"


def test_nothing_enabled_refuses_all() -> None:
    item = parse_one(good(), Settings())
    assert isinstance(item, NotFound)


# -- batches partly refused, and which error answers a fully refused one


def test_mixed_batch_keeps_order() -> None:
    unknown = with_("activity_id", "act:cm:nope")
    no_id = with_("fields", {"str::first": "Chris"})
    parsed = parse_request({"activities": [good(), unknown, no_id, good()]}, SETTINGS)
    kinds = [type(item).__name__ for item in parsed.items]
    assert kinds == ["dict", "NotFound", "BadRequest", "dict"]
    assert first_error(parsed) is None


def test_first_error_prefers_a_bad_request_over_not_found() -> None:
    unknown = with_("activity_id", "act:cm:nope")
    no_id = with_("fields", {"str::first": "Chris"})
    parsed = parse_request({"activities": [unknown, no_id]}, SETTINGS)
    error = first_error(parsed)
    assert isinstance(error, BadRequest) and error.status == 400
    assert error is parsed.items[1]


def test_first_error_is_not_found_when_every_activity_is_unknown() -> None:
    parsed = parse_request(
        {"activities": [with_("activity_id", f"act:cm:x{i}") for i in range(3)]}, SETTINGS
    )
    error = first_error(parsed)
    assert isinstance(error, NotFound) and error.status == 404
    assert error is parsed.items[0]


def test_bare_activity_is_one_item() -> None:
    parsed = parse_request(good(), SETTINGS)
    assert not is_batch(good()) and is_batch({"activities": []})
    assert parsed.async_ is False and parsed.merge_by is None
    assert len(accepted(parsed)) == 1
    bare_bad = parse_request(with_("async", True), SETTINGS)  # batch keys are not activity keys
    error = first_error(bare_bad)
    assert isinstance(error, BadRequest) and error.field == "async"


# -- properties: any input gives a ParsedRequest or a GatewayError, never another exception

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        ["act:cm:logged-in", "act:cm:login", EMAIL, " a@b ", "2020-02-17T01:30:17Z", "61", ""]
    )
)
NAMES = st.sampled_from(
    [
        "activity_id",
        "fields",
        "attributes",
        "location",
        "created",
        "key",
        "person_id",
        "activities",
        "async",
        "merge_by",
        "str::email",
        "str::ei",
        "str::first",
        "bol::p",
        "int::v",
        "str:cm:plan",
        "int:cm:n",
        "dtz:cm:d",
        "tme:cm:t",
        "phn:cm:p",
        "geo:cm:g",
        "sst:cm:s",
        "obj:cm:o",
        "source_ip",
        "custom",
        "address",
        "lat",
        "lng",
        "city_name",
        "year",
        "month",
        "day",
        "timezone",
        "c",
        "n",
        "phone",
        "name",
    ]
) | st.text(max_size=10)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(NAMES, children, max_size=8),
    max_leaves=30,
)
ACTIVITY_LIKE = st.fixed_dictionaries(
    {"activity_id": st.sampled_from([*ENABLED, "act:cm:off"])},
    optional={
        "fields": st.dictionaries(NAMES, JSON_VALUES, max_size=4),
        "attributes": st.dictionaries(NAMES, JSON_VALUES, max_size=6),
        "location": JSON_VALUES,
        "person_id": SCALARS,
        "key": SCALARS,
    },
)
# Nearly valid activities, so the property also walks the paths that accept.
TYPED_NAMES = st.sampled_from(
    [f"{t}:cm:{t}" for t in ("str", "txt", "int", "bol", "dtz", "tme", "phn", "geo", "sst", "obj")]
    + ["int::v", "str::email", "bol::p"]
)
TYPED_VALUES = st.one_of(
    SCALARS,
    st.text(max_size=300),
    st.fixed_dictionaries(
        {"year": st.integers(-1, 10_000), "month": st.integers(0, 13), "day": st.integers(0, 32)},
        optional={"timezone": st.text(max_size=70)},
    ),
    st.datetimes().map(lambda d: d.isoformat(timespec="milliseconds") + "Z"),
    st.fixed_dictionaries(
        {"c": st.text("0123456789+", max_size=4), "n": st.text("0123 ", max_size=17)}
    ),
    st.fixed_dictionaries({"phone": SCALARS}, optional={"parse_with_country_code": SCALARS}),
    st.fixed_dictionaries({"name": SCALARS}),
    st.lists(st.text(max_size=5), max_size=3),
    JSON_VALUES,
)
COORDINATES = st.floats() | st.integers() | SCALARS
LOCATIONS = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "source_ip": SCALARS,
        "custom": st.none()
        | st.fixed_dictionaries(
            {}, optional={"lat": COORDINATES, "lng": COORDINATES, "city_name": SCALARS}
        ),
        "address": st.none() | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3),
    },
)
VALIDISH = st.fixed_dictionaries(
    {
        "activity_id": st.sampled_from(ENABLED),
        "fields": st.fixed_dictionaries(
            {"str::email": st.sampled_from([EMAIL, EMAIL, EMAIL, " X@Y.Z ", "a@b@c"])}
        ),
    },
    optional={
        "attributes": st.dictionaries(TYPED_NAMES, TYPED_VALUES, max_size=16),
        "location": LOCATIONS,
    },
)
BODIES = (
    JSON_VALUES
    | ACTIVITY_LIKE
    | VALIDISH
    | st.fixed_dictionaries(
        {"activities": st.lists(VALIDISH | ACTIVITY_LIKE | JSON_VALUES, max_size=4)},
        optional={
            "async": SCALARS,
            "merge_by": JSON_VALUES | st.lists(st.sampled_from(["str::email", "str::ei"])),
        },
    )
)


def check_outcome(data: Any) -> None:
    try:
        parsed = parse_request(data, SETTINGS)
    except GatewayError:
        return
    for item in parsed.items:
        if isinstance(item, GatewayError):
            continue
        assert len(orjson.dumps(item)) <= MAX_ACTIVITY_BYTES <= ORTTO_MAX_ACTIVITY_BYTES
        assert item["activity_id"] in ENABLED
        assert set(item) <= {"activity_id", "fields", "attributes", "location", "person_id"}
        person_key(item)  # every accepted activity has an identifier


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_any_decoded_value_gives_parsed_request_or_gateway_error(data: Any) -> None:
    check_outcome(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_any_encoded_body_round_trips(data: Any) -> None:
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        return
    try:
        decoded = decode_body(body, JSON, LIMIT)
    except GatewayError:
        return
    check_outcome(decoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["", JSON, "text/plain", "image/png"]))
def test_any_bytes_decode_or_refuse(body: bytes, content_type: str) -> None:
    try:
        data = decode_body(body, content_type, LIMIT)
    except GatewayError:
        return
    check_outcome(data)


# -- never lose an activity over an optional part (the default, not strict)


def lenient(activity: Any, s: Settings = LENIENT) -> tuple[ActivityBody, list[dict[str, str]]]:
    parsed = parse_request({"activities": [activity]}, s)
    (item,) = parsed.items
    assert not isinstance(item, GatewayError), item.message
    return item, parsed.warnings[0]


def fields_of(warnings: list[dict[str, str]]) -> dict[str, str]:
    return {w["field"]: w["reason"] for w in warnings}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("attributes/phn:cm:p", {"c": "971", "n": "50 123 4567"}, {"c": "971", "n": "501234567"}),
        (
            "attributes/phn:cm:p",
            {"c": "+61", "n": "(04) 0123-4567"},
            {"c": "61", "n": "0401234567"},
        ),
        ("attributes/phn:cm:p", {"n": "0401 234 567"}, {"n": "0401234567"}),
        (
            "attributes/phn:cm:p",
            {"n": "+61 401 234 567"},
            {"phone": "+61401234567", "parse_with_country_code": True},
        ),
        ("attributes/int:cm:n", "1530", 1530),
        ("attributes/int:cm:n", 1530.0, 1530),
        ("attributes/bol:cm:b", "TRUE", True),
        ("attributes/bol:cm:b", "false", False),
    ],
)
def test_a_value_with_a_plain_meaning_is_normalised(path: str, value: Any, expected: Any) -> None:
    out, warnings = lenient(with_(path, value))
    name = path.split("/")[1]
    assert out["attributes"][name] == expected
    assert type(out["attributes"][name]) is type(expected)
    assert fields_of(warnings) == {f"attributes.{name}": "normalised"}
    # Strict mode normalises too: the meaning is the same.
    strict_out = parse_one(with_(path, value))
    assert not isinstance(strict_out, GatewayError)
    assert strict_out["attributes"][name] == expected


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("attributes/phn:cm:p", {"c": "", "n": ""}),  # an optional phone left blank
        ("attributes/phn:cm:p", {"c": "971", "n": "call me"}),
        ("attributes/geo:cm:g", {}),  # RudderStack's missing trait
        ("attributes/geo:cm:g", {"name": ""}),
        ("attributes/int:cm:n", 15.3),  # Ortto fails a value it cannot unmarshal
        ("attributes/bol:cm:b", "yes"),
        ("attributes/str:cm:s", "x" * 256),
        ("attributes/str:cm:s", None),
        ("attributes/tme:cm:t", "yesterday"),
        ("attributes/plan", "x"),  # no type prefix
    ],
)
def test_a_bad_optional_value_is_dropped_and_the_activity_kept(path: str, value: Any) -> None:
    out, warnings = lenient(with_(path, value))
    name = path.split("/")[1]
    assert name not in out.get("attributes", {})
    assert out["fields"]["str::email"] == EMAIL  # the lead is not lost
    assert out["attributes"]["str:cm:payment-plan"] == "starter"
    assert fields_of(warnings) == {f"attributes.{name}": "dropped"}
    refused = parse_one(with_(path, value))  # strict: the same part is a 400
    assert isinstance(refused, BadRequest) and refused.field == f"attributes.{name}"


def test_recorded_ortto_keys_are_forwarded_or_read_as_documented() -> None:
    # Bodies Ortto answered 200 in a public SDK's recorded fixtures.
    raw = good()
    raw["merge_by"] = ["str::email"]
    raw["location"] = {
        "ip": "198.51.100.7",
        "custom": {"latitude": -37.81, "longitude": 144.96, "city": "Melbourne"},
    }
    out, warnings = lenient(raw)
    assert out["merge_by"] == ["str::email"]
    assert out["location"] == {"custom": {"lat": -37.81, "lng": 144.96, "city_name": "Melbourne"}}
    assert fields_of(warnings) == {
        "location.ip": "dropped",  # the gateway sets source_ip itself
        "location.custom.latitude": "normalised",
        "location.custom.longitude": "normalised",
        "location.custom.city": "normalised",
    }
    # Strict mode takes them too: nothing here is a drop it would refuse.
    strict = parse_one(raw)
    assert not isinstance(strict, GatewayError), strict.message
    assert strict["location"] == out["location"]


def test_unsafe_or_unknown_parts_are_dropped_with_a_warning() -> None:
    raw = good()
    raw["merge_by"] = ["str::first"]  # merging by a name could reach another person
    raw["merge_strategy"] = 2  # how people merge is the site owner's choice
    raw["created"] = "2020-02-17T01:30:17.601Z"
    raw["colour"] = "blue"
    raw["location"] = {"source_ip": "1.2.3.4", "custom": {"postal_code": "3000"}}
    out, warnings = lenient(raw)
    assert "merge_by" not in out and "merge_strategy" not in out and "colour" not in out
    assert out["location"] == {}
    assert fields_of(warnings) == {
        "merge_by": "dropped",
        "merge_strategy": "dropped",
        "created": "dropped",
        "colour": "dropped",
        "location.source_ip": "dropped",
        "location.custom.postal_code": "dropped",
    }


def test_identity_and_safety_rules_still_refuse_the_whole_activity() -> None:
    bad_email = with_("fields/str::email", "not-an-email")
    refused = parse_one(bad_email, LENIENT)
    assert isinstance(refused, BadRequest) and refused.field == "fields.str::email"
    # With another identifier, the bad email is only dropped.
    bad_email["fields"]["str::ei"] = "u-1"
    out, warnings = lenient(bad_email)
    assert out["fields"] == {"str::ei": "u-1", "str::first": "Chris"}
    assert fields_of(warnings) == {"fields.str::email": "dropped"}
    off_list = parse_one(with_("fields/phn::phone", {"c": "61", "n": "401"}), LENIENT)
    assert isinstance(off_list, BadRequest) and off_list.field == "fields.phn::phone"
    subscription = parse_one(with_("attributes/bol::p", True), LENIENT)
    assert isinstance(subscription, BadRequest) and subscription.field == "attributes.bol::p"


def test_body_level_parts_are_dropped_with_a_warning() -> None:
    body = {"activities": [good()], "merge_by": ["str::first"], "extra": 1}
    parsed = parse_request(body, LENIENT)
    assert parsed.merge_by is None
    assert fields_of(parsed.request_warnings) == {"merge_by": "dropped", "extra": "dropped"}
    with pytest.raises(BadRequest):
        parse_request(body, SETTINGS)


def test_warnings_are_bounded_whatever_the_body() -> None:
    raw = good()
    raw.update({f"junk{i}": i for i in range(500)})
    out, warnings = lenient(raw)
    assert out["fields"]["str::email"] == EMAIL
    assert len(warnings) == MAX_WARNINGS + 1
    assert warnings[-1]["message"] == "and 480 more parts left out or normalised"


def test_each_warning_has_a_reason_code() -> None:
    activity = {
        **with_("attributes/int:cm:n", "1530"),  # normalised
        "created": "2020-01-01T00:00:00Z",  # set by the gateway
        "colour": "red",  # unknown key
        "location": {"source_ip": "8.8.8.8"},  # set by the gateway
    }
    activity["attributes"]["bol:cm:b"] = "maybe"  # invalid, dropped
    _, warnings = lenient(activity)
    codes = {w["field"]: w["code"] for w in warnings}
    assert codes == {
        "attributes.int:cm:n": "normalised",
        "attributes.bol:cm:b": "invalid_field",
        "created": "set_by_gateway",
        "colour": "unknown_key",
        "location.source_ip": "set_by_gateway",
    }
    assert all(set(w) == {"field", "reason", "code", "message"} for w in warnings)


def test_an_undeclared_attribute_and_the_warnings_past_the_bound_have_codes() -> None:
    declared = Settings(
        activities={a: ActivitySpec(a, attributes=frozenset({"str:cm:plan"})) for a in ENABLED}
    )
    _, warnings = lenient(with_("attributes/str:cm:other", "x"), declared)
    assert {w["field"]: w["code"] for w in warnings} == {
        "attributes.str:cm:payment-plan": "not_declared",
        "attributes.int::v": "not_declared",
        "attributes.str:cm:other": "not_declared",
    }
    many = {**good(), **{f"k{i}": 1 for i in range(MAX_WARNINGS + 3)}}
    _, warnings = lenient(many)
    assert warnings[-1]["code"] == "more_warnings"
    assert {w["code"] for w in warnings[:-1]} == {"unknown_key"}


def test_strict_mode_refuses_with_the_warnings_code() -> None:
    item = parse_one({**good(), "colour": "red"})
    assert isinstance(item, BadRequest)
    assert (item.reason, item.field) == ("unknown_key", "colour")
