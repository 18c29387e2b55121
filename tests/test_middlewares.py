"""The HTTP shell: client IP from trusted proxies only, CORS, errors in Ortto's shape."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.feed import TEST_HEADER, FeedEvent, console_test_token
from gateway.keys import FEED, LIFECYCLE, METRICS, SETTINGS
from gateway.sandbox import SandboxState, wait_for
from tests.conftest import GatewayFactory, refusals, request_line

PATH = "/v1/activities/create"
ACT = {"activity_id": "act:cm:login", "fields": {"str::email": "ip@example.com"}}
SITE = "https://www.example.com"


async def test_forwarded_for_from_untrusted_peer_is_ignored(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(trusted_proxies=("10.0.0.0/8",))
    resp = await client.post(
        PATH, json=ACT, headers={"X-Forwarded-For": "198.51.100.7", "Forwarded": "for=1.2.3.4"}
    )
    assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].source_ip == "127.0.0.1"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
        ({"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}, "198.51.100.7"),
        ({"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}, "198.51.100.7"),
        ({"Forwarded": 'for="[2001:db8::1]:443"'}, "2001:db8::1"),
        ({"X-Forwarded-For": "garbage"}, "127.0.0.1"),
    ],
)
async def test_forwarded_for_from_trusted_proxy(
    make_gateway: GatewayFactory,
    sandbox_state: SandboxState,
    headers: dict[str, str],
    expected: str,
) -> None:
    client = await make_gateway()
    resp = await client.post(PATH, json=ACT, headers=headers)
    assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].source_ip == expected


async def test_browser_source_ip_is_overwritten(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    body = {**ACT, "location": {"source_ip": "8.8.8.8"}}
    assert (await client.post(PATH, json=body)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].source_ip == "127.0.0.1"


async def test_cors_preflight_for_allowed_origin(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(allowed_origins=(SITE,))
    resp = await client.options(
        PATH,
        headers={
            "Origin": SITE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == SITE
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in resp.headers["Vary"]


async def test_cors_headers_on_errors_too(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(allowed_origins=(SITE,))
    resp = await client.post(
        PATH, data=b"{", headers={"Origin": SITE, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert resp.headers["Access-Control-Allow-Origin"] == SITE
    assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]


async def test_refused_origin_is_403_and_not_forwarded(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(allowed_origins=(SITE,))
    resp = await client.post(PATH, json=ACT, headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    body = await resp.json()
    assert body["code"] == 403
    resp = await client.options(
        PATH, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert resp.status == 403
    # A request that was accepted afterwards proves the queue was idle, not slow.
    assert (await client.post(PATH, json=ACT, headers={"Origin": SITE})).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert len(sandbox_state.requests) == 1


async def test_preflight_refuses_other_methods(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(allowed_origins=(SITE,))
    resp = await client.options(
        PATH, headers={"Origin": SITE, "Access-Control-Request-Method": "DELETE"}
    )
    assert resp.status == 403


async def test_a_same_origin_preflight_names_the_origin_list(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(allowed_origins=(SITE,))
    origin = str(client.make_url("")).rstrip("/")
    resp = await client.options(
        PATH, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert "not in the allowed origins" in error
    assert "method" not in error


async def test_same_origin_request_is_allowed(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    origin = str(client.make_url("")).rstrip("/")
    resp = await client.post(PATH, json=ACT, headers={"Origin": origin})
    assert resp.status == 202


BAD_INPUTS = [
    (b"{", "application/json", 400, "malformed"),
    (b"", "application/json", 400, "empty"),
    (b"[]", "application/json", 400, None),
    (b'"hello"', "application/json", 400, None),
    (b'{"activities": "x"}', "application/json", 400, "activities"),
    (b'{"activities": []}', "application/json", 400, "activities"),
    (b"<xml/>", "application/xml", 415, None),
    (
        b'{"activity_id": "act:cm:login", "fields": {"str::email": 1}}',
        "application/json",
        400,
        "str::email",
    ),
    (
        b'{"activity_id": "act:cm:login", "fields": {"str::email": "a@b.c"}, "attributes": '
        b'{"int:cm:n": 99999999999999999999999}}',
        "application/json",
        400,
        "int:cm:n",
    ),
    (
        b'{"activity_id": "act:cm:login", "fields": {"str::email": "a@b.c"}, "attributes": '
        b'{"int:cm:n": true}}',
        "application/json",
        400,
        "int:cm:n",
    ),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400, None),
    (
        b'{"activity_id": "act:cm:login", "fields": {"str::email": "a@b.c"}, "attributes": '
        b'{"obj:cm:deep": ' + b'{"a":' * 60 + b"1" + b"}" * 60 + b"}}",
        "application/json",
        400,
        None,
    ),
    (
        b'{"activities": [' + b",".join([b'{"activity_id": "act:cm:login"}'] * 101) + b"]}",
        "application/json",
        400,
        "100",
    ),
    (
        b'{"activity_id": "act:cm:login", "fields": {"str::email": "a@b.c"}, '
        b'"attributes": {"str:cm:x": NaN}}',
        "application/json",
        400,
        None,
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "needle"), BAD_INPUTS)
async def test_bad_input_is_a_precise_4xx_and_nothing_is_forwarded(
    make_gateway: GatewayFactory,
    sandbox_state: SandboxState,
    body: bytes,
    content_type: str,
    status: int,
    needle: str | None,
) -> None:
    client = await make_gateway(strict=True)  # a bad optional value is a 400 too
    resp = await client.post(PATH, data=body, headers={"Content-Type": content_type})
    assert resp.status == status, await resp.text()
    data = await resp.json()
    assert set(data) >= {"request_id", "code", "error"}
    assert data["code"] == status
    if needle:
        assert needle in data["error"]
    # The server is still up and serves the next request.
    assert (await client.get("/healthz")).status == 200
    assert sandbox_state.requests == []


async def test_a_bad_optional_value_is_dropped_and_told_by_default(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    body = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "a@b.c"},
        "attributes": {"int:cm:n": True, "str:cm:plan": "pro"},
    }
    resp = await client.post(PATH, json=body)
    assert resp.status == 202, await resp.text()
    (entry,) = (await resp.json())["activities"]
    assert [(w["field"], w["reason"]) for w in entry["warnings"]] == [
        ("attributes.int:cm:n", "dropped")
    ]
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].activity["attributes"] == {"str:cm:plan": "pro"}


async def test_oversize_body_is_413(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(max_body_bytes=1024)
    body = b'{"activity_id": "act:cm:login", "attributes": {"txt:cm:x": "' + b"x" * 2000 + b'"}}'
    resp = await client.post(PATH, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["code"] == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    resp = await client.post(PATH, data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413


@pytest.mark.parametrize(
    ("coding", "body", "status", "needle"),
    [
        ("gzip", gzip.compress(orjson.dumps(ACT)), 202, None),
        ("deflate", zlib.compress(orjson.dumps(ACT)), 202, None),
        ("identity", orjson.dumps(ACT), 202, None),
        ("gzip", b"not gzip at all", 400, "could not be read"),
        ("gzip", gzip.compress(orjson.dumps(ACT))[:-12], 400, None),  # truncated stream
        ("x-foo", orjson.dumps(ACT), 415, "Content-Encoding"),
        ("gzip, gzip", gzip.compress(gzip.compress(orjson.dumps(ACT))), 415, None),
    ],
)
async def test_content_codings(
    make_gateway: GatewayFactory, coding: str, body: bytes, status: int, needle: str | None
) -> None:
    client = await make_gateway()
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    data = await resp.json()
    if status != 202:
        assert data["code"] == status
        if needle:
            assert needle in data["error"]


async def test_a_gzip_bomb_is_413(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    bomb = gzip.compress(b"0" * 50_000_000)  # about 50 KB on the wire
    assert len(bomb) < 64 * 1024
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post(PATH, data=bomb, headers=headers)
    assert resp.status == 413
    assert (await resp.json())["code"] == 413


async def _raw_exchange(
    client: TestClient[Any, Any], head: bytes, body: bytes
) -> tuple[bool, bytes]:
    """Send `head`, and `body` only if the server says 100 Continue.

    Returns whether it did, and the head of its final answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            invited = status_line.startswith(b"HTTP/1.1 100")
            if invited:
                await reader.readline()  # the blank line after the interim answer
                writer.write(body)
                status_line = await reader.readline()
            rest = await reader.readuntil(b"\r\n\r\n")
        return invited, status_line + rest
    finally:
        writer.close()


async def test_expect_continue_is_refused_for_an_oversize_body(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway(max_body_bytes=1024)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: 999999\r\n\r\n"
    ).encode()
    invited, answer = await _raw_exchange(client, head, b"x" * 999999)
    # The final answer comes first: the client never uploads the body.
    assert not invited
    assert answer.startswith(b"HTTP/1.1 413"), answer


async def test_expect_continue_invites_a_body_that_fits(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    body = orjson.dumps(ACT)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    invited, answer = await _raw_exchange(client, head, body)
    assert invited
    assert answer.startswith(b"HTTP/1.1 202"), answer
    await wait_for(lambda: len(sandbox_state.activities) == 1)


@pytest.mark.parametrize("case", ["draining", "coding"])
async def test_expect_continue_is_not_sent_when_the_answer_is_a_refusal(
    make_gateway: GatewayFactory, case: str
) -> None:
    client = await make_gateway()
    body = orjson.dumps(ACT)
    extra = ""
    if case == "draining":
        client.app[LIFECYCLE].draining = True
    else:
        extra = "Content-Encoding: x-foo\r\n"
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    invited, answer = await _raw_exchange(client, head, body)
    assert not invited
    assert answer.startswith(b"HTTP/1.1 503" if case == "draining" else b"HTTP/1.1 415"), answer


async def test_an_unknown_expectation_is_ignored(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    resp = await client.post(PATH, json=ACT, headers={"Expect": "something-else"})
    assert resp.status == 202  # not aiohttp's plain-text 417


async def test_draining_answers_503_but_health_answers(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    client.app[LIFECYCLE].draining = True
    resp = await client.post(PATH, json=ACT)
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503


async def test_shim_is_served_with_etag(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    resp = await client.get("/ortto-relay.js")
    assert resp.status == 200
    assert resp.content_type == "application/javascript"
    assert "ap3c" in await resp.text()
    etag = resp.headers["ETag"]
    assert "max-age" in resp.headers["Cache-Control"]
    resp = await client.get("/ortto-relay.js", headers={"If-None-Match": etag})
    assert resp.status == 304


async def test_request_id_header(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    resp = await client.post(PATH, data=b"{", headers={"Content-Type": "application/json"})
    assert resp.headers["X-Request-Id"] == (await resp.json())["request_id"]


async def test_a_refused_origin_says_origin_not_allowed(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(allowed_origins=(SITE,))
    resp = await client.post(PATH, json=ACT, headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    assert (await resp.json())["reason"] == "origin_not_allowed"
    assert request_line(caplog)["reason"] == "origin_not_allowed"
    assert refusals(client, "other", "origin_not_allowed") == 1
    resp = await client.options(
        PATH, headers={"Origin": SITE, "Access-Control-Request-Method": "DELETE"}
    )
    assert (await resp.json())["reason"] == "preflight_not_allowed"
    assert refusals(client, "other", "preflight_not_allowed") == 1


@pytest.mark.parametrize(
    ("body", "status", "reason", "field"),
    [
        (b"{not json", 400, "malformed_body", None),
        (b'{"activity_id": "act:cm:nope", "fields": {}}', 404, "unknown_activity", "activity_id"),
        (
            b'{"activity_id": "act:cm:login", "fields": {"str::email": "a@b.c"},'
            b' "attributes": {"int:cm:n": true}}',
            400,
            "invalid_field",
            "attributes.int:cm:n",
        ),
        (
            b'{"activity_id": "act:cm:login", "x" : 1' + b" " * 2000 + b"}",
            413,
            "body_too_large",
            None,
        ),
    ],
)
async def test_a_refused_request_says_why_in_the_answer_the_log_and_the_counter(
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    status: int,
    reason: str,
    field: str | None,
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(strict=True, max_body_bytes=1024)
    resp = await client.post(PATH, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status, await resp.text()
    answer = await resp.json()
    assert answer["reason"] == reason and answer.get("field") == field
    line = request_line(caplog)
    assert line["reason"] == reason and line.get("field") == field
    assert "a@b.c" not in orjson.dumps(line).decode()
    # Counted once: per activity when the activity is known, else as `other`.
    activity_id = "act:cm:login" if reason == "invalid_field" else "other"
    assert refusals(client, activity_id, reason) == 1


async def test_a_dropped_value_is_a_warning_with_its_code(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway()
    body = {**ACT, "attributes": {"int:cm:n": True}}
    resp = await client.post(PATH, json=body)
    assert resp.status == 202
    (entry,) = (await resp.json())["activities"]
    assert [w["code"] for w in entry["warnings"]] == ["invalid_field"]
    line = request_line(caplog)
    assert line["warnings"] == {"invalid_field": 1} and "reason" not in line
    assert refusals(client, "act:cm:login", "invalid_field") == 0
    labels = {"activity_id": "act:cm:login", "reason": "invalid_field"}
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("ortto_gateway_warnings_total", labels) == 1


async def test_shutting_down_and_unknown_paths_say_why(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway()
    resp = await client.get("/nowhere")
    assert (resp.status, (await resp.json())["reason"]) == (404, "no_route")
    assert refusals(client, "other", "no_route") == 1
    client.app[LIFECYCLE].draining = True
    resp = await client.post(PATH, json=ACT)
    assert (await resp.json())["reason"] == "shutting_down"
    assert request_line(caplog)["reason"] == "shutting_down"
    assert refusals(client, "other", "shutting_down") == 1


# -- the console's feed


async def request_events(client: TestClient[Any, Any]) -> list[FeedEvent]:
    return [e for e in await client.app[FEED].recent() if e["kind"] == "request"]


async def test_a_refused_origin_is_published_as_a_request_event(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway(allowed_origins=(SITE,), ip_anonymize=True)
    resp = await client.post(
        PATH,
        json=ACT,
        headers={"Origin": "https://evil.example", "X-Forwarded-For": "198.51.100.77"},
    )
    assert resp.status == 403
    (event,) = await request_events(client)
    assert (event["outcome"], event["reason"], event["field"]) == (
        "refused",
        "origin_not_allowed",
        None,
    )
    assert event["request_id"] == resp.headers["X-Request-Id"]
    assert event["client"] == "198.51.100.0"
    assert "test" not in event
    # Refused per activity by the relay: activity events, no request event.
    assert (
        await client.post(PATH, json={"activity_id": "act:cm:login"}, headers={"Origin": SITE})
    ).status == 400
    assert len(await request_events(client)) == 1


async def test_malformed_json_is_a_request_event_marked_as_a_test(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway()
    token = console_test_token(client.app[SETTINGS])
    resp = await client.post(
        PATH, data=b"{", headers={"Content-Type": "application/json", TEST_HEADER: token}
    )
    assert resp.status == 400
    (event,) = await request_events(client)
    assert event["reason"] == "malformed_body" and event["test"] is True
    assert event["client"] == "127.0.0.1"
