"""Scale-out: several gateway processes (hosts or --workers) share exact limits in Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway import workers
from gateway.cli import main
from gateway.config import HostPort
from gateway.sandbox import SandboxState, wait_for
from gateway.server import free_port
from tests import redis_support
from tests.conftest import API_KEY, GatewayFactory, base_settings
from tests.processes import GatewayProcess

PATH = "/v1/activities/create"
pytestmark = pytest.mark.redis


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        yield s


def body(email: str, activity_id: str = "act:cm:login") -> dict[str, Any]:
    return {"activity_id": activity_id, "fields": {"str::email": email}}


@pytest.mark.slow
async def test_three_processes_share_exact_limits(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    redis_server: redis_support.RedisServer,
    tmp_path: Path,
    reaper: list[Any],
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    env = {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_UPSTREAM_RATE": "100"}
    gateways = [
        GatewayProcess(upstream, tmp_path / f"spool{i}.sqlite3", tmp_path / f"gw{i}.log", env=env)
        for i in range(3)
    ]
    reaper.extend(gateways)
    await asyncio.gather(*(g.start(session) for g in gateways))
    try:
        statuses: Counter[int] = Counter()

        async def post(i: int, payload: dict[str, Any], ip: str) -> None:
            url = gateways[i % 3].url + PATH
            async with session.post(url, json=payload, headers={"X-Forwarded-For": ip}) as resp:
                statuses[resp.status] += 1

        # 5 people, 30 attempts each, from distinct addresses, spread over the replicas.
        person_load = [
            post(i, body(f"person{i % 5}@example.com"), f"198.51.100.{i % 250 + 1}")
            for i in range(150)
        ]
        # One address, 150 different people, a second activity.
        ip_load = [
            post(i, body(f"visitor{i}@example.com", "act:cm:signup"), "203.0.113.50")
            for i in range(150)
        ]
        await asyncio.gather(*person_load, *ip_load)
        for g in gateways:
            async with session.get(f"http://127.0.0.1:{g.metrics_port}/metrics") as resp:
                text = await resp.text()
            errors = [
                x for x in text.splitlines() if x.startswith("ortto_gateway_limiter_errors_total")
            ]
            assert errors == ["ortto_gateway_limiter_errors_total 0.0"], g.log_path.read_text()[
                -3000:
            ]
        assert statuses[202] == 5 * 10 + 100
        assert statuses[429] == 300 - 150

        def arrived() -> Counter[str]:
            return Counter(a.activity_id for a in sandbox_state.activities)

        await wait_for(lambda: sum(arrived().values()) == 150, timeout=20)
        per_person = Counter(
            a.email for a in sandbox_state.activities if a.activity_id == "act:cm:login"
        )
        assert set(per_person.values()) == {10}
        assert len(per_person) == 5
        signups = [a for a in sandbox_state.activities if a.activity_id == "act:cm:signup"]
        assert len(signups) == 100
        assert {a.source_ip for a in signups} == {"203.0.113.50"}
        # Each replica took part.
        assert all(g.log_path.read_text().count('"status":202') > 0 for g in gateways)
    finally:
        for g in gateways:
            assert await g.stop_async(signal.SIGTERM) == 0


@pytest.mark.slow
async def test_workers_share_one_port_and_one_metrics_listener(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    redis_server: redis_support.RedisServer,
    tmp_path: Path,
    reaper: list[Any],
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    gw = GatewayProcess(
        upstream,
        tmp_path / "spool.sqlite3",
        tmp_path / "workers.log",
        args=("--workers", "2"),
        env={"GATEWAY_REDIS_URL": redis_server.url},
    )
    reaper.append(gw)
    await gw.start(session)
    try:
        statuses: Counter[int] = Counter()

        async def post(i: int) -> None:
            payload = body("same@example.com")
            headers = {"X-Forwarded-For": f"198.51.100.{i + 1}", "Connection": "close"}
            async with session.post(gw.url + PATH, json=payload, headers=headers) as resp:
                statuses[resp.status] += 1

        await asyncio.gather(*(post(i) for i in range(40)))
        assert statuses == {202: 10, 429: 30}
        await wait_for(lambda: len(sandbox_state.activities) == 10, timeout=10)
        metrics_url = f"http://127.0.0.1:{gw.metrics_port}/metrics"

        async def accepted() -> float:
            async with session.get(metrics_url) as resp:
                text = await resp.text()
            total = 0.0
            for line in text.splitlines():
                if line.startswith("ortto_gateway_activities_total{") and (
                    'outcome="accepted"' in line and 'activity_id="act:cm:login"' in line
                ):
                    total += float(line.rsplit(" ", 1)[1])
            return total

        assert await accepted() == 10
        # Ready means one worker answers; the other may still be starting.
        await wait_for(lambda: gw.log_path.read_text().count('"msg":"listening"') >= 2)
        log = gw.log_path.read_text()
        assert log.count('"msg":"listening"') == 2
        spools = sorted(p.name for p in tmp_path.glob("spool.w*.sqlite3"))
        assert spools == ["spool.w0.sqlite3", "spool.w1.sqlite3"]
    finally:
        assert await gw.stop_async(signal.SIGTERM) == 0
    assert API_KEY not in gw.log_path.read_text()


def test_workers_without_redis_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"GATEWAY_API_KEY": API_KEY}
    assert main(["serve", "--workers", "2"], env) == 2
    err = capsys.readouterr().err
    assert "GATEWAY_REDIS_URL" in err
    assert "multiply" in err


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("local", 202), ("open", 202)])
async def test_dead_redis_follows_the_on_error_mode(
    make_gateway: GatewayFactory, mode: str, status: int
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await make_gateway(redis_url=dead, limiter_on_error=mode)
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.post(PATH, json=body("r@example.com"))
    # A refused connection answers at once; the bug this catches is a request that waits
    # on Redis without its timeout (forever), so the bound is generous, not a speed test.
    assert loop.time() - started < 10.0
    assert resp.status == status, await resp.text()
    if status == 503:
        assert int(resp.headers["Retry-After"]) >= 1


async def test_local_mode_keeps_limiting_while_redis_is_down(
    make_gateway: GatewayFactory,
) -> None:
    from gateway.keys import METRICS

    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await make_gateway(redis_url=dead, limiter_on_error="local")
    results = [(await client.post(PATH, json=body("local@example.com"))).status for _ in range(11)]
    assert results == [202] * 10 + [429]
    errors = client.app[METRICS].registry.get_sample_value("ortto_gateway_limiter_errors_total")
    assert errors is not None and errors >= 1


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: no reaper may be waiting for an orphan here)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


@pytest.mark.slow
async def test_workers_drain_and_leave_when_their_supervisor_is_killed(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    redis_server: redis_support.RedisServer,
    tmp_path: Path,
    reaper: list[Any],
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    spool = tmp_path / "spool.sqlite3"
    env = {"GATEWAY_REDIS_URL": redis_server.url}
    gw = GatewayProcess(upstream, spool, tmp_path / "a.log", args=("--workers", "2"), env=env)
    reaper.append(gw)
    await gw.start(session)
    started = next(
        json.loads(line)
        for line in gw.log_path.read_text().splitlines()
        if '"msg":"workers started"' in line
    )
    async with session.post(gw.url + PATH, json=body("kept@example.com")) as resp:
        assert resp.status == 202
    gw.stop(signal.SIGKILL)  # the supervisor alone: it cannot pass anything on
    await wait_for(lambda: all(_gone(pid) for pid in started["pids"]), timeout=15)
    assert gw.log_path.read_text().count("the supervisor is gone") == 2
    assert [a.email for a in sandbox_state.activities] == ["kept@example.com"]
    # Their spool files are free again: a new gateway starts on them.
    again = GatewayProcess(upstream, spool, tmp_path / "b.log", args=("--workers", "2"), env=env)
    reaper.append(again)
    await again.start(session)
    assert await again.stop_async(signal.SIGTERM) == 0


async def test_a_second_gateway_on_the_same_spool_is_refused(
    sandbox: TestServer, session: aiohttp.ClientSession, tmp_path: Path, reaper: list[Any]
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    spool = tmp_path / "spool.sqlite3"
    first = GatewayProcess(upstream, spool, tmp_path / "first.log")
    reaper.append(first)
    await first.start(session)
    second = GatewayProcess(upstream, spool, tmp_path / "second.log")
    code, _, err = await asyncio.to_thread(second.run_to_exit)
    assert code == 3
    assert err.splitlines()[-1] == (
        f"ortto-gateway: GATEWAY_SPOOL_PATH {spool} is in use by another gateway process "
        "(stop that gateway, or set GATEWAY_SPOOL_PATH to another file)"
    )
    assert await first.stop_async(signal.SIGTERM) == 0


async def test_a_worker_whose_supervisor_died_before_it_started_stops(
    sandbox: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The supervisor's pid comes from the spawn: a worker started after its death (its
    # parent already the reaper) must not take the reaper for its supervisor.
    settings = base_settings(
        tmp_path,
        str(sandbox.make_url("")),
        listen=HostPort("127.0.0.1", free_port()),
        metrics_listen=HostPort("127.0.0.1", free_port()),
    )
    not_my_parent = os.getppid() + 1_000_000
    await asyncio.wait_for(workers._run_worker(settings, 0, not_my_parent), timeout=10)
    assert any("the supervisor is gone" in r.getMessage() for r in caplog.records)


def test_a_worker_whose_spool_cannot_be_opened_stops_the_gateway_with_exit_2(
    tmp_path: Path,
) -> None:
    """A restart cannot fix a spool the disk refuses: `--workers 2` exits 2, as `serve`
    does, instead of restarting workers every second."""
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    gw = GatewayProcess(
        "http://127.0.0.1:9",
        blocker / "spool.sqlite3",
        tmp_path / "gw.log",
        args=("--workers", "2"),
        env={"GATEWAY_REDIS_URL": "redis://127.0.0.1:9/0"},  # never reached: no worker starts
    )
    code, out, err = gw.run_to_exit(timeout=60)
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert "is not a directory" in err
    assert '"msg":"worker cannot start; stopping"' in err  # the workers' path, not the parent's
