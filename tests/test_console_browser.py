"""The operator console in headless Chromium, against a real gateway and the sandbox.

Also takes screenshots of the console and the demo: into the test's tmp directory, or,
with `GATEWAY_SCREENSHOTS_DIR` set (`make screenshots`), into that directory; the README
links docs/screenshots/console.png and demo.png, written that way. A run only (over)writes
them, it never checks their pixels.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, expect

from gateway.config import HostPort, Settings, parse_rate
from gateway.demo import run_demo
from gateway.identity import person_hash
from gateway.sandbox import Fault, SandboxState, wait_for
from gateway.server import free_port
from tests import redis_support
from tests.conftest import need_binary
from tests.processes import GatewayProcess
from tests.servers import run_chromium
from tests.test_console import running, served_settings

pytestmark = pytest.mark.chromium

PATH = "/v1/activities/create"
# Generous: conditions that normally hold within milliseconds.
DEADLINE = 15.0
TIMEOUT_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with run_chromium(need_binary("chromium", "/usr/bin/chromium")) as b:
        yield b


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: `GATEWAY_SCREENSHOTS_DIR` (`make screenshots`), else tmp."""
    where = os.environ.get("GATEWAY_SCREENSHOTS_DIR")
    path = Path(where) if where else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def take_screenshot(page: Page, path: Path) -> None:
    await page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def settings_for(sandbox: TestServer, tmp_path: Path, **overrides: Any) -> Settings:
    return served_settings(tmp_path, str(sandbox.make_url("")), **overrides)


def activity(activity_id: str, email: str) -> dict[str, Any]:
    return {"activity_id": activity_id, "fields": {"str::email": email}, "attributes": {}}


async def post(session: aiohttp.ClientSession, public: str, body: dict[str, Any]) -> int:
    async with session.post(public + PATH, json=body) as resp:
        return resp.status


async def open_console(browser: Browser, private: str) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    await page.goto(private + "/console")
    await expect(page.locator("#stream-status")).to_have_text("live", timeout=TIMEOUT_MS)
    return page


async def send_test(page: Page, activity_id: str, email: str) -> None:
    row = page.locator(f'#activities tr[data-activity="{activity_id}"]')
    await row.locator('input[name="email"]').fill(email)
    await row.locator("button").click()
    await expect(row.locator("output")).to_contain_text("HTTP 202", timeout=TIMEOUT_MS)


async def test_requests_appear_with_their_reasons(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    browser: Browser,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    settings = settings_for(sandbox, tmp_path, person_limit=parse_rate("1/1d"))
    async with running(settings) as (public, private):
        page = await open_console(browser, private)
        assert await post(session, public, activity("act:cm:login", "a@example.com")) == 202
        assert await post(session, public, activity("act:cm:login", "a@example.com")) == 429
        async with session.post(public + PATH, json=activity("act:cm:nope", "b@example.com")) as r:
            assert r.status == 404
            nope_request = r.headers["X-Request-Id"]
        rows = page.locator("#events tbody tr")
        accepted = rows.filter(has_text="accepted").filter(has_text="act:cm:login")
        await expect(accepted.first).to_be_visible(timeout=TIMEOUT_MS)
        await expect(rows.filter(has_text="person_limit")).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(rows.filter(has_text="unknown_activity")).to_have_count(1, timeout=TIMEOUT_MS)
        # The delivery to the sandbox shows, and the accepted row shows what Ortto received.
        await expect(rows.filter(has_text="delivered").first).to_be_visible(timeout=TIMEOUT_MS)
        await accepted.first.click()
        await expect(page.locator("#forwarded .headers")).to_contain_text(
            "X-Api-Key: ****", timeout=TIMEOUT_MS
        )
        await expect(page.locator("#forwarded .forwarded-body")).to_contain_text("act:cm:login")
        # A filter by reason leaves that row alone; pause holds new rows back.
        await page.locator("#f-reason").fill("person_limit")
        await expect(rows).to_have_count(1, timeout=TIMEOUT_MS)
        await page.locator("#f-reason").fill("")
        await page.locator("#pause").click()
        before = await rows.count()
        await send_test(page, "act:cm:signup", "night-shift@example.com")
        await expect(page.locator("#paused-note")).to_contain_text("new while paused")
        assert await rows.count() == before
        await page.locator("#pause").click()
        await expect(rows.filter(has_text="test").first).to_be_visible(timeout=TIMEOUT_MS)
        # The other filters: activity, outcome, person hash, request id; then clear.
        await page.locator("#f-activity").fill("act:cm:nope")
        await expect(rows).to_have_count(1, timeout=TIMEOUT_MS)
        await page.locator("#f-activity").fill("")
        await page.locator("#f-request").fill(nope_request)
        await expect(rows).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(rows.first).to_contain_text("unknown_activity")
        await page.locator("#f-request").fill("")
        await page.locator("#f-person").fill(person_hash("e:a@example.com"))
        await expect(rows).to_have_count(2, timeout=TIMEOUT_MS)  # accepted, then person_limit
        await page.locator("#f-person").fill("")
        await page.locator("#f-outcome").select_option("refused")
        await expect(rows.filter(has_text="accepted")).to_have_count(0, timeout=TIMEOUT_MS)
        await expect(rows.filter(has_text="person_limit")).to_have_count(1)
        await page.locator("#f-outcome").select_option("")
        await page.locator("#clear").click()
        await expect(rows).to_have_count(0, timeout=TIMEOUT_MS)
        await page.close()


async def test_dead_letter_replayed_from_the_page(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    browser: Browser,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    shots: Path,
) -> None:
    """A 400 for a single-activity batch: dead-lettered, replayed from the page, delivered.
    Also the test button's answer, and the console's screenshot."""
    settings = settings_for(sandbox, tmp_path, person_limit=parse_rate("1/1d"))
    async with running(settings) as (public, private):
        sandbox_state.add_fault(Fault(status=400))
        assert await post(session, public, activity("act:cm:login", "dead@example.com")) == 202

        async def letters() -> list[dict[str, Any]]:
            async with session.get(private + "/console/api/dead-letters") as resp:
                found: list[dict[str, Any]] = (await resp.json())["dead_letters"]
                return found

        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while not await letters():
            assert loop.time() < deadline, "no dead letter"
            await asyncio.sleep(0.05)
        # Some traffic for the stream (and the screenshot): accepted and refused.
        assert await post(session, public, activity("act:cm:signup", "ok@example.com")) == 202
        assert await post(session, public, activity("act:cm:signup", "ok@example.com")) == 429
        assert await post(session, public, activity("act:cm:nope", "x@example.com")) == 404
        await wait_for(lambda: len(sandbox_state.activities) == 1, DEADLINE)

        page = await open_console(browser, private)
        await send_test(page, "act:cm:flight-booked", "console-test@example.com")
        await wait_for(lambda: len(sandbox_state.activities) == 2, DEADLINE)
        dead = page.locator("#dead-letters tr.dead-letter")
        await expect(dead).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(dead).to_contain_text("act:cm:login")
        await dead.locator("button", has_text="Inspect").click()
        await expect(page.locator("#dl-payload")).to_contain_text("****@example.com")
        await page.locator("#delivery").wait_for(timeout=TIMEOUT_MS)
        await expect(page.locator("#delivery")).to_contain_text("Dead letters")
        await take_screenshot(page, shots / "console.png")
        await dead.locator("button.replay").click()
        await expect(page.locator("#dl-note")).to_have_text("re-queued 1", timeout=TIMEOUT_MS)
        await expect(dead).to_have_count(0, timeout=TIMEOUT_MS)
        await wait_for(
            lambda: any(a.email == "dead@example.com" for a in sandbox_state.activities),
            DEADLINE,
        )
        await page.close()


async def test_demo_screenshot(browser: Browser, shots: Path) -> None:
    """The demo page after one activity, for the README."""
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(run_demo(HostPort("127.0.0.1", port), stop=stop))
    try:
        page = await browser.new_page(viewport={"width": 1200, "height": 900})
        url = f"http://127.0.0.1:{port}/demo/"
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            try:
                await page.goto(url)
                break
            except Exception:
                assert not task.done(), "the demo stopped"
                assert asyncio.get_running_loop().time() < deadline, "the demo did not start"
                await asyncio.sleep(0.1)
        await page.locator("#identify").click()
        await page.locator("#send-login").click()
        await page.locator("#send-plan").click()
        await expect(page.locator("#received tr").first).to_be_visible(timeout=TIMEOUT_MS)
        await take_screenshot(page, shots / "demo.png")
        await page.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# --- `--workers 2`: the supervisor's console shows both workers' events (Redis feed).


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.content:
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


@pytest.mark.redis
@pytest.mark.slow
async def test_workers_streams_are_merged(
    sandbox: TestServer, session: aiohttp.ClientSession, tmp_path: Path, reaper: list[Any]
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    directory = tmp_path / "redis"
    directory.mkdir()
    with redis_support.running(directory) as redis_server:
        gw = GatewayProcess(
            upstream,
            tmp_path / "spool.sqlite3",
            tmp_path / "gw.log",
            args=("--workers", "2"),
            env={"GATEWAY_REDIS_URL": redis_server.url},
        )
        reaper.append(gw)
        await gw.start(session)
        private = f"http://127.0.0.1:{gw.metrics_port}"
        seen: set[int] = set()
        async with session.get(private + "/console/events") as resp:
            assert resp.status == 200

            async def collect() -> None:
                async for event in read_events(resp):
                    if "worker" in event:
                        seen.add(event["worker"])
                    if seen == {0, 1}:
                        return

            collecting = asyncio.create_task(collect())
            # New connections spread over the workers (SO_REUSEPORT): send until both spoke.
            i = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not collecting.done():
                assert loop.time() < deadline, f"events only from workers {seen}"
                async with aiohttp.ClientSession() as fresh:
                    await post(fresh, gw.url, activity("act:cm:login", f"w{i}@example.com"))
                i += 1
                await asyncio.wait([collecting], timeout=0.05)
            await collecting
        assert seen == {0, 1}
        await gw.stop_async()
