"""Every corpus case through the gateway as a browser: what reaches the sandbox (Ortto's
stand-in) must be the case's ``gateway.forwarded``, and Ortto must take it.

Cases whose gateway side is not built yet carry ``"gateway_pending": true`` and run as
strict xfails (issue 16): when the gateway starts doing what the case says, the xfail
fails, and the flag comes off.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from _pytest.mark.structures import ParameterSet

from gateway.config import DEFAULT_PERSON_FIELDS, ActivitySpec
from gateway.sandbox import SandboxState, wait_for
from tests.conformance.corpus import Case, as_forwarded, load_cases, warned, warning_paths
from tests.conftest import ACTIVITIES, GatewayFactory

PATH = "/v1/activities/create"
JSON = {"Content-Type": "application/json"}


def _param(case: Case) -> ParameterSet:
    marks = []
    if case.pending:
        marks.append(pytest.mark.xfail(strict=True, reason="issue 16: gateway side"))
    return pytest.param(case, id=case.name, marks=marks)


CASES = [_param(case) for case in load_cases()]


def gateway_settings(case: Case) -> dict[str, Any]:
    """Settings a site owner would give for the case: its activities enabled, and the
    person fields it lists allowed."""
    ids = set(ACTIVITIES.split(","))
    ids |= {a["activity_id"] for a in case.browser_request["activities"]}
    settings = case.gateway.get("settings") or {}
    fields = settings.get("person_fields", DEFAULT_PERSON_FIELDS)
    return {
        "activities": {activity_id: ActivitySpec(activity_id) for activity_id in sorted(ids)},
        "person_fields": frozenset(fields),
    }


@pytest.mark.parametrize("case", CASES)
async def test_gateway_forwards_what_ortto_takes(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, case: Case
) -> None:
    sandbox_state.declare_person_fields(case.sandbox.get("person_fields", ()))
    sandbox_state.declare_person_ids(case.sandbox.get("person_ids", ()))
    client = await make_gateway(**gateway_settings(case))
    sent = case.browser_request
    resp = await client.post(PATH, data=orjson.dumps(sent), headers=JSON)
    answer: Any = await resp.json()
    expect = case.gateway["expect"]
    if expect == "refuse":
        assert 400 <= resp.status < 500, answer
        assert sandbox_state.requests == []  # a refusal is answered before the spool
        return

    assert resp.status == 202, answer
    assert all(entry.get("status") == "queued" for entry in answer["activities"]), answer
    warnings = warning_paths(answer)
    for path in case.gateway.get("warnings", []):
        assert warned(path, warnings), f"no warning about {path}: {answer!r}"

    forwarded = case.gateway["forwarded"]
    await wait_for(lambda: sum(r.n_activities for r in sandbox_state.requests) >= len(forwarded))
    got = [as_forwarded(received.activity) for received in sandbox_state.activities]
    assert got == forwarded  # and the sandbox ingested each one: Ortto would take it
    for received in sandbox_state.activities:
        # The client address, or none beside a custom location: never the browser's.
        assert received.source_ip in ("127.0.0.1", None)
    batch = orjson.loads(sandbox_state.requests[-1].body)
    for key, value in (case.gateway.get("forwarded_batch") or {}).items():
        assert batch.get(key) == value, f"{key}: {batch.get(key)!r} != {value!r}"
