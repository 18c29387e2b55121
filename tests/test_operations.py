"""Operations kit: the dashboard and alerts against a real Prometheus, and the deploy files.

The main test runs Debian's Prometheus on loopback, scraping a real gateway (`serve`, its
metrics listener on a free port) every second while traffic goes through it, then runs
every dashboard query and every alert expression through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.config import HostPort, load_settings, parse_rate, parse_seconds
from gateway.sandbox import Fault, SandboxState, wait_for
from gateway.server import free_port, serve
from tests.conftest import ACTIVITIES, API_KEY, base_settings, need_binary
from tests.ops_support import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    DOCKER,
    GRAFANA_PROVISIONING,
    KUBERNETES,
    PROMETHEUS_CONFIG,
    ROOT,
    SYSTEMD_UNIT,
    Prometheus,
    alert_rules,
    dashboard_targets,
    exported_names,
    metric_names,
    selectors,
    substitute,
)

PATH = "/v1/activities/create"
JOB = "ortto-gateway"
SPOOL_DIR = "/var/lib/ortto-gateway"
# DEFAULT_BASE of deploy/prometheus/runbook_base.py (tests/test_docs.py checks they agree).
RUNBOOK_BASE = "https://github.com/ortto-gateway/ortto-gateway/blob/main/docs/monitoring.md"
ALERT_NAMES = {
    "OrttoGatewayDown",
    "OrttoGatewayDeliveryPaused",
    "OrttoGatewaySpoolBacklog",
    "OrttoGatewaySpoolFull",
    "OrttoGatewaySpoolUnwritable",
    "OrttoGatewayDeadLetters",
    "OrttoGatewayUpstreamErrors",
    "OrttoGatewayBadAnswers",
    "OrttoGatewayLimiterErrors",
}
# Panels that must show data once traffic has flowed (title -> why).
CORE_PANELS = {
    "Accepted / s",
    "Activities by outcome",
    "Accepted by activity",
    "Refused by reason and activity",
    "Rate-limit refusals by limit",
    "Requests by route and status",
    "Request latency (p50, p99)",
    "Upstream requests by status",
    "Upstream latency (p50, p99)",
    "Batch size",
    "Delivered and dead-lettered",
    "Delivery paused",
    "Spool depth",
    "Oldest spooled activity",
    "Dead letters",
    "Version",
    "Memory",
}


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def rules() -> list[dict[str, Any]]:
    return alert_rules(yaml.safe_load(ALERTS.read_text()))


def settings_from(env: dict[str, str], tmp_path: Path) -> None:
    """Load GATEWAY_* settings as the gateway would (an unknown name is an error)."""
    env = dict(env)
    if "GATEWAY_API_KEY_FILE" in env:
        key = tmp_path / "ortto-api-key"
        key.write_text(API_KEY + "\n")
        env["GATEWAY_API_KEY_FILE"] = str(key)
    settings = load_settings(env, require_api_key=False)
    assert settings.spool_path.startswith(SPOOL_DIR + "/"), settings.spool_path


# --- the gateway, live on loopback


@dataclass
class LiveGateway:
    public: str
    metrics: str
    metrics_target: str


@pytest.fixture
async def live_gateway(sandbox: TestServer, tmp_path: Path) -> AsyncIterator[LiveGateway]:
    """`gateway.server.serve` (public and metrics listeners on free ports) in this loop."""
    settings = base_settings(
        tmp_path,
        str(sandbox.make_url("")),
        listen=HostPort("127.0.0.1", 0),
        metrics_listen=HostPort("127.0.0.1", 0),
        person_limit=parse_rate("3/1d"),
        ip_limit=parse_rate("6/1h"),
    )
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    def on_ready(public: int, metrics: int) -> None:
        ready.set_result((public, metrics))

    task = asyncio.create_task(serve(settings, stop=stop, on_ready=on_ready))
    waiting: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        stop.set()
        await task  # raises what stopped it
        raise AssertionError("the gateway did not start")
    public, metrics = ready.result()
    try:
        yield LiveGateway(
            public=f"http://127.0.0.1:{public}",
            metrics=f"http://127.0.0.1:{metrics}/metrics",
            metrics_target=f"127.0.0.1:{metrics}",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def prometheus(tmp_path: Path) -> Any:
    binary = need_binary("prometheus", "/usr/bin/prometheus")
    server = Prometheus(binary, tmp_path / "prometheus")
    yield server
    server.stop()


def activity(activity_id: str, email: str) -> dict[str, Any]:
    return {"activity_id": activity_id, "fields": {"str::email": email}, "attributes": {}}


async def drive_traffic(
    session: aiohttp.ClientSession, gw: LiveGateway, sandbox_state: SandboxState
) -> None:
    """Accepted, refused for each reason, delivered, retried after a 503, dead-lettered."""
    url = gw.public + PATH
    statuses = []
    for email, times in (("a@example.com", 4), ("b@example.com", 3), ("c@example.com", 1)):
        for _ in range(times):
            async with session.post(url, json=activity("act:cm:login", email)) as resp:
                statuses.append(resp.status)
    # person limit 3/1d: a's 4th is refused; IP limit 6/1h: c finds the IP budget spent.
    assert statuses == [202, 202, 202, 429, 202, 202, 202, 429], statuses
    async with session.post(url, json=activity("act:cm:signup", "a@example.com")) as resp:
        assert resp.status == 202
    async with session.post(url, json=activity("act:cm:not-enabled", "a@example.com")) as resp:
        assert resp.status == 404
    async with session.post(url, data=b"{", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    async with session.post(
        url, json=activity("act:cm:login", "d@example.com"), headers={"Origin": "https://evil.test"}
    ) as resp:
        assert resp.status == 403
    async with session.options(
        url,
        headers={"Origin": gw.public, "Access-Control-Request-Method": "POST"},
    ) as resp:
        assert resp.status < 500
    for path in ("/ortto-relay.js", "/healthz", "/readyz"):
        async with session.get(gw.public + path) as resp:
            assert resp.status == 200, path
    await wait_for(lambda: len(sandbox_state.activities) == 7, timeout=10)

    # One 503 from "Ortto": retried with backoff, then delivered.
    sandbox_state.add_fault(Fault(status=503))
    async with session.post(url, json=activity("act:cm:signup", "e@example.com")) as resp:
        assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 8, timeout=10)

    # A 400 for a batch of one: that activity goes to the dead letters.
    sandbox_state.add_fault(Fault(status=400))
    async with session.post(url, json=activity("act:cm:signup", "f@example.com")) as resp:
        assert resp.status == 202

    async def dead_lettered() -> bool:
        async with session.get(gw.metrics) as resp:
            return "\nortto_gateway_dead_letters 1.0\n" in await resp.text()

    await poll(dead_lettered, 10)

    # A 401: delivery pauses (reason auth) and the activity stays spooled.
    sandbox_state.add_fault(Fault(status=401, count=100))
    async with session.post(url, json=activity("act:cm:signup", "g@example.com")) as resp:
        assert resp.status == 202


async def poll(check: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() >= deadline:
            raise TimeoutError(f"{check.__name__} not true within {timeout} s")
        await asyncio.sleep(0.05)


def prometheus_config(target: str) -> str:
    return str(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
            }
        )
    )


async def test_every_panel_and_alert_query_runs_on_real_prometheus(
    live_gateway: LiveGateway,
    prometheus: Prometheus,
    session: aiohttp.ClientSession,
    sandbox_state: SandboxState,
) -> None:
    prometheus.start(prometheus_config(live_gateway.metrics_target))
    await prometheus.wait_ready(session)
    # A first scrape before the traffic, so rate() sees the counters move.
    await prometheus.wait_query(session, "ortto_gateway_build_info")
    await drive_traffic(session, live_gateway, sandbox_state)

    # Prometheus has scraped the traffic's end (the auth pause, the dead letter) and at
    # least 5 times in all, so rate() over 1m has points on both sides of the traffic.
    await prometheus.wait_query(session, 'ortto_gateway_delivery_paused{reason="auth"} == 1')
    await prometheus.wait_query(session, "ortto_gateway_dead_letters == 1")
    await prometheus.wait_query(session, f'count_over_time(up{{job="{JOB}"}}[1m]) >= 5')

    # The instance variable: label_values(ortto_gateway_build_info, instance).
    values = await prometheus.api(
        session, "label/instance/values", **{"match[]": "ortto_gateway_build_info"}
    )
    assert values["status"] == "success"
    assert live_gateway.metrics_target in values["data"]

    results: dict[str, list[list[dict[str, Any]]]] = {}
    for title, expr in dashboard_targets(dashboard()):
        answer = await prometheus.query(session, substitute(expr))
        assert answer["status"] == "success", (title, expr, answer)
        results.setdefault(title, []).append(answer["data"]["result"])
    for title in CORE_PANELS:
        assert title in results, f"no panel {title!r}"
        for i, result in enumerate(results[title]):
            assert result, f"panel {title!r}, query {i}: no data"

    def value(title: str, index: int = 0, **labels: str) -> float:
        for series in results[title][index]:
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        raise AssertionError(f"{title}: no series {labels}")

    assert value("Accepted by activity", activity_id="act:cm:login") > 0
    assert value("Rate-limit refusals by limit", 0) > 0  # person
    assert value("Rate-limit refusals by limit", 1) > 0  # ip
    # Upstream series appear with their first request (not created at zero), so rate()
    # cannot count that first increment: their presence is what is certain here.
    for status in ("2xx", "503", "401"):
        assert value("Upstream requests by status", status=status) >= 0
    assert value("Delivered and dead-lettered", 0) > 0
    assert value("Delivery paused", reason="auth") == 1
    assert value("Dead letters") == 1
    assert value("Spool depth") >= 1  # the activity held back by the auth pause
    # Quantiles are numbers where there was traffic (NaN for a route that had none).
    for index in (0, 1):
        assert 0 < value("Request latency (p50, p99)", index, route="activities") < 1
        assert 0 < value("Upstream latency (p50, p99)", index) < 10
    for index in (0, 1, 2):
        assert 0 < value("Batch size", index) <= 100

    for rule in rules():
        answer = await prometheus.query(session, rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)

    # The rules file loads into Prometheus and every rule evaluates cleanly; the paused
    # delivery is already a pending OrttoGatewayDeliveryPaused alert.
    async def rules_healthy() -> bool:
        answer = await prometheus.api(session, "rules")
        found = [r for g in answer["data"]["groups"] for r in g["rules"]]
        return {r["name"] for r in found} == ALERT_NAMES and all(r["health"] == "ok" for r in found)

    await poll(rules_healthy, 15)

    async def paused_alert_pending() -> bool:
        answer = await prometheus.api(session, "alerts")
        return any(
            a["labels"]["alertname"] == "OrttoGatewayDeliveryPaused"
            and a["labels"].get("reason") == "auth"
            for a in answer["data"]["alerts"]
        )

    await poll(paused_alert_pending, 15)


async def test_dashboard_and_alerts_use_only_exported_metrics(
    live_gateway: LiveGateway, session: aiohttp.ClientSession
) -> None:
    async with session.get(live_gateway.metrics) as resp:
        assert resp.status == 200
        exported = exported_names(await resp.text()) | {"up"}
    assert "ortto_gateway_build_info" in exported
    assert "ortto_gateway_process_resident_memory_bytes" in exported
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_targets(dashboard()):
        used.setdefault(f"panel {title!r}", set()).update(metric_names(expr))
    for rule in rules():
        used.setdefault(f"alert {rule['alert']}", set()).update(metric_names(rule["expr"]))
    missing = {where: names - exported for where, names in used.items() if names - exported}
    assert not missing, missing
    assert set().union(*used.values()) >= {
        "ortto_gateway_activities_total",
        "ortto_gateway_http_request_seconds_bucket",
        "ortto_gateway_upstream_requests_total",
        "ortto_gateway_upstream_request_seconds_bucket",
        "ortto_gateway_upstream_batch_activities_bucket",
        "ortto_gateway_spool_depth",
        "ortto_gateway_spool_oldest_age_seconds",
        "ortto_gateway_dead_letters",
        "ortto_gateway_delivery_paused",
        "ortto_gateway_limiter_errors_total",
        "ortto_gateway_limiter_evictions_total",
    }


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{x="}y", '
        'instance=~"$instance"}[5m] offset 1m))) / on(i) group_left b + 1e3 * c_total'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c_total"}
    assert selectors(expr) == [
        ("a_bucket", '{x="}y", instance=~"$instance"}'),
        ("b", ""),
        ("c_total", ""),
    ]


# --- Grafana


def test_dashboard_is_importable_and_filtered_by_instance() -> None:
    board = dashboard()
    assert board["uid"] == "ortto-gateway"
    assert board["schemaVersion"] >= 36
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    # Provisioning does not resolve __inputs: panels go through the datasource variable.
    assert "${DS_" not in json.dumps({k: v for k, v in board.items() if k != "__inputs"})
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["includeAll"] and instance["multi"] and instance["allValue"] == ".*"
    assert "label_values(ortto_gateway_build_info, instance)" in json.dumps(instance["query"])

    ids = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
                assert panel["targets"], panel["title"]
            walk(panel.get("panels", []))

    walk(board["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [t for t, _ in dashboard_targets(board)]
    assert len(set(titles)) == len({p["title"] for p in board["panels"] if "targets" in p})
    for title, expr in dashboard_targets(board):
        for name, matchers in selectors(expr):
            assert 'instance=~"$instance"' in matchers, (title, name, expr)
    exprs = " ".join(expr for _, expr in dashboard_targets(board))
    for needle in (
        'outcome="rate_limited_person"',
        'outcome="rate_limited_ip"',
        "histogram_quantile(0.5, sum by (le, route) (rate(ortto_gateway_http_request_seconds",
        "histogram_quantile(0.99, sum by (le, route) (rate(ortto_gateway_http_request_seconds",
        "sum by (status) (rate(ortto_gateway_upstream_requests_total",
    ):
        assert needle in exprs, needle


def test_grafana_provisioning_matches_compose() -> None:
    (datasource,) = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load(
        (GRAFANA_PROVISIONING / "dashboards" / "ortto-gateway.yml").read_text()
    )["providers"]
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert (DOCKER / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    assert (DOCKER / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING


# --- Prometheus rules


def test_alert_rules_are_annotated() -> None:
    found = rules()
    assert {r["alert"] for r in found} == ALERT_NAMES
    for rule in found:
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{rule['alert'].lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")
    down = next(r for r in found if r["alert"] == "OrttoGatewayDown")
    assert f'job="{JOB}"' in down["expr"]
    jobs = [j["job_name"] for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]]
    assert JOB in jobs


def test_runbook_anchors_exist_in_monitoring_page() -> None:
    readme = (ROOT / "docs" / "monitoring.md").read_text()
    assert "## Runbook" in readme
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    }
    for rule in rules():
        assert rule["alert"].lower() in headings, rule["alert"]


def test_promtool_checks_rules_config_and_unit_tests() -> None:
    promtool = need_binary("promtool", "/usr/bin/promtool")
    for args in (
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["test", "rules", str(ALERTS_TEST)],
    ):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    tested = yaml.safe_load(ALERTS_TEST.read_text())
    firing = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {"OrttoGatewayDeliveryPaused", "OrttoGatewaySpoolBacklog"} <= firing
    quiet = [
        case
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    ]
    assert {c["alertname"] for c in quiet} >= ALERT_NAMES


# --- systemd


def unit_directives() -> list[tuple[str, str]]:
    pairs = []
    for line in SYSTEMD_UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    pairs = unit_directives()
    d = dict(pairs)
    expected = {
        "ExecStart": "/opt/ortto-gateway/bin/ortto-gateway serve",
        "DynamicUser": "yes",
        "StateDirectory": "ortto-gateway",
        "ReadWritePaths": SPOOL_DIR,
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "KillSignal": "SIGTERM",
        "EnvironmentFile": "-/etc/ortto-gateway/env",
        "LoadCredential": "ortto-api-key:/etc/ortto-gateway/ortto-api-key",
    }
    for key, value in expected.items():
        assert d.get(key) == value, key
    environment = dict(v.split("=", 1) for k, v in pairs if k == "Environment")
    assert environment["GATEWAY_SPOOL_PATH"] == f"{SPOOL_DIR}/spool.sqlite3"
    assert environment["GATEWAY_API_KEY_FILE"] == "%d/ortto-api-key"
    assert "@system-service" in [v for k, v in pairs if k == "SystemCallFilter"]
    assert set(d["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # A drain (GATEWAY_DRAIN_TIMEOUT, +5 s under --workers) is never cut short.
    env_file = dict(
        line.split("=", 1)
        for line in (SYSTEMD_UNIT.parent / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    drain = parse_seconds(env_file.get("GATEWAY_DRAIN_TIMEOUT", "10s"))
    assert parse_seconds(d["TimeoutStopSec"]) > drain + 5
    settings_from({**env_file, **environment}, tmp_path)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    if subprocess.run([analyze, "verify", str(probe)], capture_output=True, check=False).returncode:
        pytest.skip("systemd-analyze cannot verify units in this environment")
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    entry = Path(sys.executable).with_name("ortto-gateway")
    exec_start = f"{entry} serve" if entry.exists() else f"{sys.executable} -m gateway serve"
    unit = tmp_path / "ortto-gateway.service"
    unit.write_text(
        re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={exec_start}", SYSTEMD_UNIT.read_text())
    )
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    if exposure:  # systemd >= 252; "OK" is below 2.0 on its 0-10 scale
        assert float(exposure.group(1)) < 2.0, security.stdout


MDWE_SERVE = """
import ctypes, mmap, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit(78)
from gateway.cli import main
sys.exit(main(["serve"]))
"""


async def test_gateway_runs_with_memory_deny_write_execute(
    sandbox: TestServer,
    sandbox_state: SandboxState,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The unit's MemoryDenyWriteExecute=yes, as the kernel's PR_SET_MDWE: serve and drain."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_API_KEY": API_KEY,
        "GATEWAY_UPSTREAM_URL": str(sandbox.make_url("")),
        "GATEWAY_ACTIVITIES": ACTIVITIES,
        "GATEWAY_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_METRICS_LISTEN": "127.0.0.1:0",
        "GATEWAY_BATCH_MAX_WAIT": "10ms",
        "GATEWAY_DRAIN_TIMEOUT": "2s",
        "GATEWAY_SPOOL_COMMIT": "loop",
    }
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", MDWE_SERVE], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:

        async def ready() -> bool:
            if proc.poll() is not None:
                return True
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await poll(ready, 15)
        if proc.returncode == 77:
            pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3)")
        assert proc.returncode is None, (tmp_path / "gateway.log").read_text()
        async with session.post(
            f"http://127.0.0.1:{port}{PATH}", json=activity("act:cm:login", "m@example.com")
        ) as resp:
            assert resp.status == 202
        await wait_for(lambda: len(sandbox_state.activities) == 1, timeout=10)
        proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return proc.poll() is not None

        await poll(exited, 15)
        assert proc.returncode == 0, (tmp_path / "gateway.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- Docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


async def test_dockerfile(live_gateway: LiveGateway) -> None:
    steps = dockerfile_instructions()
    bases = [rest for word, rest in steps if word == "FROM"]
    assert len(bases) >= 2, "multi-stage build"
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    user = next(rest for word, rest in reversed(steps) if word == "USER")
    assert user.split(":")[0] not in ("0", "root")
    assert ("VOLUME", SPOOL_DIR) in steps
    env = " ".join(rest for word, rest in steps if word == "ENV")
    for setting in (
        "GATEWAY_LISTEN=0.0.0.0:8080",
        "GATEWAY_METRICS_LISTEN=0.0.0.0:9108",
        f"GATEWAY_SPOOL_PATH={SPOOL_DIR}/spool.sqlite3",
    ):
        assert setting in env, setting
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), source

    # The HEALTHCHECK command itself, against a live gateway and against nothing.
    check = next(rest for word, rest in steps if word == "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[0] == "python" and "/healthz" in command[-1]
    port = live_gateway.public.rsplit(":", 1)[1]

    def run(listen: str) -> int:
        return subprocess.run(
            [sys.executable, *command[1:]],
            env={"GATEWAY_LISTEN": listen},
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    assert await asyncio.to_thread(run, f"0.0.0.0:{port}") == 0
    assert await asyncio.to_thread(run, f"0.0.0.0:{free_port()}") != 0


def test_compose_file(tmp_path: Path) -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "nginx", "redis", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, source)
    gateway = services["gateway"]
    build = gateway["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).exists()
    assert "ortto-api-key" in gateway["secrets"]
    assert "file" in compose["secrets"]["ortto-api-key"]
    assert f"spool:{SPOOL_DIR}" in gateway["volumes"]
    assert parse_seconds(gateway["stop_grace_period"]) > 15
    assert any(v.startswith("../nginx/ortto-gateway.conf:") for v in services["nginx"]["volumes"])
    prometheus_mounts = services["prometheus"]["volumes"]
    assert any(v.startswith("../prometheus:/etc/prometheus") for v in prometheus_mounts)

    # The gateway's settings as compose gives them load (a ${VAR:-default} gives its default).
    env: dict[str, str] = {}
    for line in (DOCKER / gateway["env_file"]).read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    for key, value in gateway["environment"].items():
        env[key] = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    settings_from(env, tmp_path)

    # nginx's upstream (127.0.0.1:8080) reaches the gateway: they share a network namespace,
    # and the gateway's metrics listener is where prometheus.yml scrapes.
    assert gateway["network_mode"] == "service:nginx"
    assert env["GATEWAY_LISTEN"] == "127.0.0.1:8080"
    assert "server 127.0.0.1:8080;" in (ROOT / "deploy/nginx/ortto-gateway.conf").read_text()
    targets = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]
    assert env["GATEWAY_METRICS_LISTEN"] in targets["static_configs"][0]["targets"]
    assert services["prometheus"]["network_mode"] == "service:nginx"


def test_compose_config_with_docker_cli() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("the docker compose plugin is not installed")
    done = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- Kubernetes


def test_kubernetes_manifests(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += load_yaml_docs(path)
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).exists(), resource
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert {"StatefulSet", "Service", "Secret", "ConfigMap", "ServiceMonitor"} <= set(by_kind)

    (sts,) = by_kind["StatefulSet"]
    (configmap,) = by_kind["ConfigMap"]
    (secret,) = by_kind["Secret"]
    pod = sts["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    drain = parse_seconds(configmap["data"]["GATEWAY_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > drain + 5  # + the preStop pause
    assert spec["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == SPOOL_DIR

    # The key: a Secret mounted as a file that GATEWAY_API_KEY_FILE names.
    volumes = {v["name"]: v for v in spec["volumes"]}
    key_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert volumes[key_volume]["secret"]["secretName"] == secret["metadata"]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    key_file = env["GATEWAY_API_KEY_FILE"]
    assert key_file == f"{mounts[key_volume]}/{next(iter(secret['stringData']))}"
    assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    settings_from({**configmap["data"], **env}, tmp_path)

    # Services select the pods; the ServiceMonitor scrapes the metrics port.
    labels = pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(configmap["data"]["GATEWAY_METRICS_LISTEN"].rsplit(":")[1])
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert sts["spec"]["serviceName"] in services
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
    (monitor,) = by_kind["ServiceMonitor"]
    monitored = [
        s
        for s in services.values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [p["name"] for s in monitored for p in s["spec"]["ports"]].count("metrics") == 1
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])


# --- Kubernetes: the drain-and-move way

DRAIN_AND_MOVE = KUBERNETES / "drain-and-move"


def drain_and_move_kit() -> dict[str, dict[str, Any]]:
    """The kit's documents by kind (one each)."""
    kustomization = yaml.safe_load((DRAIN_AND_MOVE / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in load_yaml_docs(DRAIN_AND_MOVE / name)]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs) == 3, [d["kind"] for d in docs]
    return by_kind


def test_kubernetes_drain_and_move_manifests() -> None:
    kit = drain_and_move_kit()
    (sts,) = load_yaml_docs(KUBERNETES / "statefulset.yaml")
    configmap = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())
    deployment, claim, script = kit["Deployment"], kit["PersistentVolumeClaim"], kit["ConfigMap"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    # Same pod as the StatefulSet's but for the command, the volumes and the grace period.
    (sts_container,) = sts["spec"]["template"]["spec"]["containers"]
    for field in ("envFrom", "env", "ports", "readinessProbe", "livenessProbe", "lifecycle"):
        assert container[field] == sts_container[field], field
    assert container["securityContext"] == sts_container["securityContext"]
    assert deployment["spec"]["template"]["metadata"] == sts["spec"]["template"]["metadata"]
    drain = parse_seconds(configmap["data"]["GATEWAY_DRAIN_TIMEOUT"])
    # preStop + drain + the export of a full spool.
    assert spec["terminationGracePeriodSeconds"] >= drain + 5 + 30
    # One spool per pod (emptyDir), the shared handoff claim, run.sh from the ConfigMap.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes["spool"] and mounts["spool"] == SPOOL_DIR
    handoff = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    assert volumes[handoff]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    run = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name"))
    assert volumes[run]["configMap"]["name"] == script["metadata"]["name"]
    assert container["command"] == ["sh", f"{mounts[run]}/run.sh"]
    text = script["data"]["run.sh"]
    assert f"HANDOFF_DIR:-{mounts[handoff]}" in text
    assert "spool export --move" in text and "spool import" in text

    # The mover pod for a retired StatefulSet pod mounts one of its claims.
    (mover,) = load_yaml_docs(KUBERNETES / "spool-mover.yaml")
    (template,) = sts["spec"]["volumeClaimTemplates"]
    (volume,) = mover["spec"]["volumes"]
    name = volume["persistentVolumeClaim"]["claimName"]
    assert name.startswith(f"{template['metadata']['name']}-{sts['metadata']['name']}-")
    assert mover["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == SPOOL_DIR
    assert (
        "spool-mover.yaml"
        not in yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    )


@pytest.mark.slow
async def test_kubernetes_run_sh_hands_a_stopped_pods_backlog_to_the_next(
    sandbox: TestServer, sandbox_state: SandboxState, tmp_path: Path, reaper: list[Any]
) -> None:
    """run.sh for real: pod A stops while Ortto is down and exports its backlog to the
    handoff directory; pod B imports it at start and delivers it, once."""
    from tests.processes import Process, gateway_env, http_ok

    script = tmp_path / "run.sh"
    script.write_text(drain_and_move_kit()["ConfigMap"]["data"]["run.sh"])
    handoff = tmp_path / "handoff"
    upstream = str(sandbox.make_url("")).rstrip("/")

    def pod(name: str) -> tuple[Process, str]:
        port, metrics = free_port(), free_port()
        env = gateway_env(
            upstream,
            tmp_path / name / "spool.sqlite3",
            GATEWAY_LISTEN=f"127.0.0.1:{port}",
            GATEWAY_METRICS_LISTEN=f"127.0.0.1:{metrics}",
            GATEWAY_DRAIN_TIMEOUT="1s",
        )
        env |= {
            "HANDOFF_DIR": str(handoff),
            "HOSTNAME": name,
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        }
        process = Process(["sh", str(script)], tmp_path / f"{name}.log", env=env, name=name)
        reaper.append(process)
        return process, f"http://127.0.0.1:{port}"

    sandbox_state.add_fault(Fault(status=503, count=1_000_000))
    emails = [f"k{i}@example.com" for i in range(5)]
    async with aiohttp.ClientSession() as session:
        a, a_url = pod("pod-a")
        await a.start_ready(lambda: http_ok(session, a_url + "/readyz"))
        body = {
            "activities": [
                {"activity_id": "act:cm:login", "fields": {"str::email": e}} for e in emails
            ]
        }
        async with session.post(a_url + PATH, json=body) as resp:
            assert resp.status == 202, await resp.text()
        await wait_for(lambda: len(sandbox_state.requests) > 0, timeout=15)
        assert await a.stop_async(signal.SIGTERM, timeout=30) == 0, a.output()
        (exported,) = handoff.glob("*.jsonl")
        assert exported.name.startswith("pod-a-")
        assert len(exported.read_bytes().splitlines()) == len(emails)

        sandbox_state.clear_faults()
        b, b_url = pod("pod-b")
        await b.start_ready(lambda: http_ok(session, b_url + "/readyz"))
        await wait_for(lambda: len(sandbox_state.activities) >= len(emails), timeout=60)
        assert sorted(x.email or "" for x in sandbox_state.activities) == emails
        assert sandbox_state.duplicates == 0
        assert list(handoff.glob("*.jsonl")) == list(handoff.glob("taken/*")) == []
        # B had nothing left: it hands off no file.
        assert await b.stop_async(signal.SIGTERM, timeout=30) == 0, b.output()
    assert list(handoff.glob("*.jsonl")) == []
