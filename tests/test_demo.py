"""`ortto-gateway demo`: the page in Chromium, and the command's start and stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import expect

from gateway.config import HostPort
from gateway.demo import run_demo
from gateway.sandbox import wait_for
from tests.conftest import need_binary
from tests.servers import ROOT, run_chromium

DEADLINE = 10.0
DEMO_URL = re.compile(r"demo page:\s+(http://\S+/demo/)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def demo_url(capsys: pytest.CaptureFixture[str]) -> AsyncIterator[str]:
    """`run_demo` in this process on a port the OS picks; its printed URL."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_demo(HostPort("127.0.0.1", 0), stop=stop))
    printed: list[str] = []

    def started() -> bool:
        if task.done():
            return True
        printed.append(capsys.readouterr().err)
        return DEMO_URL.search("".join(printed)) is not None

    try:
        await wait_for(started, DEADLINE)
        if task.done():
            task.result()  # raises what stopped it
            raise AssertionError("run_demo returned before printing its URLs")
        match = DEMO_URL.search("".join(printed))
        assert match is not None
        yield match[1]
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


@pytest.mark.chromium
async def test_demo_page_shows_deliveries_and_the_limit(demo_url: str, tmp_path: Path) -> None:
    """Identify, click 11 times: 10 rows arrive at the sandbox, the 11th answer is 429."""
    chromium = need_binary("chromium", "/usr/bin/chromium")
    async with run_chromium(chromium) as browser:
        page = await browser.new_page(viewport={"width": 1100, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        await page.goto(demo_url)
        await page.fill("#email", "ada@example.com")
        await page.fill("#first", "Ada")
        await page.click("#identify")
        await expect(page.locator("#status")).to_contain_text("ada@example.com")
        for _ in range(11):
            await page.click("#send-login")

        answers = page.locator("#answers tr")
        received = page.locator("#received tr")
        await expect(answers).to_have_count(11, timeout=DEADLINE * 1000)
        await expect(page.locator("#answers tr.s202")).to_have_count(10)
        await expect(page.locator("#answers tr.s429")).to_have_count(1)
        await expect(page.locator("#answers tr.s429")).to_contain_text("limit per person")
        # Retry times in hours and minutes, not tens of thousands of seconds.
        await expect(page.locator("#answers tr.s429")).to_contain_text(
            re.compile(r"retry in \d+ h( \d+ min)?\b")
        )
        assert not re.search(r"\d{3,} s\b", await page.locator("#answers").inner_text())
        await expect(received).to_have_count(10, timeout=DEADLINE * 1000)
        await expect(page.locator("#count")).to_have_text("(10)")
        rows = await received.evaluate_all(
            "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        assert sorted(int(r[0]) for r in rows) == list(range(1, 11))
        assert {(r[1], r[2], r[3], r[5]) for r in rows} == {
            ("act:cm:login", "ada@example.com", "Ada", "127.0.0.1")
        }
        # The attributes as sent, and each activity's key in full: ten different keys.
        assert all(r[4].startswith('str:cm:web-browser="Mozilla/5.0') for r in rows), rows
        keys = {r[7] for r in rows}
        assert len(keys) == 10 and all(len(k) > 12 for k in keys), keys

        shot = tmp_path / "demo.png"
        await page.screenshot(path=str(shot), full_page=True)
        data = shot.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width == 1100 and height >= 900
        assert len(data) > 30_000  # text and tables, not a blank page
        assert problems == []
        await page.close()


async def test_demo_command_prints_urls_and_stops_on_sigint() -> None:
    """`python -m gateway demo` prints its URLs, serves, and exits 0 on Ctrl-C."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "demo",
        "--listen",
        "127.0.0.1:0",
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []

        async def until_ready() -> None:
            while not lines or "Ctrl-C stops." not in lines[-1]:
                line = await proc.stderr.readline()  # type: ignore[union-attr]
                if not line:
                    raise AssertionError("demo exited early:\n" + "".join(lines))
                lines.append(line.decode())

        await asyncio.wait_for(until_ready(), DEADLINE)
        text = "".join(lines)
        urls = dict(re.findall(r"^\s+([a-z ]+):\s+(http://\S+)$", text, re.MULTILINE))
        assert set(urls) == {"demo page", "endpoint", "shim", "metrics", "sandbox"}, text
        async with aiohttp.ClientSession() as session:
            for name in ("demo page", "shim", "metrics"):
                async with session.get(urls[name]) as resp:
                    assert resp.status == 200, (name, urls[name])
        proc.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(proc.communicate(), DEADLINE)
        assert proc.returncode == 0, text + rest.decode()
        assert "demo stopped." in rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


@pytest.mark.parametrize(
    ("args", "listen"), [([], "127.0.0.1:8080"), (["PORT=8090"], "127.0.0.1:8090")]
)
def test_make_demo_takes_a_port(args: list[str], listen: str) -> None:
    """`make demo PORT=8090` passes the port to the demo (shown with -n, not run)."""
    make = need_binary("make")
    env = {k: v for k, v in os.environ.items() if k not in {"PORT", "MAKEFLAGS", "MAKELEVEL"}}
    done = subprocess.run(
        [make, "-n", "demo", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert f"ortto-gateway demo --listen {listen}\n" in done.stdout


async def test_demo_without_its_slash_redirects_there(demo_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(demo_url.rstrip("/"), allow_redirects=False) as resp:
            assert resp.status in (301, 308)
            assert resp.headers["Location"] == "/demo/"
        async with session.get(demo_url.rstrip("/")) as resp:
            assert resp.status == 200 and str(resp.url) == demo_url
