"""The browser shim in headless Chromium, through nginx, the gateway and the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, ConsoleMessage, Error, Page, Route
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.sandbox import SandboxState, wait_for
from tests.conftest import EXAMPLES, base_settings, need_binary
from tests.servers import Nginx, fill, free_port, run_chromium, run_nginx, write_site

pytestmark = [pytest.mark.nginx, pytest.mark.chromium]

PAGES = Path(__file__).parent / "browser_pages"
SNIPPET = (EXAMPLES / "website-snippet.html").read_text(encoding="utf-8")
SHIM_PATH = "/ortto/ortto-relay.js"
ENDPOINT_PATH = "/ortto/v1/activities/create"
GUIDE_EMAIL = "john.apple@example.com"
# Generous deadlines for conditions that normally hold within milliseconds.
DEADLINE = 10.0


@dataclass(frozen=True)
class Seen:
    """One request as the gateway answered it."""

    method: str
    path: str
    content_type: str
    origin: str | None
    status: int


SEEN = web.AppKey("seen", list)


@dataclass
class PageLog:
    """Console messages and uncaught errors of one page."""

    messages: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", self._error)

    def _console(self, message: ConsoleMessage) -> None:
        self.messages.append(f"console.{message.type}: {message.text}")

    def _error(self, error: Error) -> None:
        self.messages.append(f"pageerror: {error}")

    def problems(self) -> list[str]:
        """Errors, warnings and anything about CORS."""
        return [
            m
            for m in self.messages
            if "cors" in m.lower()
            or "error" in m.lower()
            or m.startswith(("console.warning", "pageerror"))
        ]


@dataclass
class Stack:
    """Browser -> nginx (shipped config) -> gateway -> sandbox."""

    nginx: Nginx
    gateway: TestServer
    state: SandboxState
    browser: Browser

    def seen(self) -> list[Seen]:
        """Every request the gateway answered, in order."""
        seen: list[Seen] = self.gateway.app[SEEN]
        return seen

    def posts(self) -> list[Seen]:
        return [s for s in self.seen() if s.method == "POST"]

    async def open(self, url: str) -> tuple[Page, PageLog]:
        page = await self.browser.new_page()
        log = PageLog()
        log.attach(page)
        await page.goto(url)
        return page, log


StackFactory = Callable[..., Awaitable[Stack]]


def pages(shim_url: str) -> dict[str, str]:
    """The test pages, pointing at `shim_url`, the guide's snippet pasted in as published."""
    return {
        path.name: fill(
            path.read_text(encoding="utf-8"), {"SHIM_URL": shim_url, "SNIPPET": SNIPPET}
        )
        for path in PAGES.iterdir()
        if path.is_file()
    }


@pytest.fixture
async def make_stack(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    sandbox: TestServer,
    sandbox_state: SandboxState,
    tmp_path: Path,
) -> AsyncIterator[StackFactory]:
    """Start nginx, then the gateway (allowing the second site's origin if asked), Chromium."""
    nginx_bin = need_binary("nginx", "/usr/sbin/nginx")
    chromium = need_binary("chromium", "/usr/bin/chromium")
    async with contextlib.AsyncExitStack() as stack:

        async def factory(*, allow_other_origin: bool = False) -> Stack:
            # nginx connects to its upstream only when a request comes, so the gateway's port
            # is chosen first and the gateway started once the other site's origin is known.
            gateway_port = free_port()
            nginx = await stack.enter_async_context(
                run_nginx(
                    nginx_bin,
                    tmp_path / "nginx",
                    gateway_port=gateway_port,
                    site_root=tmp_path / "site",
                    other_root=tmp_path / "other",
                )
            )
            write_site(tmp_path / "site", pages(SHIM_PATH))
            write_site(tmp_path / "other", pages(nginx.url(SHIM_PATH)))
            allowed = (nginx.other_origin,) if allow_other_origin else ("http://shop.example",)
            settings = base_settings(tmp_path, str(sandbox.make_url("")), allowed_origins=allowed)
            metrics = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
            app = create_app(settings, metrics=metrics)
            app[SEEN] = []
            app.on_response_prepare.append(_record)
            gateway = await aiohttp_server(app, port=gateway_port)
            browser = await stack.enter_async_context(run_chromium(chromium))
            return Stack(nginx, gateway, sandbox_state, browser)

        yield factory


async def _record(request: web.Request, response: web.StreamResponse) -> None:
    request.app[SEEN].append(
        Seen(
            request.method,
            request.path,
            request.headers.get("Content-Type", ""),
            request.headers.get("Origin"),
            response.status,
        )
    )


async def test_guide_snippet_same_origin(make_stack: StackFactory) -> None:
    """The guide's exact snippet: the sandbox gets the activity, email and client address."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/guide.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.activity_id == "act:cm:login"
    assert received.email == GUIDE_EMAIL
    assert received.source_ip == "127.0.0.1"
    attributes = received.activity["attributes"]
    assert attributes["str:cm:payment-plan"] == "$100 starter plan"
    assert attributes["bol:cm:account-owner"] is True
    [post] = stack.posts()
    assert post.status == 202
    assert post.content_type.startswith("application/json")
    assert post.origin == stack.nginx.origin  # same origin through nginx: no CORS at all
    assert log.problems() == []
    await page.close()


async def test_guide_snippet_from_an_allowed_origin(make_stack: StackFactory) -> None:
    """A page on another origin listed in GATEWAY_ALLOWED_ORIGINS: preflight, then 202."""
    stack = await make_stack(allow_other_origin=True)
    page, log = await stack.open(stack.nginx.other_url("/guide.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    assert stack.state.activities[0].email == GUIDE_EMAIL
    methods = [(s.method, s.status, s.origin) for s in stack.seen() if s.path.startswith("/v1/")]
    assert methods == [
        ("OPTIONS", 204, stack.nginx.other_origin),
        ("POST", 202, stack.nginx.other_origin),
    ]
    answer = await page.evaluate("window.__orttoRelay.endpoint")
    assert answer == stack.nginx.url(ENDPOINT_PATH)
    assert log.problems() == []
    await page.close()


async def test_guide_snippet_from_a_refused_origin(make_stack: StackFactory) -> None:
    """A page on an origin not listed: the preflight gets 403, nothing reaches the sandbox."""
    stack = await make_stack(allow_other_origin=False)
    page = await stack.browser.new_page()
    log = PageLog()
    log.attach(page)
    # Playwright does not report preflights; the DevTools protocol does.
    refused: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_response(event: dict[str, Any]) -> None:
        response = event["response"]
        if response["url"].endswith(ENDPOINT_PATH) and not refused.done():
            refused.set_result({"type": event["type"], "status": response["status"]})

    cdp = await page.context.new_cdp_session(page)
    cdp.on("Network.responseReceived", on_response)
    await cdp.send("Network.enable")
    await page.goto(stack.nginx.other_url("/guide.html"))
    assert await asyncio.wait_for(refused, DEADLINE) == {"type": "Preflight", "status": 403}
    attempts = [(s.method, s.status) for s in stack.seen() if s.path.startswith("/v1/")]
    assert attempts[0] == ("OPTIONS", 403)
    assert set(attempts) == {("OPTIONS", 403)}  # the POST itself never left the browser
    assert stack.state.requests == []
    assert stack.state.activities == []
    await wait_for(lambda: any("blocked by CORS policy" in m for m in log.messages), DEADLINE)
    await cdp.detach()
    await page.close()


async def test_pagehide_sends_with_a_beacon(make_stack: StackFactory) -> None:
    """An activity sent while the page goes away leaves by sendBeacon, as text/plain."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/beacon.html"))
    await page.goto(stack.nginx.url("/index.html"))  # fires pagehide on beacon.html
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.email == "leaving@example.com"
    assert received.activity["fields"]["str::first"] == "Lea"
    assert received.activity["attributes"] == {"str:cm:web-browser": "pagehide"}
    # The gateway got one text/plain POST (a simple request: no preflight) and accepted it.
    assert [(s.method, s.content_type, s.status) for s in stack.seen() if "/v1/" in s.path] == [
        ("POST", "text/plain;charset=UTF-8", 202)
    ]
    # beacon.html's spy on navigator.sendBeacon left its notes in sessionStorage.
    calls = json.loads(await page.evaluate("sessionStorage.getItem('beacons')"))
    assert [c["url"] for c in calls] == [stack.nginx.url(ENDPOINT_PATH)]
    assert json.loads(calls[0]["data"])["activities"][0]["activity_id"] == "act:cm:login"
    assert log.problems() == []
    await page.close()


def posts_to_gateway(stack: Stack) -> list[Seen]:
    return [s for s in stack.seen() if s.method == "POST" and s.path.startswith("/v1/")]


async def relay_answers(page: Page, count: int) -> list[dict[str, Any]]:
    """Wait until shim.html has heard `count` answers from the gateway; return them."""
    await page.wait_for_function(f"window.relayAnswers.length >= {count}", timeout=DEADLINE * 1000)
    answers: list[dict[str, Any]] = await page.evaluate("window.relayAnswers")
    return answers


async def test_shim_drains_the_queue_and_batches_one_tick(make_stack: StackFactory) -> None:
    """What the guide's stub queued in ap3c.act before load goes in one request; so do
    calls made in the same tick, while calls in later ticks go on their own."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/shim.html"))
    assert await relay_answers(page, 1) == [{"status": 202, "n": 2}]
    await wait_for(lambda: len(stack.state.activities) == 2, DEADLINE)
    assert [(a.activity_id, a.email) for a in stack.state.activities] == [
        ("act:cm:signup", "early@example.com"),
        ("act:cm:login", "early@example.com"),
    ]
    await page.evaluate(
        """() => {
        for (const n of [1, 2, 3]) {
          ap3c.activity({"activity_id": "act:cm:login",
                         "attributes": {"str::email": "p" + n + "@example.com"}});
        }
        ap3c.act.push({"activity_id": "act:cm:login",
                       "attributes": {"str::email": "p4@example.com"}});
      }"""
    )
    assert (await relay_answers(page, 2))[1] == {"status": 202, "n": 4}
    await page.evaluate(
        """() => {
        ap3c.activity({"activity_id": "act:cm:login", "fields": {"str::email": "p5@example.com"}});
        setTimeout(() => ap3c.activity(
          {"activity_id": "act:cm:login", "fields": {"str::email": "p6@example.com"}}), 0);
      }"""
    )
    assert (await relay_answers(page, 4))[2:] == [{"status": 202, "n": 1}] * 2
    assert len(posts_to_gateway(stack)) == 4
    await wait_for(lambda: len(stack.state.activities) == 8, DEADLINE)
    assert log.problems() == []
    await page.close()


async def test_shim_remembers_the_tracked_person(make_stack: StackFactory) -> None:
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/shim.html"))
    await relay_answers(page, 1)
    await page.evaluate(
        """() => {
        ap3c.track({"v": 0, "email": "Jane.Doe@example.com", "first": "Jane", "last": "Doe"});
        ap3c.activity({"activity_id": "act:cm:login", "attributes": {"str:cm:plan": "gold"}});
      }"""
    )
    await relay_answers(page, 2)
    await page.evaluate(
        """() => {
        ap3c.track({"v": 0});  // a page view names nobody: the person stays
        ap3c.activity({"activity_id": "act:cm:signup"});
        // Names somebody else: nothing of Jane's is added.
        ap3c.activity({"activity_id": "act:cm:login",
                       "attributes": {"str::email": "other@example.com"}});
      }"""
    )
    await relay_answers(page, 3)
    await page.evaluate(
        """() => {
        ap3c.track({"v": 0, "ei": "customer-42"});
        ap3c.activity({"activity_id": "act:cm:login"});
      }"""
    )
    assert [a["status"] for a in await relay_answers(page, 4)] == [202] * 4
    await wait_for(lambda: len(stack.state.activities) == 6, DEADLINE)
    later = [a.activity["fields"] for a in stack.state.activities[2:]]
    jane = {"str::email": "Jane.Doe@example.com", "str::first": "Jane", "str::last": "Doe"}
    assert later == [jane, jane, {"str::email": "other@example.com"}, {"str::ei": "customer-42"}]
    assert stack.state.activities[2].activity["attributes"] == {"str:cm:plan": "gold"}
    assert log.problems() == []
    await page.close()


async def test_shim_does_not_retry_a_4xx(make_stack: StackFactory) -> None:
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/shim.html"))
    await relay_answers(page, 1)
    await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:not-enabled",
                                 "attributes": {"str::email": "a@example.com"}})"""
    )
    answers = await relay_answers(page, 2)
    assert answers[1] == {"status": 404, "n": 1}
    # Final: no retry waits in the shim, and the gateway saw that request once.
    assert await page.evaluate("window.__orttoRelay.waiting()") == 0
    assert [s.status for s in posts_to_gateway(stack)] == [202, 404]
    # A 400 is just as final.
    await page.evaluate("""() => ap3c.activity({"activity_id": "act:cm:login"})""")
    assert (await relay_answers(page, 3))[2] == {"status": 400, "n": 1}
    assert await page.evaluate("window.__orttoRelay.waiting()") == 0
    assert [s.status for s in posts_to_gateway(stack)] == [202, 404, 400]
    # The browser logs failed loads as errors; nothing else was logged.
    assert [m for m in log.problems() if "status of 40" not in m] == []
    await page.close()


async def test_shim_retries_a_network_failure(make_stack: StackFactory) -> None:
    """The first attempt fails in the network; the retry after a backoff gets through."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/shim.html"))
    await relay_answers(page, 1)
    attempts: list[str] = []

    async def flaky(route: Route) -> None:
        attempts.append(route.request.method)
        if len(attempts) == 1:
            await route.abort("connectionrefused")
        else:
            await route.continue_()

    await page.route("**" + ENDPOINT_PATH, flaky)
    await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "attributes": {"str::email": "retry@example.com"}})"""
    )
    assert (await relay_answers(page, 2))[1] == {"status": 202, "n": 1}
    assert attempts == ["POST", "POST"]
    await wait_for(lambda: len(stack.state.activities) == 3, DEADLINE)
    assert stack.state.activities[2].email == "retry@example.com"
    assert len(posts_to_gateway(stack)) == 2  # the aborted one never reached the gateway
    assert [m for m in log.problems() if "ERR_CONNECTION_REFUSED" not in m] == []
    await page.close()


async def test_shim_survives_ortto_script(make_stack: StackFactory) -> None:
    """Ortto's script, loading later, installs its own ap3c.track and ap3c.activity: its
    track is wrapped (and still called), activities keep going through the gateway."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/shim.html"))
    await relay_answers(page, 1)
    await page.evaluate(
        """() => ap3c.cmd.push(function () {
        ap3c.init("(tracking key)", "");
        ap3c.track({"v": 0, "email": "from.ortto@example.com", "first": "Otto"});
      })"""
    )
    await page.add_script_tag(url="/fake-ortto.js")
    await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "attributes": {"str:cm:plan": "x"}})"""
    )
    assert (await relay_answers(page, 2))[1] == {"status": 202, "n": 1}
    await wait_for(lambda: len(stack.state.activities) == 3, DEADLINE)
    assert stack.state.activities[2].activity["fields"] == {
        "str::email": "from.ortto@example.com",
        "str::first": "Otto",
    }
    calls = await page.evaluate("window.orttoCalls")
    assert calls == [["init", "(tracking key)"], ["track", "from.ortto@example.com"]]
    # A later track goes through Ortto's function and the shim's memory alike.
    await page.evaluate(
        """() => {
        ap3c.track({"v": 0, "ei": "ext-7"});
        ap3c.activity({"activity_id": "act:cm:signup"});
      }"""
    )
    assert (await relay_answers(page, 3))[2] == {"status": 202, "n": 1}
    assert (await page.evaluate("window.orttoCalls"))[-1] == ["track", "ext-7"]
    await wait_for(lambda: len(stack.state.activities) == 4, DEADLINE)
    assert stack.state.activities[3].activity["fields"] == {"str::ei": "ext-7"}
    assert log.problems() == []
    await page.close()
