"""The whole gateway over HTTP against the sandbox upstream: Ortto's documented examples."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from gateway.config import parse_rate
from gateway.keys import METRICS, SETTINGS, SPOOL
from gateway.logs import JsonFormatter
from gateway.sandbox import Fault, SandboxState, wait_for
from gateway.sinks import REFUSED_ACTIVITY
from tests.conftest import API_KEY, EXAMPLES, GatewayFactory, example
from tests.disk_support import Disk

PATH = "/v1/activities/create"
JSON = {"Content-Type": "application/json"}


def created_recently(created: str) -> bool:
    when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return abs(when.timestamp() - time.time()) < 60 and created.endswith("Z")


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("01-single.json", 1),
        ("02-two-at-once.json", 2),
        ("03-async.json", 1),
        ("04-backdated.json", 1),
        ("06-api-reference.json", 1),
    ],
)
async def test_ortto_examples_reach_the_upstream(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, name: str, count: int
) -> None:
    client = await make_gateway()
    sent = orjson.loads(example(name))
    resp = await client.post(PATH, data=example(name), headers=JSON)
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    entries = body["activities"]
    assert [(e["status"], e["person_status"]) for e in entries] == [("queued", "queued")] * count
    # What the gateway sets itself is told, never silently replaced.
    for original, entry in zip(sent["activities"], entries, strict=True):
        told = {w["field"] for w in entry.get("warnings", [])}
        given = {"created"} & set(original) | {
            f"location.{k}" for k in (original.get("location") or {}) if k == "source_ip"
        }
        assert told == given, entry
    await wait_for(lambda: len(sandbox_state.activities) == count)

    request = sandbox_state.requests[-1]
    assert request.path == PATH
    assert request.api_key_ok
    for original, received in zip(sent["activities"], sandbox_state.activities, strict=True):
        got = received.activity
        assert got["activity_id"] == original["activity_id"]
        fields = {k: v for k, v in original["fields"].items()}
        assert got["fields"] == fields
        custom = (original.get("location") or {}).get("custom")
        if custom:
            assert got["location"] == {"custom": custom}
        else:
            assert got["location"] == {"source_ip": "127.0.0.1"}
        assert created_recently(got["created"])
        assert got["key"] and got["key"] != original.get("key")
        for attr, value in original["attributes"].items():
            if attr not in fields:
                assert got["attributes"][attr] == value


@pytest.mark.parametrize("commit_on", ["loop", "thread"])
async def test_both_spool_commit_modes_deliver(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, commit_on: str
) -> None:
    client = await make_gateway(spool_commit=commit_on)
    for _ in range(3):
        resp = await client.post(PATH, data=example("02-two-at-once.json"), headers=JSON)
        assert resp.status == 202, await resp.text()
    await wait_for(lambda: len(sandbox_state.activities) == 6)
    assert client.app[SPOOL].commit_on == commit_on
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("ortto_gateway_spool_commit_mode", {"mode": commit_on}) == 1


async def test_subscription_fields_refused_by_default(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    resp = await client.post(PATH, data=example("05-subscription.json"), headers=JSON)
    assert resp.status == 400
    body = await resp.json()
    assert set(body) == {"request_id", "code", "error", "reason", "field"}
    assert body["code"] == 400 and body["reason"] == "invalid_field"
    assert "bol::p" in body["error"] and "bol::p" in body["field"]
    assert sandbox_state.requests == []


async def test_website_guide_activity_shape(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    activity = {
        "activity_id": "act:cm:login",
        "attributes": {
            "str::email": "john.apple@example.com",
            "str:cm:payment-plan": "$100 starter plan",
            "bol:cm:account-owner": True,
            "str:cm:web-browser": "Google Chrome",
        },
    }
    # sendBeacon posts text/plain: no preflight.
    resp = await client.post(
        PATH, data=json.dumps(activity), headers={"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert resp.status == 202, await resp.text()
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    got = sandbox_state.activities[0].activity
    assert got["fields"] == {"str::email": "john.apple@example.com"}
    assert "str::email" not in got["attributes"]
    assert got["attributes"]["str:cm:payment-plan"] == "$100 starter plan"
    assert got["location"] == {"source_ip": "127.0.0.1"}


async def test_unknown_activity_is_404(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    body = {"activity_id": "act:cm:not-enabled", "fields": {"str::email": "a@example.com"}}
    resp = await client.post(PATH, json=body)
    assert resp.status == 404
    assert "act:cm:not-enabled" in (await resp.json())["error"]


async def test_sync_mode_relays_ortto_answer(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(delivery="sync")
    resp = await client.post(PATH, data=example("02-two-at-once.json"), headers=JSON)
    assert resp.status == 200
    body = await resp.json()
    assert [a["status"] for a in body["activities"]] == ["ingested", "ingested"]
    assert len(sandbox_state.activities) == 2


async def test_sync_mode_mixed_batch_keeps_refusals_in_place(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(delivery="sync")
    good = {"activity_id": "act:cm:login", "fields": {"str::email": "a@example.com"}}
    bad = {"activity_id": "act:cm:login", "fields": {"str::first": "No identifier"}}
    resp = await client.post(PATH, json={"activities": [bad, good]})
    assert resp.status == 200
    entries = (await resp.json())["activities"]
    assert entries[0]["status"] == "invalid"
    assert "identifier" in entries[0]["error"]
    assert entries[1]["status"] == "ingested"


async def test_health_and_readiness(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json()) == {"status": "ready"}


async def test_unknown_path_and_method_in_ortto_shape(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    resp = await client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["code"] == 404
    resp = await client.get(PATH)
    assert resp.status == 405
    assert (await resp.json())["code"] == 405


async def test_key_never_in_responses(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    bodies = [example(p.name) for p in sorted(EXAMPLES.glob("0*.json"))]
    bodies += [b"", b"{", b"[]", b'{"activities": 5}', b"\xff\xfe"]
    for body in bodies:
        resp = await client.post(PATH, data=body, headers=JSON)
        text = await resp.text()
        assert API_KEY not in text
        assert all(API_KEY not in v for v in resp.headers.values())


async def test_sync_mode_wrong_key_is_502_without_the_key(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.api_key = "the-key-ortto-expects"
    client = await make_gateway(delivery="sync")
    resp = await client.post(PATH, data=example("01-single.json"), headers=JSON)
    assert resp.status == 502
    text = await resp.text()
    assert API_KEY not in text
    assert "authenticate" in (await resp.json())["error"]


def delivered_count(client: Any) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "ortto_gateway_activities_total", {"activity_id": "act:cm:login", "outcome": "delivered"}
    )
    return value or 0.0


def logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in caplog.records)


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault(200, answer="html"), 502),
        (Fault(204, answer="empty"), 502),
        (Fault(200, answer="echo_key"), 502),
        (Fault(400, answer="echo_key"), 400),
        (Fault(404, answer="echo_key"), 502),
    ],
    ids=["200-html", "204-empty", "200-echo-key", "400-echo-key", "404-echo-key"],
)
async def test_sync_mode_answers_in_the_gateways_words(
    make_gateway: GatewayFactory,
    sandbox_state: SandboxState,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    status: int,
) -> None:
    sandbox_state.add_fault(fault)
    client = await make_gateway(delivery="sync")
    activity = {"activity_id": "act:cm:login", "fields": {"str::email": "a@example.com"}}
    resp = await client.post(PATH, json=activity)
    text = await resp.text()
    assert resp.status == status, text
    body = json.loads(text)
    assert set(body) == {"request_id", "code", "error", "reason"} and body["code"] == status
    assert body["reason"].startswith("upstream_")
    assert API_KEY not in text and "not allowed here" not in text and "<" not in text
    assert delivered_count(client) == 0
    assert API_KEY not in logged(caplog)
    assert any(r.levelname == "WARNING" for r in caplog.records if r.name == "gateway.sinks")


async def test_sync_mode_refused_entries_carry_the_gateways_message(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    # Ortto takes 50 a day of one activity per person: the 51st comes back invalid.
    client = await make_gateway(delivery="sync", person_limit=parse_rate("100/1d"))
    batch = [{"activity_id": "act:cm:login", "fields": {"str::email": "a@example.com"}}] * 51
    resp = await client.post(PATH, json={"activities": batch})
    assert resp.status == 200
    entries = (await resp.json())["activities"]
    assert entries[:50] == [{"status": "ingested"}] * 50  # nothing Ortto knows of the person
    assert entries[50] == {
        "status": "invalid",
        "error": REFUSED_ACTIVITY,
        "reason": "upstream_refused",
    }
    assert delivered_count(client) == 50


async def test_a_spool_that_cannot_be_written_is_503_and_not_ready_until_it_can(
    make_gateway: GatewayFactory,
    sandbox_state: SandboxState,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = Disk().install(monkeypatch)
    client = await make_gateway()
    spool = client.app[SPOOL]
    registry = client.app[METRICS].registry
    one = {"activity_id": "act:cm:login", "fields": {"str::email": "disk@example.com"}}
    assert (await client.post(PATH, json=one)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 1)

    disk.full = True
    caplog.clear()
    for _ in range(3):
        resp = await client.post(PATH, json=one)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        body = await resp.json()
        assert set(body) == {"request_id", "code", "error", "reason"} and body["code"] == 503
        assert body["reason"] == "spool_unwritable"
        assert "cannot store activities" in body["error"]
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert await resp.json() == {
        "status": "spool_unwritable",
        "error": "spool not writable: database or disk is full",
    }
    await wait_for(lambda: registry.get_sample_value("ortto_gateway_spool_writable") == 0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "spool cannot be written: activities are refused until it can"
    ]  # one line when it begins; refused requests, a WARNING at most every 10 s
    warned = [r for r in caplog.records if r.name == "gateway.sinks"]
    assert warned and warned[0].levelno == logging.WARNING
    assert warned[0].__dict__["data"]["refused"] == 1

    disk.full = False  # the operator frees space: ready again without a restart
    await wait_for(lambda: spool.write_error is None)
    assert (await client.get("/readyz")).status == 200
    assert (await client.post(PATH, json=one)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 2)
    await wait_for(lambda: registry.get_sample_value("ortto_gateway_spool_writable") == 1)


async def test_the_root_names_the_endpoint_and_the_shim(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert "POST /v1/activities/create" in text
    assert "/ortto-relay.js" in text
    assert "README" in text
    settings = client.app[SETTINGS]
    assert settings.api_key not in text and settings.upstream_base not in text
