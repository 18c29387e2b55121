"""Every corpus case against the sandbox directly: its answer must be Ortto's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.sandbox import SandboxState, create_sandbox_app
from tests.conformance.corpus import Case, assert_answer_matches, load_cases, outcomes

PATH = "/v1/activities/create"
KEY = "conformance-key"
HEADERS = {"X-Api-Key": KEY, "Content-Type": "application/json"}
CASES = load_cases()

MakeClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def sandbox_for(case: Case) -> SandboxState:
    """A sandbox set up as the case says Ortto's instance was."""
    settings = case.sandbox
    now = case.now
    return SandboxState(
        KEY,
        person_fields=settings.get("person_fields", ()),
        person_ids=settings.get("person_ids", ()),
        answers=settings.get("answers", "ingested"),
        clock=lambda: now,
    )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_sandbox_answers_as_ortto(aiohttp_client: MakeClient, case: Case) -> None:
    state = sandbox_for(case)
    client = await aiohttp_client(create_sandbox_app(state))
    async with client.post(PATH, data=orjson.dumps(case.request), headers=HEADERS) as resp:
        status, body = resp.status, await resp.json()
    assert outcomes(status, body) == case.data["outcome"], body
    answer = case.data["ortto_answer"]
    if answer is not None:
        assert status == answer["status"], body
        assert_answer_matches(answer["body"], body)
    accepted = case.data["outcome"].count("accepted")
    assert len(state.activities) == accepted


def test_the_corpus_covers_every_seed_and_kind_of_evidence() -> None:
    files = {case.data["source"].get("file") for case in CASES}
    for seed in ("01-single", "02-two-at-once", "03-async", "04-backdated", "05-subscription"):
        assert f"tests/ortto-examples/{seed}.json" in files
    assert "tests/ortto-examples/06-api-reference.json" in files
    assert "tests/ortto-examples/website-snippet.html" in files
    evidence = {case.data["evidence"] for case in CASES}
    assert {"documented", "recorded", "client-sends"} <= evidence
