"""Shared fixtures: the sandbox upstream and gateways built through `create_app`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.feed import Forwarded
from gateway.keys import METRICS
from gateway.metrics import Metrics
from gateway.sandbox import SandboxState, create_sandbox_app
from gateway.server import runner_options

if TYPE_CHECKING:
    from tests.redis_support import RedisServer

EXAMPLES = Path(__file__).parent / "ortto-examples"
API_KEY = "pk-test-5f1e0c7a9b8d4e3f2a1b0c9d8e7f6a5b"
ACTIVITIES = "act:cm:logged-in,act:cm:flight-booked,act:cm:login,act:cm:signup"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def need_binary(name: str, path: str | None = None) -> str:
    """The path of a system binary; skip locally, fail in CI, when it is missing."""
    found = path if path and os.path.exists(path) else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (apt-get install it; .ci/run does)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# -- `make test-fast`: the pure modules, without the tests that start servers
#
# A test is `integration` when it starts a server or a process: it uses a fixture that
# does (INTEGRATION_FIXTURES, through any chain of fixtures), carries a marker of a real
# server (INTEGRATION_MARKERS), is one of INTEGRATION_TESTS (those that start a process
# in their own body), or is marked `integration` by hand. `make test-fast` runs
# `-m "not integration"`. Any other test that starts a process or listens on a socket
# fails (`only_integration_starts_servers`), so the split cannot drift silently.
INTEGRATION_FIXTURES = frozenset(
    {"aiohttp_server", "aiohttp_client", "aiohttp_raw_server", "reaper", "unused_tcp_port"}
)
INTEGRATION_MARKERS = ("integration", "nginx", "chromium", "redis", "slow")
INTEGRATION_TESTS = (  # node id prefixes, under tests/
    "test_demo.py::",
    "test_server.py::",
    "test_bench.py::",
    "test_abuse.py::test_readme_node_helper_matches",
    "test_spool.py::test_everything_acknowledged_survives_sigkill",
    "test_operations.py::test_promtool_checks_rules_config_and_unit_tests",
    "test_operations.py::test_systemd_analyze_verify",
    "test_operations.py::test_compose_config_with_docker_cli",
)
NOT_MARKED = (
    "{what} in a test not marked `integration`: use a fixture of INTEGRATION_FIXTURES, "
    "a marker of INTEGRATION_MARKERS (tests/conftest.py) or @pytest.mark.integration"
)


def is_integration(item: pytest.Item) -> bool:
    """Whether the test starts a server or a process (see INTEGRATION_FIXTURES)."""
    if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    if item.nodeid.removeprefix("tests/").startswith(INTEGRATION_TESTS):
        return True
    return any(item.get_closest_marker(name) is not None for name in INTEGRATION_MARKERS)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by it
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_integration(item) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def only_integration_starts_servers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside `integration` tests, starting a process or listening on a socket fails."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def no_process(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(NOT_MARKED.format(what="a process started"))

    def no_listen(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(NOT_MARKED.format(what="a socket listening"))

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setattr(socket.socket, "listen", no_listen)


@pytest.fixture
def sandbox_state() -> SandboxState:
    return SandboxState(api_key=API_KEY)


@pytest.fixture
async def sandbox(
    aiohttp_server: Callable[..., Awaitable[TestServer]], sandbox_state: SandboxState
) -> TestServer:
    return await aiohttp_server(create_sandbox_app(sandbox_state))


def base_settings(tmp_path: Path, upstream: str, **overrides: Any) -> Settings:
    env = {
        "GATEWAY_API_KEY": API_KEY,
        "GATEWAY_UPSTREAM_URL": upstream,
        "GATEWAY_ACTIVITIES": ACTIVITIES,
        "GATEWAY_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
        "GATEWAY_BATCH_MAX_WAIT": "10ms",
        "GATEWAY_UPSTREAM_RATE": "1000",
        "GATEWAY_DRAIN_TIMEOUT": "1s",
        # Pinned: `auto` times this machine's fsync, so each gateway could differ; tests
        # whose subject is the spool run both modes (test_spool's `commit_on`).
        "GATEWAY_SPOOL_COMMIT": "loop",
        # Generous: a busy machine's Redis call may take longer than the 0.5 s default.
        "GATEWAY_LIMITER_TIMEOUT": "5s",
    }
    settings = load_settings(env)
    return replace(settings, **overrides) if overrides else settings


GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_gateway(
    sandbox: TestServer,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> GatewayFactory:
    """Build a gateway against the sandbox; keyword arguments override settings.

    The sandbox comes first so it is torn down last: a gateway's drain at teardown
    delivers to it instead of retrying a closed port until its drain timeout."""

    async def factory(
        *, clock: Callable[[], float] | None = None, **overrides: Any
    ) -> TestClient[web.Request, web.Application]:
        settings = base_settings(tmp_path, str(sandbox.make_url("")), **overrides)
        metrics = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
        app = create_app(settings, metrics=metrics, clock=clock or time.time)
        # The production server's options (its parser leaves bodies compressed, see body.py);
        # given to start_server: aiohttp_client's server_kwargs never reach the runner.
        server = TestServer(app)
        await server.start_server(**runner_options(settings))
        return await aiohttp_client(server)

    return factory


class FakeClock:
    """A settable clock for limit windows and ages."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def example(name: str) -> bytes:
    """One of Ortto's documented request bodies."""
    return (EXAMPLES / name).read_bytes()


@pytest.fixture
def reaper() -> Iterator[list[Any]]:
    """Objects with a `kill()` that teardown calls, so a failing test leaks no process."""
    spawned: list[Any] = []
    yield spawned
    for item in spawned:
        item.kill()


def request_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The data of the last request line of the activities route (caplog at INFO)."""
    lines = [
        data
        for record in caplog.records
        if record.getMessage() == "request"
        and (data := getattr(record, "data", {})).get("route") == "activities"
    ]
    assert lines, "no request line: is caplog at INFO for gateway.http?"
    result: dict[str, Any] = lines[-1]
    return result


def refusals(
    client: TestClient[web.Request, web.Application], activity_id: str, reason: str
) -> float:
    """`ortto_gateway_refusals_total` for one activity id and reason."""
    labels = {"activity_id": activity_id, "reason": reason}
    value = client.app[METRICS].registry.get_sample_value("ortto_gateway_refusals_total", labels)
    return value or 0.0


# -- real Redis servers (tests/redis_support.py)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone."""
    from tests import redis_support  # it needs this module's need_binary

    directory = tmp_path / "redis"
    directory.mkdir()
    with redis_support.running(directory) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by a module's tests that do not stop it; each uses its own
    prefix."""
    from tests import redis_support

    with redis_support.running(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop, freeze and restart."""
    from tests import redis_support

    with redis_support.running(tmp_path) as running:
        yield running


def forwarded(key: str, body: dict[str, Any], answer: dict[str, Any] | None = None) -> Forwarded:
    """A record of what was forwarded to Ortto (a 200), as delivery gives the feed."""
    return {"key": key, "time": 1.0, "body": body, "status": 200, "answer": answer or {}}
