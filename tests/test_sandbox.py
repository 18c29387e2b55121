"""Tests for the sandbox upstream (gateway.sandbox)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import ORTTO_MAX_ACTIVITY_BYTES
from gateway.sandbox import (
    DEFAULT_PERSON_FIELDS,
    SANDBOX_STATE,
    Fault,
    SandboxState,
    create_sandbox_app,
    wait_for,
)

EXAMPLES = Path(__file__).parent / "ortto-examples"
PATH = "/v1/activities/create"
KEY = "test-key"
HEADERS = {"X-Api-Key": KEY, "Content-Type": "application/json"}
HEX24 = re.compile(r"^[0-9a-f]{24}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# 2020-03-01T00:00:00Z: the documented back-dated example (2020-02-17) is within 90 days.
T0 = datetime(2020, 3, 1, tzinfo=UTC).timestamp()

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


class FakeClock:
    """A settable clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rfc3339(ts: float) -> str:
    """Format a timestamp the way Ortto's examples do."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def activity(email: str = "chris.smith@example.com", **extra: Any) -> dict[str, Any]:
    """A minimal valid activity."""
    return {
        "activity_id": "act:cm:logged-in",
        "fields": {"str::email": email},
        "attributes": {"str:cm:web-browser": "Firefox"},
        "location": {"source_ip": "203.0.113.7"},
        **extra,
    }


def error_shape(body: dict[str, Any], code: int) -> None:
    """Assert Ortto's error shape."""
    assert UUID.match(body["request_id"])
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> SandboxState:
    return SandboxState(KEY, clock=clock)


@pytest.fixture
async def client(aiohttp_client: MakeClient, state: SandboxState) -> Client:
    return await aiohttp_client(create_sandbox_app(state))


async def post(
    client: Client, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """POST a body (bytes or JSON-able) to the activities path."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with client.post(PATH, data=data, headers=headers or HEADERS) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_api_key_checked_and_never_echoed(client: Client, state: SandboxState) -> None:
    body = {"activities": [activity()]}
    status, answer, _ = await post(client, body, {**HEADERS, "X-Api-Key": "sk-wrong-secret"})
    assert status == 401
    error_shape(answer, 401)
    assert answer["error"] == "Invalid API key"
    assert "sk-wrong-secret" not in json.dumps(answer)
    status, answer, _ = await post(client, body, {"Content-Type": "application/json"})
    assert status == 401
    assert [r.api_key_ok for r in state.requests] == [False, False]
    assert state.activities == []
    status, _, _ = await post(client, body)
    assert status == 200
    state.api_key = "rotated"
    status, _, _ = await post(client, body)
    assert status == 401
    assert [r.status for r in state.requests] == [401, 401, 200, 401]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("0*.json")))
async def test_documented_examples_answer_in_orttos_shape(client: Client, name: str) -> None:
    raw = (EXAMPLES / name).read_bytes()
    request = orjson.loads(raw)
    status, answer, _ = await post(client, raw)
    assert status == 200, answer
    entries = answer["activities"]
    assert len(entries) == len(request["activities"])
    documented = orjson.loads((EXAMPLES / "responses.json").read_bytes())
    if request.get("async"):
        assert answer == documented["async_queued"]["body"]
        return
    for entry in entries:
        assert set(entry) == set(documented["created"]["body"]["activities"][0])
        assert HEX24.match(entry["person_id"]) and HEX24.match(entry["activity_id"])
        assert entry["status"] == "ingested"
        assert entry["person_status"] == "created"


async def test_person_status_and_stable_person_id(client: Client, state: SandboxState) -> None:
    raw = (EXAMPLES / "02-two-at-once.json").read_bytes()
    _, first, _ = await post(client, raw)
    _, again, _ = await post(client, raw)
    assert [e["person_status"] for e in first["activities"]] == ["created", "created"]
    assert [e["person_status"] for e in again["activities"]] == ["updated", "updated"]
    assert [e["person_id"] for e in first["activities"]] == [
        e["person_id"] for e in again["activities"]
    ]
    assert first["activities"][0]["person_id"] != first["activities"][1]["person_id"]
    assert len({e["activity_id"] for e in first["activities"] + again["activities"]}) == 4
    # Email is matched trimmed and case-insensitively.
    _, third, _ = await post(client, {"activities": [activity(" Chris.Smith@EXAMPLE.com ")]})
    assert third["activities"][0]["person_id"] == first["activities"][1]["person_id"]
    assert len(state.activities) == 5
    assert state.activities[0].activity == orjson.loads(raw)["activities"][0]
    assert state.activities[1].source_ip is None
    assert state.activities[4].email == " Chris.Smith@EXAMPLE.com "


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{", HEADERS, "Invalid JSON body"),
        (b"[]", HEADERS, "Request body must be a JSON object"),
        (b'{"activity": []}', HEADERS, "activities is required and must be a list"),
        (b'{"activities": {}}', HEADERS, "activities is required and must be a list"),
        (b'{"activities": []}', HEADERS, "activities must not be empty"),
        (
            b'{"activities": []}',
            {**HEADERS, "Content-Type": "text/plain"},
            "Content-Type must be application/json",
        ),
    ],
)
async def test_malformed_requests(
    client: Client, body: bytes, headers: dict[str, str], message: str
) -> None:
    status, answer, _ = await post(client, body, headers)
    assert status == 400
    error_shape(answer, 400)
    assert answer["error"] == message


async def test_charset_is_allowed(client: Client) -> None:
    headers = {**HEADERS, "Content-Type": "application/json; charset=utf-8"}
    status, _, _ = await post(client, {"activities": [activity()]}, headers)
    assert status == 200


async def test_at_most_100_activities(client: Client, state: SandboxState) -> None:
    emails = [f"p{i}@example.com" for i in range(101)]
    status, answer, _ = await post(client, {"activities": [activity(e) for e in emails]})
    assert status == 400
    error_shape(answer, 400)
    assert "100" in answer["error"]
    assert state.activities == []
    assert state.requests[-1].n_activities == 101
    status, answer, _ = await post(client, {"activities": [activity(e) for e in emails[:100]]})
    assert status == 200
    assert len(answer["activities"]) == 100


async def test_body_over_2_mb(client: Client, state: SandboxState) -> None:
    limit = 2 * 1024 * 1024
    one = activity(attributes={"obj:cm:padding": {"text": ""}})
    skeleton = len(orjson.dumps({"activities": [one]}))
    one["attributes"]["obj:cm:padding"]["text"] = "x" * (limit - skeleton + 1)
    body = orjson.dumps({"activities": [one]})
    assert len(body) == limit + 1
    async with client.post(PATH, data=io.BytesIO(body), headers=HEADERS) as resp:
        assert resp.status == 400
        answer = await resp.json()
    error_shape(answer, 400)
    assert "2 MB" in answer["error"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the stream is counted
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    async with client.post(PATH, data=chunked(), headers=HEADERS) as resp:
        assert resp.status == 400
    assert state.activities == []
    assert [r.status for r in state.requests] == [400, 400]
    one["attributes"]["obj:cm:padding"]["text"] = one["attributes"]["obj:cm:padding"]["text"][1:]
    exact = orjson.dumps({"activities": [one]})
    assert len(exact) == limit
    async with client.post(PATH, data=io.BytesIO(exact), headers=HEADERS) as resp:
        answer = await resp.json()
    # Exactly 2 MB passes the size check; the activity then breaks the 16 kB rule.
    assert answer["error"] == "No valid contacts provided (activity is larger than 16 kB)"


async def test_created_more_than_90_days_ago_fails_whole_request(
    client: Client, state: SandboxState, clock: FakeClock
) -> None:
    old = activity(created=rfc3339(clock.now - 91 * 86400), key="old")
    recent = activity("other@example.com", created=rfc3339(clock.now - 89 * 86400), key="r")
    status, answer, _ = await post(client, {"activities": [recent, old]})
    assert status == 400
    error_shape(answer, 400)
    assert answer["error"] == " Created date is more than 90 days ago"
    assert "details" not in answer
    assert state.activities == []
    status, _, _ = await post(client, {"activities": [recent]})
    assert status == 200
    status, answer, _ = await post(client, {"activities": [activity(created="yesterday")]})
    assert status == 400
    assert "RFC 3339" in answer["error"]


async def test_future_created_is_not_refused(
    client: Client, state: SandboxState, clock: FakeClock
) -> None:
    # Ortto documents no rule for a `created` in the future (design.md, ortto-examples/), so
    # the sandbox must not invent one: such activities are ingested, and key + created dedupe.
    later = activity(created=rfc3339(clock.now + 120), key="later")
    much_later = activity("other@example.com", created=rfc3339(clock.now + 30 * 86400), key="m")
    status, answer, _ = await post(client, {"activities": [later, much_later]})
    assert status == 200, answer
    assert [e["status"] for e in answer["activities"]] == ["ingested", "ingested"]
    assert len(state.activities) == 2
    status, again, _ = await post(client, {"activities": [later]})
    assert status == 200
    assert again["activities"][0]["person_status"] == "updated"
    assert state.duplicates == 1


def sized_activity(size: int, email: str = "chris.smith@example.com") -> dict[str, Any]:
    """An activity whose compact JSON encoding is exactly ``size`` bytes.

    Padded in an ``obj`` attribute: Ortto documents no length limit for one, while a ``txt``
    value over 4000 characters is itself invalid."""
    one = activity(email, attributes={"obj:cm:padding": {"text": ""}})
    one["attributes"]["obj:cm:padding"]["text"] = "x" * (size - len(orjson.dumps(one)))
    assert len(orjson.dumps(one)) == size
    return one


async def test_activity_over_16_000_bytes_is_invalid(client: Client, state: SandboxState) -> None:
    # "16 kB" is read as 16,000 bytes, the gateway's own (stricter, decimal) reading, so a
    # test against the sandbox catches any activity Ortto might refuse as too large.
    assert ORTTO_MAX_ACTIVITY_BYTES == 16_000
    fits = sized_activity(ORTTO_MAX_ACTIVITY_BYTES, "fits@example.com")
    over = sized_activity(ORTTO_MAX_ACTIVITY_BYTES + 1, "over@example.com")
    binary = sized_activity(16 * 1024, "binary@example.com")  # the 1024-byte kB reading
    status, answer, _ = await post(client, {"activities": [fits, over, binary]})
    assert status == 200, answer
    entries = answer["activities"]
    assert entries[0]["status"] == "ingested"
    too_large = "activity is larger than 16 kB"
    assert (
        entries[1:] == [{"status": "invalid", "person_status": "invalid", "error": too_large}] * 2
    )
    assert [a.email for a in state.activities] == ["fits@example.com"]
    status, answer, _ = await post(client, {"activities": [over]})
    assert status == 400
    error_shape(answer, 400)
    assert answer["error"] == "No valid contacts provided (activity is larger than 16 kB)"
    assert answer["details"] == [{"status": "invalid", "error": "activity is larger than 16 kB"}]


async def test_unknown_person_field_mixed_batch_and_all_invalid(
    client: Client, state: SandboxState
) -> None:
    bad = activity("bad@example.com")
    bad["fields"]["str::x"] = "?"
    good = activity("good@example.com")
    status, answer, _ = await post(client, {"activities": [good, bad, good]})
    assert status == 200
    entries = answer["activities"]
    assert entries[1] == {
        "status": "invalid",
        "person_status": "invalid",
        "error": "failed to validate field str::x in schema: str::x: Object not found",
    }
    assert entries[0]["status"] == entries[2]["status"] == "ingested"
    assert [a.email for a in state.activities] == ["good@example.com", "good@example.com"]

    status, answer, _ = await post(client, {"activities": [bad]})
    documented = orjson.loads((EXAMPLES / "responses.json").read_bytes())
    expected = documented["batch_invalid_field"]["body"]
    assert status == 400
    error_shape(answer, 400)
    assert answer["error"] == expected["error"]
    assert answer["details"] == expected["details"]
    assert len(state.activities) == 2


async def test_identifier_and_field_types_and_custom_fields(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    custom = "str:cm:plan"
    state = SandboxState(KEY, person_fields=[custom], person_ids=["0060" * 6], clock=clock)
    client = await aiohttp_client(create_sandbox_app(state))
    anonymous = {"activity_id": "act:cm:logged-in", "fields": {"str::first": "Ann"}}
    by_ei = {"activity_id": "act:cm:logged-in", "fields": {"str::ei": "u-1", custom: "pro"}}
    by_id = {"activity_id": "act:cm:logged-in", "person_id": "0060" * 6}
    wrong_type = activity(fields={"str::email": "a@example.com", "bol::p": "false"})
    status, answer, _ = await post(client, {"activities": [anonymous, by_ei, by_id, wrong_type]})
    assert status == 200
    statuses = [e["status"] for e in answer["activities"]]
    assert statuses == ["invalid", "ingested", "ingested", "invalid"]
    assert "str::email" in answer["activities"][0]["error"]
    assert "bol::p" in answer["activities"][3]["error"]
    assert answer["activities"][2]["person_id"] == "0060" * 6
    assert answer["activities"][2]["person_status"] == "matched"
    assert state.person_fields >= DEFAULT_PERSON_FIELDS
    with pytest.raises(ValueError, match="person field"):
        SandboxState(person_fields=["nonsense"])


async def test_unknown_attributes_are_ignored_but_limits_apply(client: Client) -> None:
    many = activity(attributes={f"str:cm:a{i}": "v" for i in range(16)})
    ok = activity(attributes={"str:cm:whatever": "v", "int::v": 1530})
    status, answer, _ = await post(client, {"activities": [many, ok]})
    assert status == 200
    assert answer["activities"][0]["status"] == "invalid"
    assert "15" in answer["activities"][0]["error"]
    assert answer["activities"][1]["status"] == "ingested"


async def test_dedupe_by_key_and_created(client: Client, state: SandboxState) -> None:
    raw = (EXAMPLES / "04-backdated.json").read_bytes()
    _, first, _ = await post(client, raw)
    _, second, _ = await post(client, raw)
    assert first["activities"][0]["person_id"] == second["activities"][0]["person_id"]
    assert first["activities"][0]["activity_id"] == second["activities"][0]["activity_id"]
    assert second["activities"][0]["status"] == "ingested"
    assert len(state.activities) == 1
    assert state.duplicates == 1
    assert state.keys_seen()["125432"] == 2
    assert state.activities[0].key == "125432"
    assert state.activities[0].created == "2020-02-17T01:30:17.601Z"
    # The same instant written differently is the same pair; another created is not.
    same = orjson.loads(raw)
    same["activities"][0]["created"] = "2020-02-17T02:30:17.601+01:00"
    await post(client, same)
    other = orjson.loads(raw)
    other["activities"][0]["created"] = "2020-02-17T01:30:18Z"
    await post(client, other)
    assert (len(state.activities), state.duplicates) == (2, 2)
    # A key without created is never merged.
    await post(client, {"activities": [activity(key="k"), activity(key="k")]})
    assert (len(state.activities), state.duplicates) == (4, 2)


async def test_async_is_queued_and_still_recorded(client: Client, state: SandboxState) -> None:
    body = {"async": True, "activities": [activity(key="a", created=rfc3339(state.clock()))]}
    status, answer, _ = await post(client, body)
    assert status == 200
    assert answer == {"activities": [{"status": "queued", "person_status": "queued"}]}
    status, answer, _ = await post(client, body)
    assert answer == {"activities": [{"status": "queued", "person_status": "queued"}]}
    assert (len(state.activities), state.duplicates) == (1, 1)


async def test_50_per_activity_per_contact_per_24h(
    client: Client, state: SandboxState, clock: FakeClock
) -> None:
    status, answer, _ = await post(client, {"activities": [activity()] * 51})
    assert status == 200
    entries = answer["activities"]
    assert all(e["status"] == "ingested" for e in entries[:50])
    assert entries[50] == {
        "status": "invalid",
        "person_status": "invalid",
        "error": "Activity limit of 50 per contact per 24 hours reached",
    }
    other_person = activity("someone.else@example.com")
    other_activity = {**activity(), "activity_id": "act:cm:signed-up"}
    status, answer, _ = await post(client, {"activities": [other_person, other_activity]})
    assert [e["status"] for e in answer["activities"]] == ["ingested", "ingested"]
    status, answer, _ = await post(client, {"activities": [activity()]})
    assert status == 400
    assert "Activity limit of 50" in answer["error"]
    clock.advance(24 * 3600)
    status, _, _ = await post(client, {"activities": [activity()]})
    assert status == 200
    assert len(state.activities) == 53


async def test_ban_after_15_bad_requests_in_15_s_and_expiry(
    client: Client, state: SandboxState, clock: FakeClock
) -> None:
    good = {"activities": [activity()]}
    wrong = {**HEADERS, "X-Api-Key": "nope"}
    for _ in range(14):
        await post(client, good, wrong)
        clock.advance(0.5)
    assert (state.bans, state.banned_until) == (0, 0.0)
    await post(client, b"{", HEADERS)  # a 400 counts too
    assert state.bans == 1
    assert state.banned_until == clock.now + 15
    status, answer, _ = await post(client, good)
    assert status == 403
    error_shape(answer, 403)
    assert answer["error"] == "Too many bad requests; IP banned"
    assert state.activities == []
    clock.advance(14.9)
    status, _, _ = await post(client, good)
    assert status == 403
    assert state.bans == 1  # answers during the ban do not extend or re-trip it
    clock.advance(0.1)
    status, _, _ = await post(client, good)
    assert status == 200
    assert state.banned_until == 0.0
    assert len(state.requests) == 18


async def test_bad_requests_spread_out_do_not_ban(
    client: Client, state: SandboxState, clock: FakeClock
) -> None:
    wrong = {**HEADERS, "X-Api-Key": "nope"}
    for _ in range(30):
        await post(client, {"activities": [activity()]}, wrong)
        clock.advance(1.1)  # never 15 inside any 15 s window
    assert state.bans == 0
    assert not state.is_banned()


async def test_fault_503_with_retry_after_then_normal(client: Client, state: SandboxState) -> None:
    state.add_fault(Fault(503, count=2, retry_after=2))
    state.add_fault(Fault(500, retry_after=0.25))
    results = [await post(client, {"activities": [activity()]}) for _ in range(4)]
    assert [r[0] for r in results] == [503, 503, 500, 200]
    assert [r[2].get("Retry-After") for r in results] == ["2", "2", "0.25", None]
    error_shape(results[0][1], 503)
    assert len(state.activities) == 1
    assert [r.status for r in state.requests] == [503, 503, 500, 200]
    assert [r.n_activities for r in state.requests] == [1, 1, 1, 1]
    assert state.pending_faults == 0


async def test_fault_429_has_orttos_body_without_retry_after(
    client: Client, state: SandboxState
) -> None:
    state.add_fault(Fault(429, try_in_seconds=10))
    status, answer, headers = await post(client, {"activities": [activity()]})
    documented = orjson.loads((EXAMPLES / "responses.json").read_bytes())
    assert status == 429
    assert answer == documented["rate_limited"]["body"]
    assert "Retry-After" not in headers
    assert state.activities == []


async def test_fault_process_records_then_errors_and_retry_merges(
    client: Client, state: SandboxState
) -> None:
    body = {"activities": [activity(key="once", created=rfc3339(state.clock()))]}
    state.add_fault(Fault(502, process=True))
    status, answer, _ = await post(client, body)
    assert status == 502
    error_shape(answer, 502)
    assert len(state.activities) == 1
    status, answer, _ = await post(client, body)  # the client's retry
    assert status == 200
    assert answer["activities"][0]["status"] == "ingested"
    assert (len(state.activities), state.duplicates) == (1, 1)
    assert state.keys_seen() == {"once": 2}


async def test_fault_delay_and_slow_success(client: Client, state: SandboxState) -> None:
    state.add_fault(Fault(200, delay=0.05, process=True))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer, _ = await post(client, {"activities": [activity()]})
    assert loop.time() - started >= 0.05
    assert status == 200
    assert answer["activities"][0]["status"] == "ingested"
    assert len(state.activities) == 1


@pytest.mark.parametrize(
    ("fault", "content_type", "processed"),
    [
        (Fault(200, answer="html"), "text/html", False),
        (Fault(200, answer="html", process=True), "text/html", True),
        (Fault(204, answer="empty"), None, False),
        (Fault(200, answer="echo_key"), "application/json", False),
        (Fault(400, answer="echo_key"), "application/json", False),
    ],
    ids=["html", "html-processed", "204-empty", "200-echo-key", "400-echo-key"],
)
async def test_fault_answers_of_a_misbehaving_upstream(
    client: Client, state: SandboxState, fault: Fault, content_type: str | None, processed: bool
) -> None:
    state.add_fault(fault)
    data = orjson.dumps({"activities": [activity()]})
    async with client.post(PATH, data=data, headers=HEADERS) as resp:
        assert resp.status == fault.status
        body = await resp.read()
        if content_type is not None:
            assert resp.content_type == content_type
    if fault.answer == "html":
        assert body.startswith(b"<!DOCTYPE html>")
    elif fault.answer == "empty":
        assert body == b""
    else:
        answer = orjson.loads(body)
        error_shape(answer, fault.status)
        assert KEY in answer["error"]
    assert len(state.activities) == (1 if processed else 0)
    assert [r.status for r in state.requests] == [fault.status]
    status, _, _ = await post(client, {"activities": [activity(email="next@example.com")]})
    assert status == 200  # the fault applied once


async def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="process"):
        Fault(200)
    with pytest.raises(ValueError, match="answer"):
        Fault(200, answer="teapot")
    with pytest.raises(ValueError, match="2xx"):
        Fault(302, answer="html")
    with pytest.raises(ValueError, match="count"):
        Fault(count=0)
    with pytest.raises(ValueError, match="delay"):
        Fault(delay=-1)


async def test_rate_per_second(client: Client, state: SandboxState, clock: FakeClock) -> None:
    state.rate_per_second = 2
    body = {"activities": [activity()]}
    statuses = [(await post(client, body))[0] for _ in range(2)]
    clock.advance(0.4)
    status, answer, headers = await post(client, body)
    assert statuses == [200, 200]
    assert status == 429
    assert answer == {"error": {"code": "rate-limit", "message": "rate limit", "try-in-seconds": 1}}
    assert "Retry-After" not in headers
    clock.advance(0.6)
    status, _, _ = await post(client, body)
    assert status == 200
    assert state.bans == 0


async def test_latency_is_added(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_sandbox_app(SandboxState(KEY, latency=0.05)))
    started = time.monotonic()
    status, _, _ = await post(client, {"activities": [activity()]})
    assert status == 200
    assert time.monotonic() - started >= 0.05


async def test_not_found_and_method_not_allowed(client: Client) -> None:
    async with client.get("/v1/nothing") as resp:
        assert resp.status == 404
        error_shape(await resp.json(), 404)
    async with client.get(PATH) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        error_shape(await resp.json(), 405)


async def test_control_endpoints(client: Client, state: SandboxState) -> None:
    first = activity(key="k1", created=rfc3339(state.clock()))
    await post(client, {"activities": [first, activity("b@example.com")]})
    await post(client, {"activities": [first]})
    async with client.get("/_sandbox/received", params={"since": "1"}) as resp:
        received = await resp.json()
    assert received["total"] == 2
    assert received["duplicates"] == 1
    [entry] = received["activities"]
    assert entry["index"] == 1
    assert entry["email"] == "b@example.com"
    assert entry["source_ip"] == "203.0.113.7"
    assert entry["activity_id"] == "act:cm:logged-in"
    assert entry["attributes"] == {"str:cm:web-browser": "Firefox"}
    assert (entry["key"], entry["created"]) == (None, None)
    assert entry["time"] == state.clock()
    async with client.get("/_sandbox/received", params={"since": "-1"}) as resp:
        assert resp.status == 400

    async with client.get("/_sandbox/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "requests": 2,
        "activities": 2,
        "duplicates": 1,
        "bans": 0,
        "banned": False,
        "keys_received_twice": 1,
    }

    fault = {"status": 429, "try_in_seconds": 3}
    async with client.post("/_sandbox/faults", json=fault) as resp:
        assert resp.status == 204
    status, answer, _ = await post(client, {"activities": [activity()]})
    assert (status, answer["error"]["try-in-seconds"]) == (429, 3)
    async with client.post("/_sandbox/faults", json={"status": 500, "count": 5}) as resp:
        assert resp.status == 204
    async with client.delete("/_sandbox/faults") as resp:
        assert resp.status == 204
    assert state.pending_faults == 0
    for bad in ({"status": 500, "colour": "red"}, {"count": 0}, [1]):
        async with client.post("/_sandbox/faults", json=bad) as resp:
            assert resp.status == 400
            error_shape(await resp.json(), 400)

    config = {"api_key": "new-key", "latency": 0, "rate_per_second": 100}
    async with client.put("/_sandbox/config", json=config) as resp:
        assert resp.status == 204
    assert (state.api_key, state.latency, state.rate_per_second) == ("new-key", 0.0, 100.0)
    async with client.put("/_sandbox/config", json={"rate_per_second": None}) as resp:
        assert resp.status == 204
    assert state.rate_per_second is None
    assert state.api_key == "new-key"
    bad_configs: list[dict[str, Any]] = [
        {"latency": -1},
        {"api_key": ""},
        {"api_key": "x", "rate_per_second": 0},
    ]
    for bad in bad_configs:
        async with client.put("/_sandbox/config", json=bad) as resp:
            assert resp.status == 400
    assert state.api_key == "new-key"

    async with client.post("/_sandbox/reset") as resp:
        assert resp.status == 204
    assert (state.requests, state.activities, state.duplicates) == ([], [], 0)
    assert state.keys_seen() == {}
    async with client.get("/_sandbox/received") as resp:
        assert await resp.json() == {"total": 0, "duplicates": 0, "activities": []}


async def test_default_state_and_app_key(aiohttp_client: MakeClient) -> None:
    app = create_sandbox_app()
    state = app[SANDBOX_STATE]
    assert state.api_key == "sandbox-key"
    client = await aiohttp_client(app)
    headers = {**HEADERS, "X-Api-Key": "sandbox-key"}
    status, _, _ = await post(client, {"activities": [activity()]}, headers)
    assert status == 200
    state.reset()
    assert state.requests == []


async def test_wait_for() -> None:
    flag: list[bool] = []
    asyncio.get_running_loop().call_later(0.02, flag.append, True)
    await wait_for(lambda: bool(flag), timeout=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"within 0\.05 s"):
        await wait_for(lambda: False, timeout=0.05)
    assert loop.time() - started >= 0.05  # never early (late only on a busy machine)


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("int::v", 1530, True),
        ("int::v", 15.3, False),  # seed 002: a value that cannot be unmarshaled fails
        ("int::v", 15.0, False),  # Go reads no number with a fraction into an int64
        ("int::v", "1530", False),
        ("int::v", 2**63, False),
        ("int::v", True, False),
        ("bol:cm:account-owner", True, True),
        ("bol:cm:account-owner", "yes", False),
        ("bol:cm:account-owner", 1, False),
        ("str:cm:plan", "x" * 255, True),
        ("str:cm:plan", "x" * 256, False),
        ("str:cm:plan", 7, False),
        ("txt:cm:note", "x" * 4000, True),
        ("txt:cm:note", "x" * 4001, False),
        ("dtz:cm:day", {"year": 2020, "month": 5, "day": 26}, True),
        ("dtz:cm:day", {"year": 2020, "month": 2, "day": 30, "timezone": "UTC"}, False),
        ("dtz:cm:day", "2020-05-26", False),
        ("tme:cm:at", "2020-02-17T01:30:17.601Z", True),
        ("tme:cm:at", "17/02/2020", False),
        ("phn:cm:mobile", {"c": "61", "n": "401234567"}, True),
        ("phn:cm:mobile", {"phone": "+61 401 234 567", "parse_with_country_code": True}, True),
        ("phn:cm:mobile", {"n": "9112340345"}, True),  # RudderStack sends it
        ("phn:cm:mobile", {"c": "971", "n": "50 123 4567"}, False),
        ("phn:cm:mobile", {"c": "", "n": ""}, False),
        ("phn:cm:mobile", "+61401234567", False),
        ("geo:cm:place", {"name": "Melbourne"}, True),
        ("geo:cm:place", {}, True),  # RudderStack sends it for every missing trait
        ("geo:cm:place", {"name": "Melbourne", "lat": 1}, False),
        ("geo:cm:place", "Melbourne", False),
        ("sst:cm:tags", ["a", "b"], True),
        ("sst:cm:tags", ["a", 1], False),
        ("obj:cm:cart", {"items": [1, 2]}, True),
        ("obj:cm:cart", [1, 2], False),
        ("str:cm:plan", None, True),  # null leaves the value unset
        ("zzz:cm:unknown", "anything", True),  # not a field name: an unknown attribute
    ],
)
async def test_attribute_values_are_checked_by_type_prefix(
    client: Client, state: SandboxState, name: str, value: Any, ok: bool
) -> None:
    good = activity("good@example.com")
    checked = activity(attributes={name: value})
    status, answer, _ = await post(client, {"activities": [good, checked]})
    assert status == 200
    entry = answer["activities"][1]
    if ok:
        assert entry["status"] == "ingested", entry
    else:
        assert entry["status"] == entry["person_status"] == "invalid"
        assert entry["error"].startswith(f"failed to validate attribute {name}: ")
        assert len(state.activities) == 1


async def test_builtin_person_fields_from_the_recorded_schema(client: Client) -> None:
    fields = {
        "str::email": "lee@example.com",
        "str::name": "Lee Jones",
        "str::postal": "3000",
        "bol::gdpr": True,
        "geo::region": {"name": "Victoria"},
        "str::language": "en-AU",
        "dtz::b": {"year": 1990, "month": 1, "day": 31},
    }
    status, answer, _ = await post(client, {"activities": [activity(fields=fields)]})
    assert status == 200
    assert answer["activities"][0]["status"] == "ingested"
    assert {"str::postal", "bol::gdpr", "str::name"} <= DEFAULT_PERSON_FIELDS
    # Read-only or unknown built-ins stay unknown (the PHP SDK's `str::phone` is not Ortto's).
    for name, value in (("str::phone", "0401234567"), ("int::v", 5)):
        body = {"activities": [activity(fields={"str::email": "a@example.com", name: value})]}
        status, answer, _ = await post(client, body)
        assert status == 400
        assert answer["details"][0]["error"].endswith(f"{name}: Object not found")


async def test_person_field_values_are_type_checked(client: Client) -> None:
    fields = {"str::email": "a@example.com", "geo::city": "Melbourne"}
    status, answer, _ = await post(client, {"activities": [activity(fields=fields)]})
    assert status == 400
    assert answer["details"] == [
        {
            "status": "invalid",
            "error": 'failed to validate field geo::city in schema: geo::city: must be {"name": '
            '"Melbourne"}',
        }
    ]


async def test_custom_person_fields_are_declared_by_config(
    client: Client, state: SandboxState
) -> None:
    body = {"activities": [activity(fields={"str::email": "a@example.com", "str:cm:tier": "a"})]}
    status, answer, _ = await post(client, body)
    assert status == 400
    assert "str:cm:tier: Object not found" in answer["error"]
    async with client.put("/_sandbox/config", json={"person_fields": ["str:cm:tier"]}) as resp:
        assert resp.status == 204
    assert state.custom_person_fields == {"str:cm:tier"}
    status, answer, _ = await post(client, body)
    assert status == 200
    assert answer["activities"][0]["status"] == "ingested"
    for bad in ({"person_fields": "str:cm:tier"}, {"person_fields": ["tier"]}):
        async with client.put("/_sandbox/config", json=bad) as resp:
            assert resp.status == 400
    assert state.custom_person_fields == {"str:cm:tier"}
    body["activities"][0]["fields"]["str:cm:tier"] = 3
    status, answer, _ = await post(client, body)
    assert status == 400
    assert "str:cm:tier" in answer["error"]


async def test_unknown_person_id_is_invalid_known_one_matched(
    client: Client, state: SandboxState
) -> None:
    unknown = {"activity_id": "act:cm:logged-in", "person_id": "00690a5033a2e942cb9ffc00"}
    _, created, _ = await post(client, {"activities": [activity()]})
    made = created["activities"][0]["person_id"]
    known = {"activity_id": "act:cm:logged-in", "person_id": made}
    status, answer, _ = await post(client, {"activities": [unknown, known]})
    assert status == 200
    assert answer["activities"][0] == {
        "status": "invalid",
        "person_status": "invalid",
        "person_id": "00690a5033a2e942cb9ffc00",
        "error": "person 00690a5033a2e942cb9ffc00 not found",
    }
    assert answer["activities"][1]["person_id"] == made
    assert answer["activities"][1]["person_status"] == "matched"
    async with client.put("/_sandbox/config", json={"person_ids": [unknown["person_id"]]}) as r:
        assert r.status == 204
    status, answer, _ = await post(client, {"activities": [unknown]})
    assert answer["activities"][0]["status"] == "ingested"


async def test_queued_answers_echo_person_id(client: Client, state: SandboxState) -> None:
    state.declare_person_ids(["00690a5033a2e942cb9ffc00"])
    async with client.put("/_sandbox/config", json={"answers": "queued"}) as resp:
        assert resp.status == 204
    by_id = {"activity_id": "act:cm:logged-in", "person_id": "00690a5033a2e942cb9ffc00"}
    status, answer, _ = await post(client, {"activities": [activity(), by_id]})
    assert status == 200
    assert answer == {
        "activities": [
            {"status": "queued", "person_status": "queued"},
            {
                "person_id": "00690a5033a2e942cb9ffc00",
                "status": "queued",
                "person_status": "queued",
            },
        ]
    }
    assert len(state.activities) == 2
    async with client.put("/_sandbox/config", json={"answers": "later"}) as resp:
        assert resp.status == 400
    assert state.answers == "queued"
    with pytest.raises(ValueError, match="answers"):
        SandboxState(answers="later")
