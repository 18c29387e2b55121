"""Limits through the whole gateway: per person, per IP, sliding windows, concurrency."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import orjson
import pytest

from gateway.config import ActivitySpec, parse_rate
from gateway.errors import Unavailable
from gateway.feed import TEST_HEADER, FeedEvent, console_test_token
from gateway.identity import person_hash, sign_identity, sign_person_id
from gateway.keys import DELIVERY, FEED, RELAY, SETTINGS
from gateway.relay import Relay
from gateway.sandbox import Fault, SandboxState, wait_for
from tests.conftest import FakeClock, GatewayFactory, refusals, request_line

PATH = "/v1/activities/create"


def activity(email: str, activity_id: str = "act:cm:login") -> dict[str, Any]:
    return {"activity_id": activity_id, "fields": {"str::email": email}}


async def test_eleventh_for_a_person_is_refused_other_activity_passes(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    for i in range(10):
        resp = await client.post(
            PATH, json=activity("Chris@Example.com " if i % 2 else "chris@example.com")
        )
        assert resp.status == 202, await resp.text()
    resp = await client.post(PATH, json=activity("chris@example.com"))
    assert resp.status == 429
    retry_after = int(resp.headers["Retry-After"])
    assert 86000 < retry_after <= 86400
    body = await resp.json()
    assert body["code"] == 429
    assert body["activities"][0]["status"] == "rate_limited"
    # Another activity id for the same person has its own budget.
    resp = await client.post(PATH, json=activity("chris@example.com", "act:cm:signup"))
    assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 11)
    assert sum(a.activity_id == "act:cm:login" for a in sandbox_state.activities) == 10


async def test_hundred_and_first_from_one_ip_is_refused(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    batch = [activity(f"person{i}@example.com") for i in range(100)]
    resp = await client.post(PATH, json={"activities": batch})
    assert resp.status == 202
    assert all(e["status"] == "queued" for e in (await resp.json())["activities"])
    resp = await client.post(PATH, json=activity("person100@example.com"))
    assert resp.status == 429
    assert 3500 < int(resp.headers["Retry-After"]) <= 3600
    assert "IP" in (await resp.json())["activities"][0]["error"]
    # Another client address has its own budget (through a trusted proxy).
    resp = await client.post(
        PATH, json=activity("person100@example.com"), headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert resp.status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 101)


async def test_mixed_batch_partly_rate_limited(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    batch = [activity("same@example.com") for _ in range(12)]
    resp = await client.post(PATH, json={"activities": batch})
    assert resp.status == 202
    statuses = [e["status"] for e in (await resp.json())["activities"]]
    assert statuses == ["queued"] * 10 + ["rate_limited"] * 2


async def test_a_batch_over_limits_and_invalid_says_both(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(person_limit=parse_rate("1/1d"))
    assert (await client.post(PATH, json=activity("twice@example.com"))).status == 202
    invalid = {"activity_id": "act:cm:login", "fields": {"str::first": "no identifier"}}
    resp = await client.post(PATH, json={"activities": [activity("twice@example.com"), invalid]})
    assert resp.status == 429  # waiting would let one through
    body = await resp.json()
    assert body["error"].startswith("no activity accepted: 1 over a rate limit, 1 invalid")
    assert [e["status"] for e in body["activities"]] == ["rate_limited", "invalid"]
    resp = await client.post(PATH, json=activity("twice@example.com"))
    assert (await resp.json())["error"].startswith("rate limit reached for every activity")


async def test_a_request_the_spool_cannot_take_is_not_charged(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.add_fault(Fault(status=503, count=10**6))  # nothing drains
    client = await make_gateway(spool_max_bytes=16 * 1024)
    note = {"txt:cm:note": "x" * 4000}
    for _ in range(3):
        big = {**activity("fill@example.com"), "attributes": note}
        assert (await client.post(PATH, json=big)).status == 202
    # Each of these would fit the person's budget, but not the spool: 503, never charged.
    for _ in range(12):
        resp = await client.post(PATH, json={**activity("victim@example.com"), "attributes": note})
        assert resp.status == 503, await resp.text()
    assert (await client.post(PATH, json=activity("victim@example.com"))).status == 202


async def test_short_window_opens_again_after_it_slides(make_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    client = await make_gateway(clock=clock, person_limit=parse_rate("3/2s"))
    for _ in range(3):
        assert (await client.post(PATH, json=activity("a@example.com"))).status == 202
        clock.advance(0.5)
    resp = await client.post(PATH, json=activity("a@example.com"))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"  # 0.5 s rounded up to a whole second
    clock.advance(0.5)  # the first one is now 2 s old
    assert (await client.post(PATH, json=activity("a@example.com"))).status == 202
    assert (await client.post(PATH, json=activity("a@example.com"))).status == 429


async def test_concurrent_requests_never_exceed_the_limit(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    responses = await asyncio.gather(
        *(client.post(PATH, json=activity("burst@example.com")) for _ in range(50))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(202) == 10
    assert statuses.count(429) == 40
    await wait_for(lambda: len(sandbox_state.activities) == 10)


async def test_refused_activities_do_not_count(make_gateway: GatewayFactory) -> None:
    client = await make_gateway()
    bad = {"activity_id": "act:cm:login", "fields": {"str::email": "x@example.com", "bol::p": True}}
    for _ in range(15):
        assert (await client.post(PATH, json=bad)).status == 400
    for _ in range(10):
        assert (await client.post(PATH, json=activity("x@example.com"))).status == 202


async def test_a_request_bigger_than_the_whole_spool_is_413_not_try_again(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(spool_max_rows=2)
    batch = {"activities": [activity(f"big{i}@example.com") for i in range(3)]}
    resp = await client.post(PATH, json=batch)
    assert resp.status == 413  # a 503 would be retried forever: it can never fit
    error = (await resp.json())["error"]
    assert "3 activities" in error and "at most 2 activities" in error
    # Nothing was charged: the same people fit in smaller requests.
    for i in range(3):
        body = {"activities": [activity(f"big{i}@example.com")]}
        assert (await client.post(PATH, json=body)).status == 202

        def delivered(n: int = i + 1) -> bool:
            return len(sandbox_state.activities) == n

        await wait_for(delivered)


# -- the browser's key: idempotent submissions


async def test_a_repeated_key_is_answered_as_a_duplicate_and_sent_once(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(person_limit=parse_rate("2/1d"))
    thanks = {**activity("lead@example.com"), "key": "form-7f3a"}
    first = await client.post(PATH, json=thanks)
    assert first.status == 202
    assert "duplicate" not in (await first.json())["activities"][0]
    for _ in range(3):  # a reloaded thank-you page, a retry after a lost answer
        again = await client.post(PATH, json=thanks)
        assert again.status == 202
        body = await again.json()
        assert body["duplicate"] is True
        assert body["activities"][0] == {
            "status": "queued",
            "person_status": "queued",
            "duplicate": True,
        }
    # Charged once: the person's second activity still fits the 2/1d limit.
    assert (await client.post(PATH, json=activity("lead@example.com"))).status == 202
    assert (await client.post(PATH, json=activity("lead@example.com"))).status == 429
    await wait_for(lambda: len(sandbox_state.activities) == 2)
    # Another visitor's activity with the same key is theirs, not a duplicate.
    other = await client.post(PATH, json={**activity("other@example.com"), "key": "form-7f3a"})
    assert "duplicate" not in await other.json()
    await wait_for(lambda: len(sandbox_state.activities) == 3)
    # The forwarded key is the gateway's own, never the browser's.
    assert all(a.key != "form-7f3a" for a in sandbox_state.activities)


async def test_a_key_whose_activity_was_not_stored_is_new_on_retry(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    relay = cast(Relay, client.app[RELAY])
    submit = relay.sink.submit
    calls = 0

    async def fails_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("the gateway cannot store activities now", retry_after=5.0)
        return await submit(*args, **kwargs)

    relay.sink.submit = fails_once  # type: ignore[method-assign]
    thanks = {**activity("lead@example.com"), "key": "form-1"}
    assert (await client.post(PATH, json=thanks)).status == 503
    retry = await client.post(PATH, json=thanks)
    assert retry.status == 202
    assert "duplicate" not in await retry.json()
    await wait_for(lambda: len(sandbox_state.activities) == 1)


# -- a browser-chosen person_id


SECRET = "an-identity-secret-of-forty-characters-00"


async def test_a_person_id_needs_a_signed_identity_unless_the_activity_opts_in(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.declare_person_ids(["006a0f", "0077bb"])  # Ortto knows them
    opted = ActivitySpec("act:cm:signup", person_id=True)
    client = await make_gateway(
        identity_secrets=(SECRET,),
        activities={"act:cm:login": ActivitySpec("act:cm:login"), "act:cm:signup": opted},
    )
    alone = {"activity_id": "act:cm:login", "person_id": "006a0f"}
    resp = await client.post(PATH, json=alone)
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["error"].startswith("person_id from a browser needs a signed")
    # Beside an email, the id is dropped and the activity goes on under the email.
    resp = await client.post(PATH, json={**activity("a@example.com"), "person_id": "006a0f"})
    assert resp.status == 202
    (entry,) = (await resp.json())["activities"]
    assert [w["field"] for w in entry["warnings"]] == ["person_id"]
    # Signed for that id, it is forwarded; an activity that opts in needs no token.
    signed = sign_person_id("006a0f", SECRET, int(time.time()) + 3600)
    assert (await client.post(PATH, json={**alone, "identity": signed})).status == 202
    opted_in = {"activity_id": "act:cm:signup", "person_id": "0077bb"}
    assert (await client.post(PATH, json=opted_in)).status == 202
    await wait_for(lambda: len(sandbox_state.activities) == 3)
    got = [a.activity.get("person_id") for a in sandbox_state.activities]
    assert sorted(got, key=str) == ["006a0f", "0077bb", None]


class HeldSink:
    """The next write waits until `release`, then fails (`fails`) or goes on; later
    writes go straight through. `entered` is set once the held write has begun."""

    def __init__(self, relay: Any, *, fails: bool) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self._submit = relay.sink.submit
        self._fails = fails
        self._held = False
        relay.sink.submit = self.submit

    async def submit(self, *args: Any, **kwargs: Any) -> Any:
        if self._held:
            return await self._submit(*args, **kwargs)
        self._held = True
        self.entered.set()
        await self.release.wait()
        if self._fails:
            raise Unavailable("the gateway cannot store activities now", retry_after=5.0)
        return await self._submit(*args, **kwargs)

    async def started(self) -> None:
        await asyncio.wait_for(self.entered.wait(), 10)


async def test_a_repeat_while_the_first_copy_is_being_stored_is_asked_to_retry(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    """Not a duplicate yet: the first copy may still fail (here it does), and a repeat
    answered "duplicate" would then be lost."""
    client = await make_gateway()
    held = HeldSink(client.app[RELAY], fails=True)
    thanks = {**activity("lead@example.com"), "key": "form-2"}
    first = asyncio.create_task(client.post(PATH, json=thanks))
    await held.started()
    repeat = await client.post(PATH, json=thanks)
    assert repeat.status == 503
    assert repeat.headers["Retry-After"] == "1"
    held.release.set()
    assert (await first).status == 503
    retry = await client.post(PATH, json=thanks)  # the browser's retry: new, stored
    assert retry.status == 202 and "duplicate" not in await retry.json()
    again = await client.post(PATH, json=thanks)
    assert (await again.json())["duplicate"] is True
    await wait_for(lambda: len(sandbox_state.activities) == 1)


async def test_a_merge_by_cannot_choose_another_persons_record(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    """Matching by an external id while setting an email would put the page's email on
    the record of whoever has that id: only the activity's own identifier leads."""
    client = await make_gateway()
    takeover = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "attacker@example.com", "str::ei": "victim-ei-42"},
    }
    for body in (
        {"activities": [takeover], "merge_by": ["str::ei"]},
        {**takeover, "merge_by": ["str::ei", "str::email"]},
    ):
        resp = await client.post(PATH, json=body)
        assert resp.status == 202
        (entry,) = (await resp.json())["activities"]
        assert [w["field"] for w in entry["warnings"]] == ["merge_by"]
    ok = {"activities": [{**takeover, "fields": {"str::email": "a@example.com"}}]}
    assert (await client.post(PATH, json={**ok, "merge_by": ["str::email"]})).status == 202
    await wait_for(lambda: len(sandbox_state.requests) >= 2 and len(sandbox_state.activities) == 3)
    assert all(a.activity.get("merge_by") != ["str::ei"] for a in sandbox_state.activities)
    merged = [orjson.loads(r.body).get("merge_by") for r in sandbox_state.requests]
    assert ["str::ei"] not in merged and ["str::ei", "str::email"] not in merged
    assert ["str::email"] in merged


async def test_a_signed_identity_sends_only_the_identifier_it_signs(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    sandbox_state.declare_person_ids(["006a0f"])
    client = await make_gateway(identity_secrets=(SECRET,), identity_required=True)
    expires = int(time.time()) + 3600
    # Signed for the email: an unsigned external id is left out.
    by_email = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "me@example.com", "str::ei": "victim-ei-42"},
        "identity": sign_identity("me@example.com", SECRET, expires),
    }
    resp = await client.post(PATH, json=by_email)
    assert resp.status == 202
    (entry,) = (await resp.json())["activities"]
    assert [w["field"] for w in entry["warnings"]] == ["fields.str::ei"]
    # Signed for a person_id: the unsigned email is left out (the person's limit is the
    # id's, never the email's), and so is a merge_by.
    by_id = {
        "activity_id": "act:cm:login",
        "person_id": "006a0f",
        "fields": {"str::email": "victim@example.com", "str::first": "Me"},
        "merge_by": ["str::email"],
        "identity": sign_person_id("006a0f", SECRET, expires),
    }
    resp = await client.post(PATH, json=by_id)
    assert resp.status == 202
    (entry,) = (await resp.json())["activities"]
    assert sorted(w["field"] for w in entry["warnings"]) == ["fields.str::email", "merge_by"]
    await wait_for(lambda: len(sandbox_state.activities) == 2)
    got = [a.activity for a in sandbox_state.activities]
    assert got[0]["fields"] == {"str::email": "me@example.com"}
    assert got[1]["fields"] == {"str::first": "Me"} and got[1]["person_id"] == "006a0f"
    assert "merge_by" not in got[1]


async def test_a_person_limit_says_its_reason_in_the_answer_the_log_and_the_counter(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(person_limit=parse_rate("1/1d"))
    assert (await client.post(PATH, json=activity("limit@example.com"))).status == 202
    resp = await client.post(PATH, json=activity("limit@example.com"))
    assert resp.status == 429
    body = await resp.json()
    assert body["reason"] == "person_limit"
    assert body["activities"][0]["reason"] == "person_limit"
    line = request_line(caplog)
    assert line["reason"] == "person_limit"
    assert "limit@example.com" not in orjson.dumps(line).decode()
    assert refusals(client, "act:cm:login", "person_limit") == 1
    assert refusals(client, "act:cm:login", "ip_limit") == 0


async def test_an_ip_limit_says_its_reason(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(ip_limit=parse_rate("1/1h"))
    assert (await client.post(PATH, json=activity("one@example.com"))).status == 202
    resp = await client.post(PATH, json=activity("two@example.com"))
    assert resp.status == 429
    body = await resp.json()
    assert body["reason"] == "ip_limit" and body["activities"][0]["reason"] == "ip_limit"
    assert request_line(caplog)["reason"] == "ip_limit"
    assert refusals(client, "act:cm:login", "ip_limit") == 1


async def test_a_batch_counts_each_refused_activity_by_reason(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(person_limit=parse_rate("1/1d"))
    invalid = {"activity_id": "act:cm:login", "fields": {"str::first": "no identifier"}}
    unknown = {"activity_id": "act:cm:nope", "fields": {"str::email": "x@example.com"}}
    batch = [activity("b@example.com")] * 3 + [invalid, unknown]
    resp = await client.post(PATH, json={"activities": batch})
    assert resp.status == 202
    entries = (await resp.json())["activities"]
    assert [e.get("reason") for e in entries] == [
        None,
        "person_limit",
        "person_limit",
        "invalid_field",
        "unknown_activity",
    ]
    assert entries[3]["field"] == "fields" and entries[4]["field"] == "activity_id"
    line = request_line(caplog)
    assert line["reasons"] == {"person_limit": 2, "invalid_field": 1, "unknown_activity": 1}
    assert line["fields"] == ["activity_id", "fields"]
    assert "reason" not in line  # the request as a whole was not refused
    assert "@" not in orjson.dumps(line).decode()
    assert refusals(client, "act:cm:login", "person_limit") == 2
    assert refusals(client, "act:cm:login", "invalid_field") == 1
    assert refusals(client, "other", "unknown_activity") == 1


async def test_a_warning_is_counted_by_code_and_told_in_the_log(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway()
    body = {**activity("w@example.com"), "created": "2020-01-01T00:00:00Z", "merge_by": ["str::ei"]}
    resp = await client.post(PATH, json=body)
    assert resp.status == 202, await resp.text()
    (entry,) = (await resp.json())["activities"]
    assert [(w["field"], w["code"]) for w in entry["warnings"]] == [
        ("created", "set_by_gateway"),
        ("merge_by", "merge_by_not_allowed"),
    ]
    assert request_line(caplog)["warnings"] == {"set_by_gateway": 1, "merge_by_not_allowed": 1}
    registry = cast(Relay, client.app[RELAY]).metrics.registry
    labels = {"activity_id": "act:cm:login", "reason": "merge_by_not_allowed"}
    assert registry.get_sample_value("ortto_gateway_warnings_total", labels) == 1


async def test_a_full_spool_is_refused_as_spool_full_per_activity(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    sandbox_state.add_fault(Fault(status=503, count=10**6))  # nothing drains
    client = await make_gateway(spool_max_rows=2)
    batch = {"activities": [activity("s1@example.com"), activity("s2@example.com")]}
    assert (await client.post(PATH, json=batch)).status == 202
    resp = await client.post(PATH, json=batch)
    assert resp.status == 503
    assert (await resp.json())["reason"] == "spool_full"
    line = request_line(caplog)
    assert line["reason"] == "spool_full" and line["reasons"] == {"spool_full": 2}
    assert refusals(client, "act:cm:login", "spool_full") == 2
    assert refusals(client, "other", "spool_full") == 0  # not counted twice


async def test_a_person_id_without_a_signed_identity_is_identity_required(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    client = await make_gateway(identity_secrets=(SECRET,))
    resp = await client.post(PATH, json={"activity_id": "act:cm:login", "person_id": "006a0f"})
    assert resp.status == 401
    body = await resp.json()
    assert (body["reason"], body["field"]) == ("identity_required", "person_id")
    line = request_line(caplog)
    assert (line["reason"], line["field"]) == ("identity_required", "person_id")
    assert "006a0f" not in orjson.dumps(line).decode()
    assert refusals(client, "act:cm:login", "identity_required") == 1
    resp = await client.post(PATH, json={**activity("p@example.com"), "person_id": "006a0f"})
    (entry,) = (await resp.json())["activities"]
    assert [w["code"] for w in entry["warnings"]] == ["not_signed"]


async def test_sync_mode_sends_only_the_merge_by_the_activities_kept(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(delivery="sync")
    takeover = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "attacker@example.com", "str::ei": "victim-ei-42"},
    }
    resp = await client.post(PATH, json={"activities": [takeover], "merge_by": ["str::ei"]})
    assert resp.status == 200, await resp.text()
    (entry,) = (await resp.json())["activities"]
    assert [w["field"] for w in entry["warnings"]] == ["merge_by"]
    ok = {"activity_id": "act:cm:login", "fields": {"str::email": "a@example.com"}}
    resp = await client.post(PATH, json={"activities": [ok], "merge_by": ["str::email"]})
    assert resp.status == 200, await resp.text()
    sent = [orjson.loads(r.body).get("merge_by") for r in sandbox_state.requests]
    assert sent == [None, ["str::email"]]


async def test_a_batch_with_an_activity_in_flight_is_not_answered_as_final(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    """The page's next request re-sends X (its first copy still being stored) with a new
    Y: a 202 would end the browser's attempts at X, which its first copy may still lose."""
    client = await make_gateway()
    held = HeldSink(client.app[RELAY], fails=True)
    x = {**activity("x@example.com"), "key": "x-1"}
    y = {**activity("y@example.com"), "key": "y-1"}
    first = asyncio.create_task(client.post(PATH, json=x))
    await held.started()
    both = await client.post(PATH, json={"activities": [x, y]})
    assert both.status == 503 and both.headers["Retry-After"] == "1"
    held.release.set()
    assert (await first).status == 503  # X's first copy failed
    again = await client.post(PATH, json={"activities": [x, y]})
    assert again.status == 202
    entries = (await again.json())["activities"]
    assert "duplicate" not in entries[0]  # X is new now: stored
    assert entries[1]["duplicate"] is True  # Y was stored by the 503'd request
    await wait_for(lambda: len(sandbox_state.activities) == 2)


async def test_a_request_cancelled_while_storing_still_settles_its_key(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    """A handler cancelled mid-write (a client gone at shutdown): the write still
    finishes and the key is marked stored, so the retry is a duplicate, not a second copy."""
    client = await make_gateway()
    relay = client.app[RELAY]
    held = HeldSink(relay, fails=False)
    thanks = {**activity("lead@example.com"), "key": "form-3"}
    task = asyncio.create_task(relay.submit(thanks, "127.0.0.1", "rid-1"))
    await held.started()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    held.release.set()
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    retry = await client.post(PATH, json=thanks)
    assert (await retry.json())["duplicate"] is True


async def test_a_request_cancelled_while_storing_without_a_key_is_still_spooled(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    """Without a key nothing is settled after the write, and the write is not shielded:
    the spool holds the put from before the request first waits, so cancelling it (a
    client gone at shutdown) loses nothing accepted."""
    client = await make_gateway(spool_commit="loop")  # commits at the end of this turn
    relay = client.app[RELAY]
    task = asyncio.create_task(relay.submit(activity("gone@example.com"), "127.0.0.1", "r"))
    await asyncio.sleep(0)  # the task runs up to its first wait: the spool's answer
    assert not task.done()
    task.cancel()  # before the spool's group commit, queued after this test's turn
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    assert sandbox_state.activities[0].email == "gone@example.com"


# -- the console's feed


async def activity_events(client: Any) -> list[FeedEvent]:
    return [e for e in await client.app[FEED].recent() if e["kind"] == "activity"]


async def test_each_activity_is_published_hashed_and_anonymised(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway(ip_anonymize=True)
    bad = {**activity("bad@example.com"), "created": "2020-01-01T00:00:00Z"}
    batch = [activity("Good@Example.com"), {"activity_id": "act:cm:login", "fields": {}}]
    resp = await client.post(
        PATH,
        json={"activities": [*batch, bad]},
        headers={"X-Forwarded-For": "203.0.113.9"},
    )
    assert resp.status == 202, await resp.text()
    request_id = resp.headers["X-Request-Id"]
    accepted, refused, warned = await activity_events(client)
    assert accepted["outcome"] == "accepted" and "reason" not in accepted
    assert accepted["person"] == person_hash("e:good@example.com")
    assert accepted["client"] == "203.0.113.0"
    assert accepted["request_id"] == request_id and accepted["activity_id"] == "act:cm:login"
    assert "test" not in accepted
    assert (refused["outcome"], refused["reason"], refused["field"]) == (
        "refused",
        "invalid_field",
        "fields",
    )
    assert "key" not in refused and "person" not in refused
    assert warned["outcome"] == "accepted" and warned["warnings"] == ["set_by_gateway"]
    # The key is the one Ortto gets: the console looks up what was sent by it.
    await wait_for(lambda: len(sandbox_state.activities) == 2)
    sent = {a.key for a in sandbox_state.activities}
    assert {accepted["key"], warned["key"]} == sent
    feed = client.app[FEED]
    await client.app[DELIVERY].drain(10.0)  # delivered, and recorded before the ack
    forwarded = await feed.forwarded(accepted["key"])
    assert forwarded is not None
    assert forwarded["body"]["fields"]["str::email"] == "****@Example.com"  # as sent
    text = orjson.dumps(await feed.recent()).decode()
    assert "good@example.com" not in text.lower() and "bad@example.com" not in text
    assert "203.0.113.9" not in text


async def test_a_personal_console_sees_the_person(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(console_personal=True)
    assert (await client.post(PATH, json=activity("Who@Example.com"))).status == 202
    (event,) = await activity_events(client)
    assert event["person"] == "e:who@example.com"
    assert event["client"] == "127.0.0.1"


async def test_rate_limited_and_duplicate_activities_are_published(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway(person_limit=parse_rate("1/1d"))
    assert (await client.post(PATH, json=activity("one@example.com"))).status == 202
    assert (await client.post(PATH, json=activity("one@example.com"))).status == 429
    first, limited = await activity_events(client)
    assert first["outcome"] == "accepted" and first["key"]
    assert (limited["outcome"], limited["reason"]) == ("refused", "person_limit")
    assert "key" not in limited


@pytest.mark.parametrize(("marker", "marked"), [("right", True), ("wrong", False)])
async def test_the_console_test_marker_marks_only_with_the_right_token(
    make_gateway: GatewayFactory, marker: str, marked: bool
) -> None:
    client = await make_gateway()
    token = console_test_token(client.app[SETTINGS])
    header = token if marker == "right" else "0" * len(token)
    resp = await client.post(PATH, json=activity("t@example.com"), headers={TEST_HEADER: header})
    assert resp.status == 202  # a real activity either way
    (event,) = await activity_events(client)
    assert event.get("test", False) is marked
