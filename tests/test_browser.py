"""The browser shim in headless Chromium, through nginx, the gateway and the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
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
from gateway.config import parse_rate
from gateway.keys import METRICS
from gateway.metrics import Metrics
from gateway.sandbox import SandboxState, wait_for
from gateway.server import runner_options
from gateway.shim import ShimFile, loader_snippet, pinned_snippet
from tests.conftest import EXAMPLES, base_settings, need_binary
from tests.servers import Nginx, fill, free_port, run_chromium, run_nginx, write_site

pytestmark = [pytest.mark.nginx, pytest.mark.chromium]

PAGES = Path(__file__).parent / "browser_pages"
SNIPPET = (EXAMPLES / "website-snippet.html").read_text(encoding="utf-8")
SHIM_PREFIX = "/ortto/"
ENDPOINT_PATH = "/ortto/v1/activities/create"
GUIDE_EMAIL = "john.apple@example.com"
GUIDE_PERSON = {"str::email": GUIDE_EMAIL, "str::first": "John", "str::last": "Apple"}
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
    gateway: TestServer | None
    state: SandboxState
    browser: Browser
    start: Callable[[], Awaitable[TestServer]]

    async def start_gateway(self) -> None:
        """Start the gateway on the port nginx forwards to (it answers 502 until then)."""
        self.gateway = await self.start()

    def seen(self) -> list[Seen]:
        """Every request the gateway answered, in order."""
        assert self.gateway is not None
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


def pages(prefix: str) -> dict[str, str]:
    """The test pages, loading the shim from `prefix`, the guide's snippet pasted in as
    published and the README's loader (pinned or not, with attributes) where they ask."""
    shim_url = prefix + "ortto-relay.js"
    values = {
        "SHIM_URL": shim_url,
        "SNIPPET": SNIPPET,
        "LOADER_PINNED": pinned_snippet(ShimFile.load(), prefix),
        "LOADER_DEBUG": loader_snippet(shim_url, {"data-debug": ""}),
        "LOADER_CONSENT": loader_snippet(shim_url, {"data-consent": "required", "data-gpc": ""}),
    }
    return {
        path.name: fill(path.read_text(encoding="utf-8"), values)
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
    """Start nginx, then the gateway (allowing the second site's origin if asked; later, if
    asked), Chromium. Keyword arguments beyond those override the gateway's settings."""
    nginx_bin = need_binary("nginx", "/usr/sbin/nginx")
    chromium = need_binary("chromium", "/usr/bin/chromium")
    async with contextlib.AsyncExitStack() as stack:

        async def factory(
            *, allow_other_origin: bool = False, gateway_up: bool = True, **overrides: Any
        ) -> Stack:
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
            write_site(tmp_path / "site", pages(SHIM_PREFIX))
            write_site(tmp_path / "other", pages(nginx.url(SHIM_PREFIX)))
            allowed = (nginx.other_origin,) if allow_other_origin else ("http://shop.example",)
            settings = base_settings(
                tmp_path, str(sandbox.make_url("")), allowed_origins=allowed, **overrides
            )

            async def start() -> TestServer:
                metrics = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
                app = create_app(settings, metrics=metrics)
                app[SEEN] = []
                app.on_response_prepare.append(_record)
                # The runner options `serve` uses (bodies inflated by the gateway, ...).
                return await aiohttp_server(app, port=gateway_port, **runner_options(settings))

            browser = await stack.enter_async_context(run_chromium(chromium))
            result = Stack(nginx, None, sandbox_state, browser, start)
            if gateway_up:
                await result.start_gateway()
            return result

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
    """The guide's exact snippet: the sandbox gets the activity, the person its ap3c.track
    (inside ap3c.cmd.push) named, and the client address."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/guide.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.activity_id == "act:cm:login"
    assert received.email == GUIDE_EMAIL
    assert received.activity["fields"] == GUIDE_PERSON
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


async def kept(page: Page, key: str = "ortto-relay:outbox") -> list[Any]:
    """What the page's origin keeps in localStorage under `key`."""
    text = await page.evaluate(f"localStorage.getItem({json.dumps(key)})")
    return json.loads(text) if text else []


async def test_seed_snippet_with_the_loader(make_stack: StackFactory) -> None:
    """The README's loader (versioned URL, SRI) and the guide's snippet verbatim: the command
    runs (init, track), the activity queued before the shim came carries the tracked names."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/seed.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.activity_id == "act:cm:login"
    assert received.activity["fields"] == GUIDE_PERSON
    assert received.activity["attributes"]["str:cm:web-browser"] == "Google Chrome"
    shim = ShimFile.load()
    assert await page.evaluate("document.querySelector('script[integrity]').src") == (
        stack.nginx.url(SHIM_PREFIX + shim.file_name)
    )
    assert log.problems() == []
    await page.close()


async def test_ortto_cmd_form_runs_in_order_and_isolated(make_stack: StackFactory) -> None:
    """Ortto's form: init, track and activity inside ap3c.cmd.push. Commands run in order,
    before and after the shim came; one that throws is reported and the others still run."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/cmd.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.activity["fields"] == GUIDE_PERSON
    assert received.activity["attributes"] == {"str:cm:payment-plan": "gold"}
    await page.evaluate("ap3c.cmd.push(function () { window.order.push(4); })")
    assert await page.evaluate("window.order") == [1, 2, 3, 4]
    errors = [m for m in log.messages if m.startswith("console.error")]
    assert len(errors) == 1 and "an ap3c.cmd function threw" in errors[0], log.messages
    assert not [m for m in log.messages if m.startswith("pageerror")]
    await page.close()


async def test_activity_answers_with_a_promise(make_stack: StackFactory) -> None:
    stack = await make_stack()
    page, _log = await stack.open(stack.nginx.url("/loader.html"))
    answer = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "attributes": {"str::email": "promise@example.com"}})"""
    )
    assert answer == {
        "status": 202,
        "accepted": True,
        "duplicate": False,
        "warnings": [],
        "retryAfterSeconds": None,
        "error": None,
        "kept": False,
    }
    refused = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "fields": {"str::email": "x@example.com", "phn::phone": "1"}})"""
    )
    assert refused["status"] == 400 and refused["accepted"] is False
    assert "phn::phone" in refused["error"]
    assert await kept(page) == []  # both answered: nothing left to send
    await page.close()


async def test_shim_beside_ortto_tracking_code(make_stack: StackFactory) -> None:
    """Ortto's own script (a stand-in) after the shim: it gets the init and track the shim ran
    before it came (page views), and later ones; activities stay with the gateway."""
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/ortto.html"))
    await page.wait_for_function("window.__orttoRelay", timeout=DEADLINE * 1000)
    await page.add_script_tag(url="/fake-ortto.js")
    await page.wait_for_function("window.orttoCalls.length == 2", timeout=DEADLINE * 1000)
    assert await page.evaluate("window.orttoCalls") == [
        ["init", "(tracking key)"],
        ["track", "both@example.com"],
    ]
    answer = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:signup",
                                 "attributes": {"str:cm:plan": "x"}})"""
    )
    assert answer["accepted"] is True
    await page.evaluate("""ap3c.cmd.push(function () { ap3c.track({"v": 0}); })""")
    assert await page.evaluate("window.orttoCalls") == [
        ["init", "(tracking key)"],
        ["track", "both@example.com"],
        ["track", None],
    ]
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    assert stack.state.activities[0].activity["fields"] == {
        "str::email": "both@example.com",
        "str::first": "Bo",
    }
    assert log.problems() == []
    await page.close()


async def test_gateway_down_at_page_load(make_stack: StackFactory) -> None:
    """The gateway is down: the shim cannot load, the page runs without an error and keeps
    what it queued; the next page, with the gateway up, sends it exactly once."""
    stack = await make_stack(gateway_up=False)
    page = await stack.browser.new_page()
    log = PageLog()
    log.attach(page)
    await page.goto(stack.nginx.url("/outage.html"))
    # The loader's script element failed (nginx's 502); the page is whole and ap3c answers.
    assert await page.evaluate("typeof ap3c.activity(null).then") == "function"
    assert await page.evaluate("window.__orttoRelay") is None
    await page.goto(stack.nginx.url("/index.html"))  # pagehide: the loader keeps the queue
    [early] = await kept(page, "ortto-relay:early")
    assert early["a"][0]["activity_id"] == "act:cm:login"
    assert [m for m in log.messages if m.startswith("pageerror")] == []

    await stack.start_gateway()
    await page.goto(stack.nginx.url("/loader.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    received = stack.state.activities[0]
    assert received.activity["fields"] == {"str::email": "down@example.com", "str::first": "Dawn"}
    assert received.activity["attributes"] == {"str:cm:plan": "outage"}
    await page.wait_for_function(
        "!localStorage.getItem('ortto-relay:outbox')", timeout=DEADLINE * 1000
    )
    assert await kept(page, "ortto-relay:early") == []
    # Another page sends nothing again.
    await page.goto(stack.nginx.url("/loader.html"))
    await page.wait_for_function("window.__orttoRelay", timeout=DEADLINE * 1000)
    assert [s.status for s in posts_to_gateway(stack)] == [202]
    assert len(stack.state.activities) == 1
    await page.close()


async def test_unanswered_activity_is_sent_by_the_next_page(make_stack: StackFactory) -> None:
    """The shim is there but its POSTs fail: the activity stays in the outbox, with its key,
    and the next page sends it once, with that key."""
    stack = await make_stack()
    page, _log = await stack.open(stack.nginx.url("/loader.html"))
    bodies: list[str] = []

    async def from_the_first_page_only(route: Route) -> None:
        if route.request.headers.get("referer", "").endswith("/loader.html"):
            await route.abort("connectionrefused")
        else:
            bodies.append(route.request.post_data or "")
            await route.continue_()

    await page.route("**" + ENDPOINT_PATH, from_the_first_page_only)
    await page.evaluate(
        """() => { window.first = ap3c.activity({"activity_id": "act:cm:login",
                   "attributes": {"str::email": "later@example.com"}}); }"""
    )
    [entry] = await kept(page)
    assert entry["a"]["key"] == entry["k"] and len(entry["k"]) >= 16
    await page.wait_for_function("window.__orttoRelay.waiting() == 1", timeout=DEADLINE * 1000)
    await page.goto(stack.nginx.url("/debug.html"))
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    assert stack.state.activities[0].email == "later@example.com"
    assert [json.loads(b)["activities"][0]["key"] for b in bodies] == [entry["k"]]
    await page.wait_for_function(
        "!localStorage.getItem('ortto-relay:outbox')", timeout=DEADLINE * 1000
    )
    assert [s.status for s in posts_to_gateway(stack)] == [202]
    await page.close()


async def test_a_beacon_at_unload_is_sent_again_and_counted_once(
    make_stack: StackFactory,
) -> None:
    """A beacon may or may not arrive: the outbox keeps it, marked, the next page sends it
    again under the same key, and the gateway answers the repeat as a duplicate."""
    stack = await make_stack()
    page, _log = await stack.open(stack.nginx.url("/beacon.html"))
    await page.goto(stack.nginx.url("/index.html"))  # pagehide: the activity goes by beacon
    [entry] = await kept(page)
    assert entry["m"] > 0  # handed to the browser, maybe delivered
    await page.goto(stack.nginx.url("/debug.html"))  # a page with the shim: it sends again
    await page.wait_for_function(
        "!localStorage.getItem('ortto-relay:outbox')", timeout=DEADLINE * 1000
    )
    await wait_for(lambda: len(posts_to_gateway(stack)) == 2, DEADLINE)
    assert [s.status for s in posts_to_gateway(stack)] == [202, 202]
    assert stack.gateway is not None
    registry = stack.gateway.app[METRICS].registry

    def counted(outcome: str) -> float | None:
        labels = {"activity_id": "act:cm:login", "outcome": outcome}
        return registry.get_sample_value("ortto_gateway_activities_total", labels)

    assert (counted("accepted"), counted("duplicate")) == (1, 1)
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    assert stack.state.activities[0].email == "leaving@example.com"
    await page.close()


async def test_outbox_is_bounded(make_stack: StackFactory) -> None:
    stack = await make_stack()
    page, log = await stack.open(stack.nginx.url("/loader.html"))
    await page.route("**" + ENDPOINT_PATH, lambda route: route.abort("connectionrefused"))
    await page.evaluate(
        """() => { for (let n = 0; n < 101; n++) ap3c.activity({"activity_id": "act:cm:login",
                     "attributes": {"str::email": "p" + n + "@example.com"}}); }"""
    )
    outbox = await kept(page)
    assert len(outbox) == 100
    assert outbox[0]["a"]["attributes"]["str::email"] == "p1@example.com"
    warnings = [m for m in log.messages if m.startswith("console.warning")]
    assert warnings == [
        "console.warning: ortto-relay: too many unsent activities: dropped the oldest, act:cm:login"
    ]
    await page.close()


async def test_debug_mode_explains_a_limit(make_stack: StackFactory) -> None:
    """data-debug: the console says what went wrong and what to change, in human units."""
    stack = await make_stack(person_limit=parse_rate("1/1d"))
    page, log = await stack.open(stack.nginx.url("/debug.html"))
    send = """() => ap3c.activity({"activity_id": "act:cm:login",
                                    "attributes": {"str::email": "limit@example.com"}})"""
    assert (await page.evaluate(send))["accepted"] is True
    limited = await page.evaluate(send)
    assert limited["status"] == 429 and limited["accepted"] is False
    assert 86000 < limited["retryAfterSeconds"] <= 86400
    unknown = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:nope",
                                 "attributes": {"str::email": "limit@example.com"}})"""
    )
    assert unknown["status"] == 404
    warnings = [m for m in log.messages if m.startswith("console.warning")]
    assert re.fullmatch(
        r"console\.warning: ortto-relay: act:cm:login: limit reached, try again in "
        r"2[34] h \d{1,2} min",
        warnings[0],
    ), warnings
    assert warnings[1] == (
        "console.warning: ortto-relay: act:cm:nope: not enabled: add it to GATEWAY_ACTIVITIES"
    )
    infos = [m for m in log.messages if m.startswith("console.info")]
    assert any("act:cm:login: accepted" in m for m in infos), infos
    # A bad optional value: accepted without it, and the console says what was left out.
    dropped = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "attributes": {"str::email": "drop@example.com",
                                                "int:cm:seats": "two"}})"""
    )
    assert dropped["accepted"] is True
    assert [w["field"] for w in dropped["warnings"]] == ["attributes.int:cm:seats"]
    # Ortto's other page functions (its Magento connector's) are harmless and say so.
    await page.evaluate("""() => ap3c.trackMagento("m@example.com", "", {"sku": "1"})""")
    assert "console.info: ortto-relay: ap3c.trackMagento: nothing to do for activities" in (
        log.messages
    )
    assert any(
        m.startswith("console.warning: ortto-relay: act:cm:login: attributes.int:cm:seats must")
        for m in log.messages
    ), log.messages
    await page.close()


async def test_origin_not_allowed_is_explained(make_stack: StackFactory) -> None:
    """A page on an origin the gateway refuses: the answer is a 403, the debug mode names the
    setting, nothing is retried or kept."""
    stack = await make_stack(allow_other_origin=False)
    page, log = await stack.open(stack.nginx.other_url("/debug.html"))
    answer = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login",
                                 "attributes": {"str::email": "far@example.com"}})"""
    )
    assert answer["status"] == 403 and answer["kept"] is False
    assert (
        f"console.warning: ortto-relay: this page's origin {stack.nginx.other_origin} is not "
        "allowed: add it to GATEWAY_ALLOWED_ORIGINS"
    ) in log.messages
    assert await kept(page) == []
    assert await page.evaluate("window.__orttoRelay.waiting()") == 0
    assert {(s.method, s.status) for s in stack.seen() if s.path.startswith("/v1/")} == {
        ("OPTIONS", 403)
    }
    assert stack.state.activities == []
    await page.close()


async def test_consent_withheld_then_given(make_stack: StackFactory) -> None:
    """data-consent="required": nothing is sent or stored, on this page or when it goes; once
    a page calls ap3c.consent(true), its activities go."""
    stack = await make_stack()
    page, _log = await stack.open(stack.nginx.url("/consent.html"))
    await page.wait_for_function("window.__orttoRelay", timeout=DEADLINE * 1000)
    await page.goto(stack.nginx.url("/index.html"))
    assert await page.evaluate("Object.keys(localStorage)") == []
    await page.goto(stack.nginx.url("/consent.html"))
    await page.wait_for_function("window.__orttoRelay", timeout=DEADLINE * 1000)
    assert posts_to_gateway(stack) == []
    await page.evaluate("ap3c.consent(true)")
    assert (await page.evaluate("window.answer"))["accepted"] is True
    await wait_for(lambda: len(stack.state.activities) == 1, DEADLINE)
    assert stack.state.activities[0].email == "careful@example.com"
    # Withdrawn: later activities are answered at once, and nothing is sent.
    await page.evaluate("ap3c.consent(false)")
    refused = await page.evaluate(
        """() => ap3c.activity({"activity_id": "act:cm:login", "attributes": {}})"""
    )
    assert refused["error"] == "no consent"
    assert len(posts_to_gateway(stack)) == 1
    await page.close()


async def test_global_privacy_control(make_stack: StackFactory) -> None:
    """data-gpc and the browser's GPC signal: nothing is sent, even after ap3c.consent(true)."""
    stack = await make_stack()
    page = await stack.browser.new_page()
    await page.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"
    )
    await page.goto(stack.nginx.url("/consent.html"))
    await page.wait_for_function("window.__orttoRelay", timeout=DEADLINE * 1000)
    await page.evaluate("ap3c.consent(true)")
    assert (await page.evaluate("window.answer"))["error"] == "no consent"
    await page.goto(stack.nginx.url("/index.html"))
    assert await page.evaluate("Object.keys(localStorage)") == []
    assert posts_to_gateway(stack) == []
    await page.close()
