"""The gateway as a process: crashes lose nothing, restarts deliver the spool, signals drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway import compiled
from gateway.keys import LIFECYCLE
from gateway.sandbox import Fault, SandboxState, wait_for
from tests.conftest import ACTIVITIES, API_KEY, GatewayFactory
from tests.processes import GatewayProcess

PATH = "/v1/activities/create"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _load(
    session: aiohttp.ClientSession, url: str, accepted: list[str], stop_after: int
) -> None:
    """Post single activities from 8 workers until `stop_after` were accepted or errors."""
    counter = iter(range(10**6))

    async def worker() -> None:
        while len(accepted) < stop_after:
            n = next(counter)
            email = f"crash{n}@example.com"
            body = {"activity_id": "act:cm:login", "fields": {"str::email": email}}
            # Many clients behind the trusted local proxy: the per-IP limit does not bite.
            client_ip = f"198.51.{n // 250 % 250}.{n % 250 + 1}"
            try:
                async with session.post(
                    url + PATH, json=body, headers={"X-Forwarded-For": client_ip}
                ) as resp:
                    if resp.status == 202:
                        accepted.append(email)
            except aiohttp.ClientError:
                return

    await asyncio.gather(*(worker() for _ in range(8)))


@pytest.mark.slow
@pytest.mark.parametrize("commit_on", ["loop", "thread"])
@pytest.mark.parametrize("kill_after", [1, 40, 300])
async def test_sigkill_loses_nothing_and_duplicates_nothing(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    kill_after: int,
    commit_on: str,
    reaper: list[Any],
) -> None:
    sandbox_state.latency = 0.02  # batches are in flight when the kill lands
    upstream = str(sandbox.make_url("")).rstrip("/")
    spool = tmp_path / "spool.sqlite3"
    first = GatewayProcess(
        upstream, spool, tmp_path / "first.log", env={"GATEWAY_SPOOL_COMMIT": commit_on}
    )
    reaper.append(first)
    await first.start(session)
    accepted: list[str] = []
    load = asyncio.create_task(_load(session, first.url, accepted, kill_after))
    await wait_for(lambda: len(accepted) >= kill_after, timeout=30)
    first.stop(signal.SIGKILL)
    await load
    second = GatewayProcess(upstream, spool, tmp_path / "second.log")
    reaper.append(second)
    await second.start(session)
    try:
        expected = set(accepted)
        await wait_for(lambda: expected <= {a.email for a in sandbox_state.activities}, timeout=30)
    finally:
        assert await second.stop_async(signal.SIGTERM) == 0
    received = Counter(a.email for a in sandbox_state.activities)
    assert all(received[e] == 1 for e in expected), "an accepted activity arrived twice"
    keys = Counter(a.key for a in sandbox_state.activities)
    assert max(keys.values()) == 1


@pytest.mark.slow
async def test_sigterm_drains_and_exits_cleanly(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    reaper: list[Any],
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    gw = GatewayProcess(upstream, tmp_path / "spool.sqlite3", tmp_path / "gw.log")
    reaper.append(gw)
    await gw.start(session)
    for i in range(20):
        body = {"activity_id": "act:cm:login", "fields": {"str::email": f"t{i}@example.com"}}
        async with session.post(gw.url + PATH, json=body) as resp:
            assert resp.status == 202
    assert await gw.stop_async(signal.SIGTERM) == 0
    log = gw.log_path.read_text()
    # The process chose as this one did: the same tree, the same environment.
    assert f'"compiled":"{compiled.summary()}"' in log
    assert '"msg":"shutting down: draining"' in log
    assert '"msg":"stopped"' in log
    assert "drain timeout" not in log  # the drain delivered everything before exiting
    assert API_KEY not in log
    await wait_for(lambda: len(sandbox_state.activities) == 20)


@pytest.mark.slow
async def test_while_draining_the_listener_answers_503_and_failures_are_retried(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    reaper: list[Any],
) -> None:
    upstream = str(sandbox.make_url("")).rstrip("/")
    gw = GatewayProcess(upstream, tmp_path / "spool.sqlite3", tmp_path / "gw.log")
    reaper.append(gw)
    await gw.start(session)
    # The first delivery fails slowly: the drain must outlast it and send the batch again.
    sandbox_state.add_fault(Fault(status=503, count=1, delay=1.0))
    body = {"activity_id": "act:cm:login", "fields": {"str::email": "drain@example.com"}}
    async with session.post(gw.url + PATH, json=body) as resp:
        assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.requests) == 1)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        async with session.get(gw.url + "/readyz") as resp:
            return resp.status == 503

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not await draining():
        assert loop.time() < deadline, "readyz never answered 503"
        await asyncio.sleep(0.02)
    async with session.post(gw.url + PATH, json=body) as resp:
        assert resp.status == 503  # an answer, not a refused connection
        assert resp.headers["Retry-After"] == "5"
        assert "shutting down" in (await resp.json())["error"]
    assert await gw.stop_async(signal.SIGTERM) == 0
    assert [r.status for r in sandbox_state.requests] == [503, 200]
    assert [a.email for a in sandbox_state.activities] == ["drain@example.com"]
    assert "drain timeout" not in gw.log_path.read_text()


async def test_restart_delivers_what_a_wrong_key_left_spooled(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.api_key = "the-key-ortto-expects"
    client = await make_gateway()
    for i in range(5):
        body = {"activity_id": "act:cm:login", "fields": {"str::email": f"k{i}@example.com"}}
        assert (await client.post(PATH, json=body)).status == 202
    await wait_for(lambda: any(r.status == 401 for r in sandbox_state.requests))
    await client.close()
    assert sandbox_state.activities == []
    # Fix the key and restart on the same spool: everything arrives.
    sandbox_state.api_key = API_KEY
    client = await make_gateway()
    await wait_for(lambda: len(sandbox_state.activities) == 5)
    await client.close()


async def test_spool_full_is_503_then_accepts_after_draining(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.add_fault(Fault(status=503, count=10**6))
    client = await make_gateway(spool_max_rows=5)
    for i in range(5):
        body = {"activity_id": "act:cm:login", "fields": {"str::email": f"f{i}@example.com"}}
        assert (await client.post(PATH, json=body)).status == 202
    body = {"activity_id": "act:cm:login", "fields": {"str::email": "full@example.com"}}
    resp = await client.post(PATH, json=body)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["code"] == 503
    sandbox_state.clear_faults()
    await wait_for(lambda: len(sandbox_state.activities) == 5, timeout=10)
    resp = await client.post(PATH, json=body)
    assert resp.status == 202
    # The refused request did not use up the person's budget.
    await wait_for(lambda: len(sandbox_state.activities) == 6)


async def test_readyz_fails_while_draining(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    assert (await client.get("/readyz")).status == 200
    client.app[LIFECYCLE].draining = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "draining"


def test_python_m_gateway_check_config_masks_the_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_API_KEY": API_KEY, "GATEWAY_ACTIVITIES": ACTIVITIES})
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert API_KEY not in out.stdout + out.stderr
    assert '"api_key": "****' in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        env={**env, "GATEWAY_PERSON_LIMIT": "ten a day"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("ortto-gateway: GATEWAY_PERSON_LIMIT:")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_spool_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # As on a full or read-only disk: no traceback, the path and the cause, exit 2.
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    spool = blocker / "spool.sqlite3"
    gw = GatewayProcess("http://127.0.0.1:9", spool, tmp_path / "gw.log")
    code, out, err = gw.run_to_exit()
    assert (code, out) == (2, "")
    assert err == f"ortto-gateway: cannot open the spool {spool}: {blocker} is not a directory\n"


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback address another process (this test) listens on: `127.0.0.1:PORT`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("setting", "args", "env"),
    [
        ("GATEWAY_LISTEN", (), {}),
        ("GATEWAY_METRICS_LISTEN", (), {}),
        # The Redis URL is only checked for presence before the workers start.
        ("GATEWAY_LISTEN", ("--workers", "2"), {"GATEWAY_REDIS_URL": "redis://127.0.0.1:9"}),
        (
            "GATEWAY_METRICS_LISTEN",
            ("--workers", "2"),
            {"GATEWAY_REDIS_URL": "redis://127.0.0.1:9"},
        ),
    ],
)
def test_serve_on_a_port_in_use_is_one_line_naming_the_setting_exit_2(
    tmp_path: Path, taken: str, setting: str, args: tuple[str, ...], env: dict[str, str]
) -> None:
    gw = GatewayProcess(
        "http://127.0.0.1:9",
        tmp_path / "spool.sqlite3",
        tmp_path / "gw.log",
        args=args,
        env={**env, setting: taken},
    )
    code, out, err = gw.run_to_exit()
    assert (code, out) == (2, "")
    assert err == (
        f"ortto-gateway: {setting} {taken}: address already in use "
        f"(another process listens there; set {setting} to another port)\n"
    )


@pytest.mark.parametrize(
    ("command", "fix"),
    [
        ("demo", "give --listen another port, e.g. make demo PORT=8090"),
        ("sandbox", "give --listen another port"),
    ],
)
def test_demo_and_sandbox_on_a_port_in_use_are_one_line_naming_listen_exit_2(
    taken: str, command: str, fix: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    code, out, err = _run([command, "--listen", taken], env)
    assert (code, out) == (2, "")
    assert err == (
        f"ortto-gateway: --listen {taken}: address already in use "
        f"(another process listens there; {fix})\n"
    )


@pytest.mark.parametrize(
    ("name", "cause"), [("missing", "No such file or directory"), (".", "Is a directory")]
)
def test_an_unreadable_key_file_is_one_line_naming_the_setting_exit_2(
    tmp_path: Path, name: str, cause: str
) -> None:
    # Tests run as root, who reads any file: a missing file and a directory stand in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_API_KEY_FILE": str(tmp_path / name), "GATEWAY_ACTIVITIES": ACTIVITIES})
    code, out, err = _run(["serve"], env)
    assert (code, out) == (2, "")
    assert err == f"ortto-gateway: GATEWAY_API_KEY_FILE: cannot read the file it names: {cause}\n"


YOUNG_COLLECTIONS = 'python_gc_collections_total{generation="0"}'


async def test_serving_collects_the_young_generation_rarely(
    sandbox: TestServer, session: aiohttp.ClientSession, tmp_path: Path, reaper: list[Any]
) -> None:
    """`runtime.tune_gc` runs once the server is up. At CPython's default threshold this
    client's 2,000 requests cost 21 young collections (one every ~100: fewer than under
    wrk, where more requests are in flight at once); with it, 1. 3,000 here."""
    upstream = str(sandbox.make_url("")).rstrip("/")
    gateway = GatewayProcess(upstream, tmp_path / "spool.sqlite3", tmp_path / "gw.log")
    reaper.append(gateway)
    await gateway.start(session)
    before = await gateway.metric(session, YOUNG_COLLECTIONS)
    accepted: list[str] = []
    await _load(session, gateway.url, accepted, 3000)
    assert len(accepted) >= 3000
    assert await gateway.metric(session, YOUNG_COLLECTIONS) - before < 10
    assert await gateway.stop_async() == 0
