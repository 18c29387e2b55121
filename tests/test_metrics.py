"""Metrics: the design's names exist, labels are bounded, the listener is separate."""

from __future__ import annotations

import asyncio
import platform

from prometheus_client import CollectorRegistry, generate_latest
from pytest_aiohttp import AiohttpClient

from gateway import __version__, compiled
from gateway.app import create_metrics_app
from gateway.keys import METRICS
from gateway.metrics import OTHER_ACTIVITY, Metrics, status_group
from gateway.reasons import REFUSAL_REASONS, WARNING_REASONS
from gateway.sandbox import SandboxState, wait_for
from tests.conftest import GatewayFactory

DESIGN_NAMES = [
    "ortto_gateway_activities_total",
    "ortto_gateway_http_requests_total",
    "ortto_gateway_upstream_requests_total",
    "ortto_gateway_upstream_request_seconds",
    "ortto_gateway_upstream_batch_activities",
    "ortto_gateway_spool_depth",
    "ortto_gateway_spool_oldest_age_seconds",
    "ortto_gateway_limiter_keys",
    "ortto_gateway_limiter_errors_total",
    "ortto_gateway_build_info",
]


def test_names_exist_and_series_start_at_zero() -> None:
    metrics = Metrics(CollectorRegistry(), ["act:cm:a"])
    text = generate_latest(metrics.registry).decode()
    for name in DESIGN_NAMES:
        assert name in text
    assert 'ortto_gateway_activities_total{activity_id="act:cm:a",outcome="accepted"} 0.0' in text
    assert "process_cpu_seconds_total" in text or "ortto_gateway_process" in text


def test_build_info_says_whether_the_compiled_core_runs() -> None:
    metrics = Metrics(CollectorRegistry(), [])
    running = "yes" if compiled.active() else "no"  # make test: "no", make test-compiled: "yes"
    labels = {"version": __version__, "python": platform.python_version(), "compiled": running}
    assert metrics.registry.get_sample_value("ortto_gateway_build_info", labels) == 1.0


def test_activity_label_is_bounded() -> None:
    metrics = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)
    assert metrics.activity_label("act:cm:a") == "act:cm:a"
    assert metrics.activity_label("act:cm:attacker-chosen") == OTHER_ACTIVITY
    assert metrics.activity_label(None) == OTHER_ACTIVITY


def test_status_groups() -> None:
    assert status_group(202) == "2xx"
    assert status_group(429) == "429"
    assert status_group(418) == "4xx"
    assert status_group(502) == "5xx"


async def test_flow_is_counted(
    make_gateway: GatewayFactory,
    sandbox_state: SandboxState,
    aiohttp_client: AiohttpClient,
) -> None:
    client = await make_gateway()
    metrics = client.app[METRICS]
    act = {"activity_id": "act:cm:login", "fields": {"str::email": "m@example.com"}}
    for _ in range(11):
        await client.post("/v1/activities/create", json=act)
    await client.post("/v1/activities/create", json={"activity_id": "act:cm:nope"})
    await wait_for(lambda: len(sandbox_state.activities) == 10)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    await wait_for(
        lambda: (
            value("ortto_gateway_activities_total", activity_id="act:cm:login", outcome="delivered")
            == 10
        )
    )
    assert (
        value("ortto_gateway_activities_total", activity_id="act:cm:login", outcome="accepted")
        == 10
    )
    assert (
        value(
            "ortto_gateway_activities_total",
            activity_id="act:cm:login",
            outcome="rate_limited_person",
        )
        == 1
    )
    assert value("ortto_gateway_activities_total", activity_id="other", outcome="invalid") == 1
    assert value("ortto_gateway_http_requests_total", route="activities", status="429") == 1
    assert value("ortto_gateway_upstream_requests_total", status="2xx") >= 1
    assert value("ortto_gateway_limiter_keys") == 2

    # The metrics listener serves the same registry; the public app has no /metrics.
    assert (await client.get("/metrics")).status == 404
    metrics_client = await aiohttp_client(create_metrics_app(metrics.registry))
    text = await (await metrics_client.get("/metrics")).text()
    assert 'outcome="delivered"} 10.0' in text


def test_refusals_and_warnings_are_counted_by_reason_with_bounded_labels() -> None:
    metrics = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)
    text = generate_latest(metrics.registry).decode()
    for activity_id in ("act:cm:a", OTHER_ACTIVITY):
        for code in REFUSAL_REASONS:
            line = (
                f'ortto_gateway_refusals_total{{activity_id="{activity_id}",reason="{code}"}} 0.0'
            )
            assert line in text
        for code in WARNING_REASONS:
            line = (
                f'ortto_gateway_warnings_total{{activity_id="{activity_id}",reason="{code}"}} 0.0'
            )
            assert line in text
    metrics.count_refusal("act:cm:a", "person_limit")
    metrics.count_refusal("act:cm:attacker-chosen", "unknown_activity")
    metrics.count_warning(None, "unknown_key")
    get = metrics.registry.get_sample_value
    assert (
        get("ortto_gateway_refusals_total", {"activity_id": "act:cm:a", "reason": "person_limit"})
        == 1
    )
    labels = {"activity_id": OTHER_ACTIVITY, "reason": "unknown_activity"}
    assert get("ortto_gateway_refusals_total", labels) == 1
    labels = {"activity_id": OTHER_ACTIVITY, "reason": "unknown_key"}
    assert get("ortto_gateway_warnings_total", labels) == 1


def _observe_all(metrics: Metrics, values: list[float]) -> None:
    for i, seconds in enumerate(values):
        metrics.count_activity("act:cm:a", "accepted")
        metrics.observe_request("activities", 202 if i % 3 else 429, seconds)
        metrics.observe_limiter(seconds / 10)
        metrics.observe_spool_write(seconds / 2)


# Values on and either side of bucket bounds (a bound itself counts in its own bucket).
TALLY_VALUES = [0.0001, 0.0005, 0.0006, 0.001, 0.02, 0.025, 0.3, 2.5, 2.6, 40.0]


async def test_a_turns_counts_are_applied_at_its_end_and_before_a_scrape() -> None:
    metrics = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)
    registry = metrics.registry
    child = metrics.activities.labels("act:cm:a", "accepted")
    metrics.count_activity("act:cm:a", "accepted", 2)
    assert child._value.get() == 0  # tallied for the end of the turn
    assert (
        registry.get_sample_value(
            "ortto_gateway_activities_total", {"activity_id": "act:cm:a", "outcome": "accepted"}
        )
        == 2
    )  # a scrape flushes first
    metrics.count_activity("act:cm:a", "accepted")
    await asyncio.sleep(0)  # the turn ends: the tally's callback runs
    assert child._value.get() == 3


def test_without_a_running_loop_counts_are_applied_at_once() -> None:
    metrics = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)
    metrics.count_activity("act:cm:a", "accepted")
    metrics.observe_limiter(0.002)
    assert metrics.activities.labels("act:cm:a", "accepted")._value.get() == 1
    assert metrics.limiter_seconds._sum.get() == 0.002


async def test_tallied_histograms_and_counters_expose_what_one_by_one_would() -> None:
    one_by_one = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)

    def plain() -> None:
        _observe_all(one_by_one, TALLY_VALUES)
        _observe_all(one_by_one, TALLY_VALUES)

    # In a thread, where no loop runs: each value is applied at once, as before the tally.
    await asyncio.get_running_loop().run_in_executor(None, plain)
    tallied = Metrics(CollectorRegistry(), ["act:cm:a"], process_metrics=False)
    _observe_all(tallied, TALLY_VALUES)
    _observe_all(tallied, TALLY_VALUES)  # in this turn: tallied, then flushed by the scrape

    def exposition(metrics: Metrics) -> list[str]:
        return [
            line
            for line in generate_latest(metrics.registry).decode().splitlines()
            if not line.startswith("#") and "_created" not in line
        ]

    expected = exposition(one_by_one)
    assert any(line.startswith("ortto_gateway_http_request_seconds_bucket") for line in expected)
    assert exposition(tallied) == expected
