"""The operator console: only on the metrics listener, its stream, tokens and panels."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway import console as console_module
from gateway.app import create_app, create_metrics_app
from gateway.config import ConfigError, HostPort, Settings, load_settings
from gateway.console import CSRF_HEADER
from gateway.console_core import (
    console_off_reason,
    host_allowed,
    host_of,
    is_loopback,
    last_event_id,
    mask_emails,
    sse_event,
)
from gateway.console_state import Console, PublicAddress
from gateway.feed import MemoryFeed
from gateway.keys import FEED
from gateway.metrics import Metrics
from gateway.sandbox import SandboxState, wait_for
from gateway.server import serve
from gateway.spool import Spool
from tests.conftest import API_KEY, base_settings, forwarded
from tests.spool_support import to_queue

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
DEADLINE = 10.0
TOKEN_META = re.compile(r'<meta name="console-token" content="([0-9a-f]+)">')


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return base_settings(tmp_path, "http://127.0.0.1:9")


def served_settings(tmp_path: Path, upstream: str, **overrides: Any) -> Settings:
    """Settings for a gateway served on free loopback ports, with an allowed origin."""
    return base_settings(
        tmp_path,
        upstream,
        listen=HostPort("127.0.0.1", 0),
        metrics_listen=HostPort("127.0.0.1", 0),
        allowed_origins=("https://shop.example",),
        **overrides,
    )


async def console_client(
    aiohttp_client: ClientFactory,
    settings: Settings,
    feed: MemoryFeed | None = None,
    registry: CollectorRegistry | None = None,
) -> Client:
    registry = registry or CollectorRegistry()
    console = Console(settings, feed or MemoryFeed(), registry, PublicAddress("127.0.0.1"))
    return await aiohttp_client(create_metrics_app(registry, console=console))


async def session_token(client: Client) -> str:
    """Open the page as a browser would: the session cookie is kept, its token returned."""
    async with client.get("/console") as resp:
        assert resp.status == 200
        found = TOKEN_META.search(await resp.text())
    assert found is not None
    return found.group(1)


# -- pure parts


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_console_off_reason(settings: Settings) -> None:
    assert console_off_reason(settings) is None
    assert console_off_reason(replace(settings, console=False)) == "GATEWAY_CONSOLE is false"
    public = replace(settings, metrics_listen=HostPort("0.0.0.0", 9108))
    assert "GATEWAY_CONSOLE_TOKEN" in (console_off_reason(public) or "")
    assert console_off_reason(replace(public, console_token="t" * 24)) is None


def test_sse_framing_and_last_event_id() -> None:
    assert (
        sse_event({"seq": 7, "kind": "request"}) == b'id: 7\ndata: {"seq":7,"kind":"request"}\n\n'
    )
    assert last_event_id("12") == 12
    assert last_event_id("x1") is None
    assert last_event_id(None) is None


def test_mask_emails() -> None:
    masked = mask_emails({"fields": {"str::email": "jane.doe@example.com"}, "n": ["a@b.io", 3]})
    assert masked == {"fields": {"str::email": "****@example.com"}, "n": ["****@b.io", 3]}


# -- where it is served


@pytest.mark.integration  # serves real listeners
async def test_public_listener_never_serves_the_console(tmp_path: Path) -> None:
    """`serve`: the console on the metrics listener; /console and its routes 404 on the public."""
    settings = served_settings(tmp_path, "http://127.0.0.1:9")
    async with running(settings) as (public, private), aiohttp.ClientSession() as session:
        for path in (
            "/console",
            "/console/",
            "/console/events",
            "/console/console.js",
            "/console/api/state",
            "/console/api/dead-letters",
        ):
            async with session.get(public + path) as resp:
                assert resp.status == 404, path
                assert "ortto-gateway console" not in await resp.text()
        async with session.post(
            public + "/console/api/dead-letters/purge", json={"all": True}
        ) as resp:
            assert resp.status in (404, 405)
        async with session.get(private + "/console") as resp:
            assert resp.status == 200
            assert "ortto-gateway console" in await resp.text()
        async with session.get(private + "/console/api/state") as resp:
            assert resp.status == 200


async def test_page_security_headers(aiohttp_client: ClientFactory, settings: Settings) -> None:
    client = await console_client(aiohttp_client, settings)
    async with client.get("/console") as resp:
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "<script>" not in await resp.text()  # the script is a file (CSP)
    async with client.get("/console/console.js") as resp:
        assert resp.status == 200
        assert "EventSource" in await resp.text()


# -- the stream


async def read_event(resp: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    """The next event of a stream (comments skipped): its id and data."""
    event_id, data = 0, None
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), DEADLINE)).decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and data is not None:
            return event_id, data


async def test_stream_sends_recent_events_then_new_ones(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    feed = MemoryFeed()
    feed.publish({"kind": "activity", "outcome": "accepted", "activity_id": "act:cm:login"})
    client = await console_client(aiohttp_client, settings, feed)
    async with client.get("/console/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await read_event(resp)
        assert first[0] == 1 and first[1]["outcome"] == "accepted"
        feed.publish(
            {"kind": "activity", "outcome": "refused", "reason": "person_limit", "request_id": "r2"}
        )
        second = await read_event(resp)
        assert second[0] == 2
        assert second[1]["reason"] == "person_limit" and second[1]["request_id"] == "r2"
    feed.publish({"kind": "request", "outcome": "refused", "reason": "origin_not_allowed"})
    # A reconnecting EventSource gets only what it missed.
    async with client.get("/console/events", headers={"Last-Event-ID": "2"}) as resp:
        assert (await read_event(resp))[1]["reason"] == "origin_not_allowed"


@pytest.mark.integration  # serves real listeners
async def test_shutdown_ends_open_streams(tmp_path: Path) -> None:
    """An open stream does not hold up the metrics listener's shutdown (60 s by default)."""
    settings = served_settings(tmp_path, "http://127.0.0.1:9")
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session, running(settings, stop=stop) as (_, private):
        resp = await session.get(private + "/console/events")
        assert resp.status == 200
        stop.set()
        # The stream ends (EOF) once the gateway stops, well before aiohttp's 60 s.
        rest = await asyncio.wait_for(resp.content.read(), 30)
        assert isinstance(rest, bytes)
        resp.release()


# -- tokens


async def test_posts_need_the_session_token(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    client = await console_client(aiohttp_client, settings)
    path = "/console/api/dead-letters/purge"
    async with client.post(path, json={"all": True}) as resp:
        assert resp.status == 403
        body = await resp.json()
        assert set(body) == {"request_id", "code", "error"} and body["code"] == 403
    token = await session_token(client)
    async with client.post(path, json={"all": True}, headers={CSRF_HEADER: "0" * 64}) as resp:
        assert resp.status == 403
    async with client.post(path, json={"all": True}, headers={CSRF_HEADER: token}) as resp:
        assert resp.status == 200, await resp.text()
    # The token belongs to the session (cookie): another session's token is refused.
    other = await console_client(aiohttp_client, settings)
    await session_token(other)
    async with other.post(path, json={"all": True}, headers={CSRF_HEADER: token}) as resp:
        assert resp.status == 403


async def test_console_token_guards_every_route(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    secret = "console-token-0123456789abcdef"
    client = await console_client(aiohttp_client, replace(settings, console_token=secret))
    for path in ("/console", "/console/events", "/console/api/state", "/console/console.js"):
        async with client.get(path) as resp:
            assert resp.status == 401, path
    async with client.get("/console") as resp:
        assert 'name="token"' in await resp.text()  # the login form
    bearer = {"Authorization": f"Bearer {secret}"}
    async with client.get("/console/api/state", headers=bearer) as resp:
        assert resp.status == 200
        assert secret not in await resp.text()
    async with client.post("/console/login", data={"token": "wrong"}) as resp:
        assert resp.status == 401
    async with client.post("/console/login", data={"token": secret}) as resp:
        assert resp.status == 200  # followed the redirect to the page, cookie kept
        assert "ortto-gateway console" in await resp.text()
    for cookie in client.session.cookie_jar:
        assert secret not in cookie.value
    async with client.get("/console/api/state") as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:  # the metrics stay as they were
        assert resp.status == 200


async def test_off_when_not_loopback_without_token(
    aiohttp_client: ClientFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    exposed = replace(settings, metrics_listen=HostPort("0.0.0.0", 9108))
    with caplog.at_level(logging.WARNING, "gateway.console"):
        client = await console_client(aiohttp_client, exposed)
    assert any("console off" in r.getMessage() for r in caplog.records)
    async with client.get("/console") as resp:
        assert resp.status == 404
    async with client.get("/metrics") as resp:
        assert resp.status == 200
    guarded = await console_client(aiohttp_client, replace(exposed, console_token="t" * 24))
    async with guarded.get("/console") as resp:
        assert resp.status == 401
    off = await console_client(aiohttp_client, replace(settings, console=False))
    async with off.get("/console") as resp:
        assert resp.status == 404


# -- panels


async def test_settings_masked_and_the_key_in_no_answer(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    feed = MemoryFeed()
    record = forwarded(
        "k1",
        {"activity_id": "act:cm:login", "fields": {"str::email": "jane@example.com"}},
        {"echo": f"X-Api-Key: {API_KEY}"},  # an upstream echoing the key
    )
    feed.record_forward("k1", lambda: record)
    metrics = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
    metrics.spool_depth.set(3)
    metrics.delivery_paused.labels("auth").set(1)
    client = await console_client(aiohttp_client, settings, feed, metrics.registry)
    texts = []
    async with client.get("/console/api/state") as resp:
        state = await resp.json()
        texts.append(json.dumps(state))
    assert state["settings"]["api_key"].startswith("****(")
    assert sorted(state["activities"]) == sorted(settings.activities)
    assert state["delivery"]["spool_depth"] == 3
    assert state["delivery"]["delivery_paused"]["auth"] == 1
    async with client.get("/console/api/forwarded/k1") as resp:
        shown = await resp.json()
        texts.append(json.dumps(shown))
    assert shown["headers"]["X-Api-Key"] == "****"
    assert shown["body"]["fields"]["str::email"] == "****@example.com"
    assert shown["status"] == 200
    async with client.get("/console/api/forwarded/unknown") as resp:
        assert resp.status == 404
    async with client.get("/console") as resp:
        texts.append(await resp.text())
    for text in texts:
        assert API_KEY not in text
        assert "jane@example.com" not in text


async def test_personal_setting_shows_full_emails(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    feed = MemoryFeed()
    record = forwarded("k", {"e": "jane@example.com"})
    feed.record_forward("k", lambda: record)
    client = await console_client(aiohttp_client, replace(settings, console_personal=True), feed)
    async with client.get("/console/api/forwarded/k") as resp:
        assert (await resp.json())["body"]["e"] == "jane@example.com"


async def _dead_letters(path: Path, count: int) -> None:
    async with Spool(path) as spool:
        ids = await spool.put(
            to_queue(
                orjson.dumps(
                    {"activity_id": "act:cm:login", "fields": {"str::email": f"p{i}@x.io"}}
                )
                for i in range(count)
            )
        )
        await spool.dead_letter(
            [(i, "act:cm:login", f"hash{i}", f"failed: key {API_KEY}") for i in ids]
        )


async def _depth(path: Path) -> tuple[int, int]:
    async with Spool(path) as spool:
        stats = await spool.stats()
        return stats.depth, stats.dead_letters


async def test_dead_letters_list_replay_purge(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    path = Path(settings.spool_path)
    await _dead_letters(path, 3)
    client = await console_client(aiohttp_client, settings)
    token = {CSRF_HEADER: await session_token(client)}
    async with client.get("/console/api/dead-letters") as resp:
        text = await resp.text()
        letters = json.loads(text)["dead_letters"]
    assert API_KEY not in text and "p0@x.io" not in text
    assert len(letters) == 3
    assert letters[0]["payload"]["fields"]["str::email"].startswith("****@")
    assert {letter["spool"] for letter in letters} == {str(path)}
    first = letters[0]
    replay = "/console/api/dead-letters/replay"
    async with client.post(
        replay, json={"spool": "/etc/passwd", "ids": [1]}, headers=token
    ) as resp:
        assert resp.status == 400
    async with client.post(replay, json={"spool": str(path), "ids": []}, headers=token) as resp:
        assert resp.status == 400  # an empty choice never means "all"
    async with client.post(
        replay, json={"spool": str(path), "ids": [first["id"]]}, headers=token
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["count"] == 1
    assert await _depth(path) == (1, 2)
    async with client.post(
        "/console/api/dead-letters/purge", json={"all": True}, headers=token
    ) as resp:
        assert (await resp.json())["count"] == 2
    assert await _depth(path) == (1, 0)


@pytest.mark.integration  # serves real listeners
async def test_test_activity_goes_through_the_public_listener(
    sandbox: TestServer, sandbox_state: SandboxState, tmp_path: Path
) -> None:
    settings = served_settings(tmp_path, str(sandbox.make_url("")))
    async with (
        running(settings) as (_, private),
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        async with session.get(private + "/console") as resp:
            found = TOKEN_META.search(await resp.text())
        assert found is not None
        headers = {CSRF_HEADER: found.group(1)}
        url = private + "/console/api/test-activity"
        async with session.post(
            url,
            json={"activity_id": "act:cm:not-configured", "email": "t@example.com"},
            headers=headers,
        ) as resp:
            assert resp.status == 400
        async with session.post(
            url, json={"activity_id": "act:cm:signup", "email": "t@example.com"}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        assert answer["status"] == 202, answer
        await wait_for(lambda: len(sandbox_state.activities) == 1, DEADLINE)
        assert sandbox_state.activities[0].activity_id == "act:cm:signup"
        assert sandbox_state.activities[0].email == "t@example.com"


# -- a gateway served in this loop


class running:
    """`serve` on free loopback ports until the block ends: (public URL, metrics URL)."""

    def __init__(self, settings: Settings, stop: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> tuple[str, str]:
        ready: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

        def on_ready(public: int, metrics: int) -> None:
            ready.set_result((public, metrics))

        self.task = asyncio.create_task(serve(self.settings, stop=self.stop, on_ready=on_ready))
        first: list[asyncio.Future[Any]] = [ready, self.task]
        await asyncio.wait(first, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            self.stop.set()
            await self.task
            raise AssertionError("the gateway did not start")
        public, metrics = ready.result()
        return f"http://127.0.0.1:{public}", f"http://127.0.0.1:{metrics}"

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


# -- abuse: DNS rebinding, bad input, too many streams


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:9108", True),
        ("[::1]:9108", True),
        ("localhost:9108", True),
        ("10.0.0.5", True),
        ("ops.example.com", True),  # listed in GATEWAY_CONSOLE_HOSTS below
        ("evil.example:9108", False),  # a site that rebound its name to 127.0.0.1
        ("127.0.0.1.evil.example", False),
        ("", False),
    ],
)
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(host_of(host), ("ops.example.com",)) is allowed


async def test_a_rebound_host_name_is_refused_everywhere(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    client = await console_client(aiohttp_client, settings)
    token = await session_token(client)
    evil = {"Host": "evil.example:9108"}
    for path in ("/console", "/console/events", "/console/api/state", "/console/console.js"):
        async with client.get(path, headers=evil) as resp:
            assert resp.status == 403, path
            assert "Host" in (await resp.json())["error"]
    purge = "/console/api/dead-letters/purge"
    async with client.post(purge, json={"all": True}, headers={**evil, CSRF_HEADER: token}) as r:
        assert r.status == 403
    # A POST from another origin, even with the right Host and token.
    headers = {CSRF_HEADER: token, "Origin": "https://evil.example"}
    async with client.post(purge, json={"all": True}, headers=headers) as resp:
        assert resp.status == 403
    # A listed name is the console's.
    listed = await console_client(aiohttp_client, replace(settings, console_hosts=("ops.lan",)))
    async with listed.get("/console/api/state", headers={"Host": "ops.lan:9108"}) as resp:
        assert resp.status == 200


async def test_bad_input_is_a_4xx_never_a_500(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    client = await console_client(aiohttp_client, settings)
    token = await session_token(client)
    spool = settings.spool_path
    for ids in ([2**70], [0], [-1], list(range(1, 1002)), [], ["1"], [True]):
        async with client.post(
            "/console/api/dead-letters/replay",
            json={"spool": spool, "ids": ids},
            headers={CSRF_HEADER: token},
        ) as resp:
            assert resp.status == 400, ids
    guarded = await console_client(
        aiohttp_client, replace(settings, console_token="console-token-0123456789abcdef")
    )
    async with guarded.post(
        "/console/login",
        data=b"--x\r\nbroken",
        headers={"Content-Type": "multipart/form-data"},  # no boundary
    ) as resp:
        assert resp.status == 400


async def test_a_bearer_script_needs_no_page_session(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    token = "console-token-0123456789abcdef"
    client = await console_client(aiohttp_client, replace(settings, console_token=token))
    path = "/console/api/dead-letters/purge"
    async with client.post(path, json={"all": True}) as resp:
        assert resp.status == 401
    auth = {"Authorization": f"Bearer {token}"}
    async with client.post(path, json={"all": True}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()


async def test_streams_are_capped(
    aiohttp_client: ClientFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_module, "MAX_STREAMS", 2)
    client = await console_client(aiohttp_client, settings)
    first = await client.get("/console/events")
    second = await client.get("/console/events")
    assert first.status == second.status == 200
    async with client.get("/console/events") as resp:
        assert resp.status == 503
    first.close()
    second.close()


async def test_an_id_from_before_a_restart_starts_over(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    # The in-process feed counts from 1 again after a restart; a page still holds 5000.
    feed = MemoryFeed()
    feed.publish({"kind": "activity", "outcome": "accepted", "activity_id": "act:cm:login"})
    client = await console_client(aiohttp_client, settings, feed)
    async with client.get("/console/events", headers={"Last-Event-ID": "5000"}) as resp:
        seq, event = await read_event(resp)
        assert seq == 1 and event["activity_id"] == "act:cm:login"


async def test_the_stream_masks_what_a_browser_sent(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    feed = MemoryFeed()
    feed.publish({"kind": "activity", "outcome": "refused", "activity_id": "jane@example.com"})
    client = await console_client(aiohttp_client, settings, feed)
    async with client.get("/console/events") as resp:
        _, event = await read_event(resp)
        assert event["activity_id"] == "****@example.com"


async def test_a_short_console_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_CONSOLE_TOKEN"):
        load_settings({"GATEWAY_API_KEY": API_KEY, "GATEWAY_CONSOLE_TOKEN": "short"})


def test_no_console_no_feed(settings: Settings) -> None:
    # Off, nothing reads events: none are built on the request path or in delivery.
    assert FEED not in create_app(replace(settings, console=False))
    exposed = replace(settings, metrics_listen=HostPort("0.0.0.0", 9108))
    assert FEED not in create_app(exposed)  # off: not loopback, no token
    assert isinstance(create_app(settings)[FEED], MemoryFeed)
