"""Abuse resistance over HTTP: signed identity, field policy, hostile input, privacy."""

from __future__ import annotations

import asyncio
import random
import shutil
import string
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import ActivitySpec
from gateway.identity import sign_identity
from gateway.limits import MemoryStore, Rule
from gateway.sandbox import SandboxState, wait_for
from gateway.server import runner_options
from tests.conftest import API_KEY, GatewayFactory, base_settings

PATH = "/v1/activities/create"
SECRET = "a-very-long-identity-secret-for-tests-0123456789"
OLD_SECRET = "the-previous-identity-secret-still-verifying-99"
EMAIL = "chris@example.com"


def act(email: str = EMAIL, **extra: Any) -> dict[str, Any]:
    return {"activity_id": "act:cm:login", "fields": {"str::email": email}, **extra}


# -- signed identity


async def test_signed_identity_required(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(identity_secrets=(SECRET, OLD_SECRET), identity_required=True)
    expires = int(time.time()) + 3600

    resp = await client.post(PATH, json=act())
    assert resp.status == 401
    assert (await resp.json())["code"] == 401
    forged = sign_identity(EMAIL, "an-attacker-guess-" + "z" * 30, expires)
    assert (await client.post(PATH, json=act(identity=forged))).status == 401
    expired = sign_identity(EMAIL, SECRET, int(time.time()) - 5)
    assert (await client.post(PATH, json=act(identity=expired))).status == 401
    other = sign_identity("alex@example.com", SECRET, expires)
    assert (await client.post(PATH, json=act(identity=other))).status == 401

    good = sign_identity(EMAIL, SECRET, expires)
    assert (await client.post(PATH, json=act(identity=good))).status == 202
    rotated = sign_identity(EMAIL, OLD_SECRET, expires)
    assert (await client.post(PATH, json=act(identity=rotated))).status == 202
    # One token for the whole body applies to every activity in it.
    body = {"identity": good, "activities": [act(), act("ALEX@example.com")]}
    resp = await client.post(PATH, json=body)
    assert resp.status == 202
    statuses = [e["status"] for e in (await resp.json())["activities"]]
    assert statuses == ["queued", "invalid"]

    await wait_for(lambda: len(sandbox_state.activities) == 3)
    assert all("identity" not in a.activity for a in sandbox_state.activities)


async def test_signed_identity_per_activity(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    client = await make_gateway(identity_secrets=(SECRET,))
    # The per-activity switch comes from the catalogue.
    client2 = await make_gateway(
        spool_path=str(tmp_path / "second.sqlite3"),  # one gateway per spool file
        identity_secrets=(SECRET,),
        activities={
            "act:cm:login": ActivitySpec("act:cm:login", signed_identity=True),
            "act:cm:signup": ActivitySpec("act:cm:signup"),
        },
    )
    assert (await client2.post(PATH, json=act())).status == 401
    signup = {"activity_id": "act:cm:signup", "fields": {"str::email": EMAIL}}
    assert (await client2.post(PATH, json=signup)).status == 202
    assert (await client.post(PATH, json=act())).status == 202


def test_readme_python_helper_matches() -> None:
    # The helper printed in the README, run as written.
    import base64
    import hashlib
    import hmac

    def ortto_identity(email: str, secret: str, ttl: int = 3600) -> str:
        expires = int(time.time()) + ttl
        message = f"v1.{expires}.{email.strip().lower()}".encode()
        mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        return f"v1.{expires}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    token = ortto_identity(" Chris@Example.com", SECRET)
    expires = int(token.split(".")[1])
    assert token == sign_identity(EMAIL, SECRET, expires)


NODE_HELPER = """
const crypto = require("crypto");
function orttoIdentity(email, secret, ttl = 3600, now = Date.now()) {
  const expires = Math.floor(now / 1000) + ttl;
  const mac = crypto.createHmac("sha256", secret)
    .update(`v1.${expires}.${email.trim().toLowerCase()}`).digest("base64url");
  return `v1.${expires}.${mac}`;
}
process.stdout.write(orttoIdentity(process.argv[1], process.argv[2], 0, 1800000000000));
"""


def test_readme_node_helper_matches() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the README's Node helper is checked where it is)")
    out = subprocess.run(
        [node, "-e", NODE_HELPER, " Chris@Example.com", SECRET],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == sign_identity(EMAIL, SECRET, 1_800_000_000)


# -- field policy


async def test_undeclared_attributes_dropped_when_not_strict(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, tmp_path: Path
) -> None:
    spec = ActivitySpec("act:cm:login", attributes=frozenset({"str:cm:plan"}), strict=False)
    client = await make_gateway(activities={"act:cm:login": spec})
    body = act(attributes={"str:cm:plan": "pro", "str:cm:sneaky": "x"})
    assert (await client.post(PATH, json=body)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].activity["attributes"] == {"str:cm:plan": "pro"}

    strict = await make_gateway(
        activities={"act:cm:login": replace(spec, strict=None)},
        strict=True,
        spool_path=str(tmp_path / "second.sqlite3"),  # one gateway per spool file
    )
    resp = await strict.post(PATH, json=body)
    assert resp.status == 400
    assert "str:cm:sneaky" in (await resp.json())["error"]


@pytest.mark.parametrize("field", ["bol::p", "bol::sp", "str::s-ctx", "str::u-ctx"])
async def test_subscription_fields_never_from_the_browser(
    make_gateway: GatewayFactory, field: str
) -> None:
    client = await make_gateway()
    value: Any = False if field.startswith("bol") else "x"
    for body in (
        act(fields={"str::email": EMAIL, field: value}),
        act(attributes={field: value}),
    ):
        body.setdefault("fields", {"str::email": EMAIL})
        resp = await client.post(PATH, json=body)
        assert resp.status == 400
        assert field in (await resp.json())["error"]


async def test_subscription_field_when_explicitly_allowed(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    spec = ActivitySpec(
        "act:cm:login", person_fields=frozenset({"str::email", "bol::p", "str::u-ctx"})
    )
    client = await make_gateway(activities={"act:cm:login": spec})
    body = act(fields={"str::email": EMAIL, "bol::p": False, "str::u-ctx": "footer form"})
    assert (await client.post(PATH, json=body)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].activity["fields"]["bol::p"] is False


# -- privacy


@pytest.mark.parametrize(
    ("xff", "expected"),
    [("203.0.113.77", "203.0.113.0"), ("2001:db8:1234:5678::9", "2001:db8:1234::")],
)
async def test_ip_anonymize(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, xff: str, expected: str
) -> None:
    client = await make_gateway(ip_anonymize=True)
    resp = await client.post(PATH, json=act(), headers={"X-Forwarded-For": xff})
    assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].source_ip == expected


async def test_ipv6_clients_share_their_64_for_the_ip_limit(make_gateway: GatewayFactory) -> None:
    from gateway.config import parse_rate

    client = await make_gateway(ip_limit=parse_rate("3/1h"))
    for i in range(3):
        resp = await client.post(
            PATH, json=act(f"p{i}@example.com"), headers={"X-Forwarded-For": f"2001:db8::{i + 1}"}
        )
        assert resp.status == 202
    resp = await client.post(
        PATH, json=act("p9@example.com"), headers={"X-Forwarded-For": "2001:db8::ffff:1"}
    )
    assert resp.status == 429
    resp = await client.post(
        PATH, json=act("p9@example.com"), headers={"X-Forwarded-For": "2001:db8:0:1::1"}
    )
    assert resp.status == 202


# -- hostile input


async def test_referer_from_a_foreign_site_is_refused(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(allowed_origins=("https://www.example.com",))
    resp = await client.post(PATH, json=act(), headers={"Referer": "https://evil.example/x"})
    assert resp.status == 403
    resp = await client.post(
        PATH, json=act(), headers={"Referer": "https://www.example.com/page?q=1"}
    )
    assert resp.status == 202


async def test_header_values_are_not_echoed_raw(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    evil = "https://x.example/<script>alert(1)</script>"
    resp = await client.post(PATH, json=act(), headers={"Origin": evil})
    assert resp.status == 403
    # The origin is named in a JSON string, never as HTML, and never in a header.
    assert resp.content_type == "application/json"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert all("<script>" not in v for v in resp.headers.values())
    assert "evil" not in resp.headers.get("Access-Control-Allow-Origin", "")


async def test_concurrency_limit_answers_503(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.latency = 0.5  # sync mode: each request waits for the upstream
    client = await make_gateway(delivery="sync", max_concurrent=3)
    bodies = [act(f"c{i}@example.com") for i in range(8)]
    responses = await asyncio.gather(*(client.post(PATH, json=b) for b in bodies))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 3
    assert statuses.count(503) == 5
    assert all(r.headers.get("Retry-After") for r in responses if r.status == 503)


async def test_slowloris_is_cut_off_while_others_are_served(
    aiohttp_server: Any, aiohttp_client: Any, sandbox: TestServer, tmp_path: Path
) -> None:
    settings = base_settings(tmp_path, str(sandbox.make_url("")), read_timeout=1.0)
    server = await aiohttp_server(create_app(settings), **runner_options(settings))
    client = await aiohttp_client(server)
    host, port = server.host, server.port

    async def slow_body() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode())
        started = time.monotonic()
        try:
            while time.monotonic() - started < 10:
                writer.write(b" ")  # one byte at a time, never the whole body
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1000), 0.3)
                except TimeoutError:
                    continue
                if data or reader.at_eof():
                    return data
        except ConnectionError:
            pass
        finally:
            writer.close()
        return b""

    async def slow_headers() -> bool:
        """True when the server hangs up before the trickled headers are complete."""
        reader, writer = await asyncio.open_connection(host, port)
        try:
            # 200 bytes at one per 0.2 s or slower: 40 s at least, where the server's
            # header timeout is 1 s. Whether it cut the line is the check, not a clock.
            for char in f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode() + b"a" * 200:
                writer.write(bytes([char]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(100), 0.2) == b"":
                        return True
                except TimeoutError:
                    continue
        except ConnectionError:
            return True
        finally:
            writer.close()
        return False

    body_task = asyncio.create_task(slow_body())
    headers_task = asyncio.create_task(slow_headers())
    # A normal client is served meanwhile.
    assert (await client.post(PATH, json=act())).status == 202
    answer = await body_task
    assert b"408" in answer.split(b"\r\n", 1)[0]
    assert await headers_task


async def test_fuzz_http_surface(make_gateway: GatewayFactory, sandbox_state: SandboxState) -> None:
    """Random methods, paths, headers and bodies: no 5xx, nothing invalid forwarded."""
    client = await make_gateway(max_body_bytes=8192)
    rng = random.Random(20261124)
    valid_body = orjson.dumps(act())
    pieces = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"activities"',
        b'"activity_id"',
        b'"act:cm:login"',
        b":",
        b",",
        b"null",
        b"true",
        b"1e999",
        b"-0",
        b'"\\ud800"',
        b"\xff",
        b"\x00",
        b'"str::email"',
        b'"a@b.c"',
        b'"fields"',
        b'"attributes"',
        b'"location"',
        b'{"source_ip":"1.1.1.1"}',
        b'"bol::p"',
        b"9" * 30,
    ]
    methods = ["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    paths = [
        PATH,
        "/",
        "/v1/activities/create/",
        "/ortto-relay.js",
        "/healthz",
        "/readyz",
        "/metrics",
        "/%00",
        "/v1/../v1/activities/create",
        "/" + "a" * 2000,
    ]
    content_types = [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "application/json; charset=latin-1",
    ]
    accepted_entries = 0
    tracemalloc.start()
    baseline = None
    for case in range(600):
        if case == 100:
            baseline = tracemalloc.get_traced_memory()[0]
        method = rng.choice(methods) if rng.random() < 0.3 else "POST"
        path = rng.choice(paths) if rng.random() < 0.3 else PATH
        if rng.random() < 0.15:
            body = valid_body.replace(b"chris", f"u{case}".encode())
        else:
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        headers = {"Content-Type": rng.choice(content_types)}
        if rng.random() < 0.2:
            headers["X-Forwarded-For"] = "".join(
                rng.choice(string.printable[:94]) for _ in range(30)
            )
        if rng.random() < 0.1:
            headers["Origin"] = rng.choice(["null", "https://evil.example", "http://127.0.0.1"])
        resp = await client.request(method, path, data=body, headers=headers)
        payload = await resp.read()
        assert resp.status < 500, (method, path, body, payload)
        if resp.status in (200, 202) and path == PATH and method == "POST":
            data = orjson.loads(payload)
            accepted_entries += sum(e.get("status") == "queued" for e in data["activities"])
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert baseline is not None
    assert current - baseline < 5 * 1024 * 1024  # no growth with the number of requests
    assert accepted_entries > 10
    await wait_for(lambda: len(sandbox_state.activities) == accepted_entries)
    assert (await client.get("/healthz")).status == 200
    assert all(API_KEY not in r.body.decode("utf-8", "replace") for r in sandbox_state.requests)


async def test_limiter_memory_bounded_under_a_flood_of_unique_people() -> None:
    evictions = 0

    def count(n: int) -> None:
        nonlocal evictions
        evictions += n

    store = MemoryStore(max_keys=10_000, on_evict=count)
    tracemalloc.start()
    now = 1_800_000_000.0
    for i in range(100_000):
        rules = [Rule(f"p|act:cm:login|e:flood{i}@example.com", 10, 86400.0)]
        await store.acquire(rules, now + i * 0.001)
        if i == 20_000:
            at_bound = tracemalloc.get_traced_memory()[0]
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert 5_000 <= store.key_count() <= 10_000
    assert evictions + store.key_count() == 100_000  # every forgotten key was counted
    assert end - at_bound < 512 * 1024  # flat once the bound is reached
