"""`Relay` on its own: a fake sink, the in-process limiter and an injected clock.

No server, no spool, no delivery worker: each test drives `Relay.submit` directly and
reads what the sink was given, the answer, the request's log data and the counters.
The gateway as a whole is tested in test_relay.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.config import ActivitySpec, Settings, parse_rate
from gateway.enrich import iso_millis
from gateway.errors import GatewayError, NotFound, Unauthorized, Unavailable
from gateway.identity import person_hash, person_key, sign_identity, sign_person_id
from gateway.limits import Decision, Limiter, LimiterUnavailable, MemoryStore, Rule
from gateway.metrics import Metrics
from gateway.relay import Relay, RelayResult
from gateway.sinks import QUEUED, SinkResult
from gateway.spool import QueuedActivity
from gateway.validation import EnrichedActivity
from tests.conftest import FakeClock, base_settings
from tests.limits_support import WrappedStore

CLIENT = "203.0.113.7"
OTHER_CLIENT = "198.51.100.4"
SECRET = "an-identity-secret-of-forty-characters-00"
DAY, HOUR = 86400, 3600


def activity(email: str, activity_id: str = "act:cm:login", **extra: Any) -> dict[str, Any]:
    return {"activity_id": activity_id, "fields": {"str::email": email}, **extra}


class FakeSink:
    """Records each batch it is given (decoded), and the room held for it.

    `full`: `reserve` answers no room. `fails`: `submit` raises it. `refuse`: positions
    of a batch answered as Ortto refused them (sync mode's per-activity answer)."""

    def __init__(self) -> None:
        self.batches: list[list[EnrichedActivity]] = []
        self.queued: list[QueuedActivity] = []  # with the columns the relay fills
        self.calls: list[dict[str, Any]] = []
        self.held_rows = self.held_bytes = 0
        self.full = False
        self.fails: Exception | None = None
        self.refuse: set[int] = set()

    @property
    def sent(self) -> list[EnrichedActivity]:
        return [a for batch in self.batches for a in batch]

    def reserve(self, count: int, nbytes: int) -> bool:
        if self.full:
            return False
        self.held_rows += count
        self.held_bytes += nbytes
        return True

    def unreserve(self, count: int, nbytes: int) -> None:
        self.held_rows -= count
        self.held_bytes -= nbytes
        assert self.held_rows >= 0 and self.held_bytes >= 0, "gave back more than it held"

    async def submit(
        self, queued: list[QueuedActivity], *, async_: bool, merge_by: list[str] | None
    ) -> SinkResult:
        activities = [q.payload for q in queued]
        self.queued.extend(queued)
        # What was reserved for exactly these: the room is now used (or, on failure, the
        # real sinks give it back through the spool's own accounting).
        self.held_rows -= len(activities)
        self.held_bytes -= sum(map(len, activities))
        if self.fails is not None:
            raise self.fails
        self.calls.append({"async": async_, "merge_by": merge_by})
        self.batches.append([orjson.loads(a) for a in activities])
        if not self.refuse:
            return SinkResult(202, [dict(QUEUED) for _ in activities])
        entries = [
            {"status": "invalid", "error": "refused", "reason": "upstream_refused"}
            if i in self.refuse
            else {"status": "created"}
            for i in range(len(activities))
        ]
        return SinkResult(200, entries, delivered=True)


class Rig:
    """A relay with real settings, metrics and limiter; a fake sink; one settable clock."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.clock = FakeClock(1_700_000_000.0)
        self.settings: Settings = base_settings(tmp_path, "http://127.0.0.1:9", **overrides)
        self.metrics = Metrics(CollectorRegistry(), self.settings.activities, process_metrics=False)
        self.store = MemoryStore()
        self.limiter = Limiter(self.store, clock=self.clock)
        self.sink = FakeSink()
        # Keywords only: an optional argument added to Relay leaves this as it is.
        self.relay = Relay(
            settings=self.settings,
            limiter=self.limiter,
            sink=self.sink,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.requests = 0

    async def submit(
        self, body: Any, ip: str | None = CLIENT, log: dict[str, Any] | None = None
    ) -> RelayResult:
        self.requests += 1
        result = await self.relay.submit(body, ip, f"rid-{self.requests}", log)
        self.assert_room_settled()
        return result

    async def refused(
        self, body: Any, ip: str | None = CLIENT, log: dict[str, Any] | None = None
    ) -> GatewayError:
        self.requests += 1
        with pytest.raises(GatewayError) as caught:
            await self.relay.submit(body, ip, f"rid-{self.requests}", log)
        self.assert_room_settled()
        return caught.value

    def assert_room_settled(self) -> None:
        """Whatever the outcome, nothing stays reserved in the sink."""
        assert (self.sink.held_rows, self.sink.held_bytes) == (0, 0)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def refusals(self, activity_id: str, reason: str) -> float:
        return self.sample("ortto_gateway_refusals_total", activity_id=activity_id, reason=reason)


@pytest.fixture(autouse=True)
def request_log(caplog: pytest.LogCaptureFixture) -> None:
    """The relay summarises into the request's log data only when that line is logged."""
    caplog.set_level(logging.INFO, "gateway.http")


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# -- accepted: what the sink is given


async def test_an_accepted_activity_reaches_the_sink_enriched(rig: Rig) -> None:
    body = activity("ada@example.com", attributes={"str:cm:plan": "pro"}, key="form-1")
    result = await rig.submit(body)
    assert (result.status, result.retry_after) == (202, None)
    assert result.body == {"activities": [{"status": "queued", "person_status": "queued"}]}
    (sent,) = rig.sink.sent
    assert sent["activity_id"] == "act:cm:login"
    assert sent["fields"] == {"str::email": "ada@example.com"}
    assert sent["attributes"] == {"str:cm:plan": "pro"}
    assert sent["location"] == {"source_ip": CLIENT}
    assert sent["created"] == iso_millis(rig.clock.now)
    # The gateway's own key, never the browser's idempotency key.
    assert sent["key"] and sent["key"] != "form-1"
    assert rig.sink.calls == [{"async": False, "merge_by": None}]
    labels = {"activity_id": "act:cm:login", "outcome": "accepted"}
    assert rig.sample("ortto_gateway_activities_total", **labels) == 1


async def test_the_spool_columns_come_from_the_check_and_the_clock(rig: Rig) -> None:
    # Delivery reads these columns, never the payload's bytes: they must agree with it.
    await rig.submit({"activities": [activity("a@example.com"), activity("b@example.com")]})
    assert [q.activity_id for q in rig.sink.queued] == ["act:cm:login"] * 2
    assert [q.person for q in rig.sink.queued] == [
        person_hash(person_key(a)) for a in rig.sink.sent
    ]
    assert len(set(q.person for q in rig.sink.queued)) == 2
    assert all(q.created == rig.clock() for q in rig.sink.queued)
    assert all(a["created"] == iso_millis(rig.clock()) for a in rig.sink.sent)


async def test_each_activity_gets_its_own_key_and_a_given_location_is_kept(rig: Rig) -> None:
    place = {"custom": {"city_name": "Sydney"}}
    batch = [activity("a@example.com"), activity("b@example.com", location=place)]
    assert (await rig.submit({"activities": batch})).status == 202
    first, second = rig.sink.sent
    assert first["key"] != second["key"]
    assert first["location"] == {"source_ip": CLIENT}
    assert second["location"] == place


async def test_an_anonymized_address_and_no_address(tmp_path: Path) -> None:
    rig = Rig(tmp_path, ip_anonymize=True)
    await rig.submit(activity("a@example.com"))
    await rig.submit(activity("b@example.com"), ip=None)
    with_ip, without = rig.sink.sent
    assert with_ip["location"] == {"source_ip": "203.0.113.0"}
    assert without["location"] == {}


# -- refused activities: reason codes, fields, counters and the log


async def test_a_batch_tells_each_refused_activity_its_reason_and_field(rig: Rig) -> None:
    no_identifier = {"activity_id": "act:cm:login", "fields": {"str::first": "Ada"}}
    unknown = activity("x@example.com", "act:cm:nope")
    log: dict[str, Any] = {}
    result = await rig.submit(
        {"activities": [activity("ok@example.com"), no_identifier, unknown]}, log=log
    )
    assert result.status == 202
    ok, invalid, missing = result.body["activities"]
    assert ok == {"status": "queued", "person_status": "queued"}
    assert (invalid["status"], invalid["reason"], invalid["field"]) == (
        "invalid",
        "invalid_field",
        "fields",
    )
    assert (missing["status"], missing["reason"], missing["field"]) == (
        "invalid",
        "unknown_activity",
        "activity_id",
    )
    assert [a["fields"] for a in rig.sink.sent] == [{"str::email": "ok@example.com"}]
    assert log["reasons"] == {"invalid_field": 1, "unknown_activity": 1}
    assert log["fields"] == ["activity_id", "fields"]
    assert result.log is not None
    assert (result.log["accepted"], result.log["refused"]) == (1, 2)
    assert len(result.log["people"]) == 1
    assert "@" not in orjson.dumps([log, result.log]).decode()  # hashes, never an email
    assert rig.refusals("act:cm:login", "invalid_field") == 1
    assert rig.refusals("other", "unknown_activity") == 1


async def test_a_request_with_nothing_valid_is_refused_whole(rig: Rig) -> None:
    error = await rig.refused(activity("x@example.com", "act:cm:nope"))
    assert isinstance(error, NotFound)
    assert (error.status, error.reason, error.field) == (404, "unknown_activity", "activity_id")
    assert error.counted  # the relay counted it per activity: the shell must not again
    assert rig.refusals("other", "unknown_activity") == 1
    assert rig.sink.batches == []


async def test_refused_activities_are_not_charged(tmp_path: Path) -> None:
    rig = Rig(tmp_path, person_limit=parse_rate("1/1d"))
    bad = {"activity_id": "act:cm:login", "fields": {"str::email": "x@example.com", "bol::p": 1}}
    for _ in range(3):
        await rig.refused(bad)
    assert (await rig.submit(activity("x@example.com"))).status == 202


# -- limits, on the injected clock


async def test_the_eleventh_in_a_day_for_a_person_waits_for_the_window(rig: Rig) -> None:
    for i in range(10):  # a minute apart
        email = "Chris@Example.com " if i % 2 else "chris@example.com"  # one person
        assert (await rig.submit(activity(email))).status == 202
        rig.clock.advance(60)
    log: dict[str, Any] = {}
    result = await rig.submit(activity("chris@example.com"), log=log)
    assert (result.status, result.retry_after) == (429, DAY - 600)
    assert (result.body["code"], result.body["reason"]) == (429, "person_limit")
    assert result.body["request_id"] == f"rid-{rig.requests}"
    (entry,) = result.body["activities"]
    assert (entry["status"], entry["reason"]) == ("rate_limited", "person_limit")
    assert log["reason"] == "person_limit"
    assert rig.refusals("act:cm:login", "person_limit") == 1
    # Another activity id for the same person has a budget of its own.
    assert (await rig.submit(activity("chris@example.com", "act:cm:signup"))).status == 202
    # A day after the first, one more fits; the next waits for the second's turn.
    rig.clock.advance(DAY - 600 - 1)
    assert (await rig.submit(activity("chris@example.com"))).retry_after == 1
    rig.clock.advance(1)
    assert (await rig.submit(activity("chris@example.com"))).status == 202
    assert (await rig.submit(activity("chris@example.com"))).retry_after == 60
    assert len(rig.sink.sent) == 12


async def test_the_hundred_and_first_from_one_address_waits_for_the_hour(rig: Rig) -> None:
    batch = [activity(f"p{i}@example.com") for i in range(100)]
    assert (await rig.submit({"activities": batch})).status == 202
    result = await rig.submit(activity("p100@example.com"))
    assert (result.status, result.retry_after, result.body["reason"]) == (429, HOUR, "ip_limit")
    assert "IP" in result.body["activities"][0]["error"]
    # Another address has its own budget; the same one (any port) has not.
    assert (await rig.submit(activity("p100@example.com"), ip=OTHER_CLIENT)).status == 202
    rig.clock.advance(HOUR)
    assert (await rig.submit(activity("p100@example.com"))).status == 202
    assert rig.refusals("act:cm:login", "ip_limit") == 1


async def test_a_batch_over_a_limit_is_accepted_in_part(rig: Rig) -> None:
    batch = [activity("same@example.com") for _ in range(12)]
    result = await rig.submit({"activities": batch})
    assert result.status == 202
    statuses = [e["status"] for e in result.body["activities"]]
    assert statuses == ["queued"] * 10 + ["rate_limited"] * 2
    assert len(rig.sink.sent) == 10  # the refused ones' room was given back (Rig checks)


async def test_limited_and_invalid_together_say_both(tmp_path: Path) -> None:
    rig = Rig(tmp_path, person_limit=parse_rate("1/1d"))
    await rig.submit(activity("twice@example.com"))
    invalid = {"activity_id": "act:cm:login", "fields": {"str::first": "no identifier"}}
    result = await rig.submit({"activities": [activity("twice@example.com"), invalid]})
    assert result.status == 429
    assert result.body["error"].startswith("no activity accepted: 1 over a rate limit, 1 invalid")
    assert [e["status"] for e in result.body["activities"]] == ["rate_limited", "invalid"]


# -- the browser's key


async def test_a_repeated_key_is_a_duplicate_charged_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, person_limit=parse_rate("2/1d"))
    thanks = activity("lead@example.com", key="form-7f3a")
    first = await rig.submit(thanks)
    assert first.status == 202 and "duplicate" not in first.body["activities"][0]
    for _ in range(3):
        again = await rig.submit(thanks)
        assert again.status == 202
        assert again.body == {
            "activities": [{"status": "queued", "person_status": "queued", "duplicate": True}],
            "duplicate": True,
        }
    assert len(rig.sink.sent) == 1
    assert (await rig.submit(activity("lead@example.com"))).status == 202
    assert (await rig.submit(activity("lead@example.com"))).status == 429
    # Another person's activity under the same key is theirs.
    other = await rig.submit(activity("other@example.com", key="form-7f3a"))
    assert "duplicate" not in other.body
    labels = {"activity_id": "act:cm:login", "outcome": "duplicate"}
    assert rig.sample("ortto_gateway_activities_total", **labels) == 3


async def test_a_key_not_stored_is_new_on_retry(rig: Rig) -> None:
    thanks = activity("lead@example.com", key="form-1")
    rig.sink.fails = Unavailable("the gateway cannot store activities now", retry_after=5.0)
    error = await rig.refused(thanks)
    assert error.status == 503
    rig.sink.fails = None
    retry = await rig.submit(thanks)
    assert retry.status == 202 and "duplicate" not in retry.body
    assert (await rig.submit(thanks)).body["duplicate"] is True


async def test_a_key_of_an_activity_ortto_refused_is_new_on_retry(rig: Rig) -> None:
    """Sync mode: what Ortto refused was not stored, so its key does not mark repeats."""
    batch = [activity("a@example.com", key="k-a"), activity("b@example.com", key="k-b")]
    rig.sink.refuse = {1}
    result = await rig.submit({"activities": batch})
    assert result.status == 200
    assert [e["status"] for e in result.body["activities"]] == ["created", "invalid"]
    delivered = {"activity_id": "act:cm:login", "outcome": "delivered"}
    assert rig.sample("ortto_gateway_activities_total", **delivered) == 1
    rig.sink.refuse = set()
    again = await rig.submit({"activities": batch})
    assert again.body["activities"][0]["duplicate"] is True
    assert "duplicate" not in again.body["activities"][1]


# -- the sink or the limiter cannot take the request


async def test_a_full_sink_is_503_spool_full_and_charges_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, person_limit=parse_rate("1/1d"))
    rig.sink.full = True
    log: dict[str, Any] = {}
    batch = {"activities": [activity("s1@example.com"), activity("s2@example.com")]}
    error = await rig.refused(batch, log=log)
    assert isinstance(error, Unavailable)
    assert (error.status, error.reason, error.retry_after) == (503, "spool_full", 5.0)
    assert log["reasons"] == {"spool_full": 2}
    assert rig.refusals("act:cm:login", "spool_full") == 2
    assert rig.sample("ortto_gateway_spool_full_total") == 1
    rig.sink.full = False
    assert (await rig.submit(batch)).status == 202  # neither person was charged


async def test_a_sink_failure_is_the_answer_and_counted_per_activity(rig: Rig) -> None:
    rig.sink.fails = Unavailable("the gateway is shutting down", reason="shutting_down")
    error = await rig.refused({"activities": [activity("a@example.com")] * 2})
    assert (error.status, error.reason) == (503, "shutting_down")
    assert rig.refusals("act:cm:login", "shutting_down") == 2


class DownStore(WrappedStore):
    """A limit store that cannot be reached (Redis down, LIMITER_ON_ERROR=closed)."""

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        raise LimiterUnavailable("down")


async def test_an_unavailable_limiter_is_503_and_gives_the_room_back(rig: Rig) -> None:
    rig.relay.limiter = Limiter(DownStore(), clock=rig.clock)
    error = await rig.refused(activity("a@example.com"))
    assert (error.status, error.reason) == (503, "limiter_unavailable")
    assert rig.sink.batches == []


# -- signed identities


async def test_a_person_id_needs_a_signed_identity_unless_the_activity_opts_in(
    tmp_path: Path,
) -> None:
    activities = {
        "act:cm:login": ActivitySpec("act:cm:login"),
        "act:cm:signup": ActivitySpec("act:cm:signup", person_id=True),
    }
    rig = Rig(tmp_path, identity_secrets=(SECRET,), activities=activities)
    alone = {"activity_id": "act:cm:login", "person_id": "006a0f"}
    error = await rig.refused(alone)
    assert isinstance(error, Unauthorized)
    assert (error.reason, error.field) == ("identity_required", "person_id")
    # Beside an email the id is dropped, with a warning, and the email leads.
    result = await rig.submit({**activity("a@example.com"), "person_id": "006a0f"})
    (entry,) = result.body["activities"]
    assert [(w["field"], w["code"]) for w in entry["warnings"]] == [("person_id", "not_signed")]
    assert "person_id" not in rig.sink.sent[-1]
    # Signed for that id (until a minute from the injected now), it goes through.
    token = sign_person_id("006a0f", SECRET, int(rig.clock.now) + 60)
    assert (await rig.submit({**alone, "identity": token})).status == 202
    assert rig.sink.sent[-1]["person_id"] == "006a0f"
    # The same token, two minutes later, has expired.
    rig.clock.advance(120)
    assert (await rig.refused({**alone, "identity": token})).reason == "identity_required"
    # An activity that opts in needs no token.
    assert (await rig.submit({"activity_id": "act:cm:signup", "person_id": "0077bb"})).status == 202
    assert rig.sink.sent[-1]["person_id"] == "0077bb"


async def test_a_signed_identity_sends_only_the_identifier_it_signs(tmp_path: Path) -> None:
    rig = Rig(tmp_path, identity_secrets=(SECRET,), identity_required=True)
    expires = int(rig.clock.now) + 3600
    unsigned = activity("me@example.com")
    assert (await rig.refused(unsigned)).reason == "identity_required"
    by_email = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "me@example.com", "str::ei": "victim-ei-42"},
        "identity": sign_identity("me@example.com", SECRET, expires),
    }
    result = await rig.submit(by_email)
    (entry,) = result.body["activities"]
    assert [(w["field"], w["code"]) for w in entry["warnings"]] == [
        ("fields.str::ei", "not_signed")
    ]
    assert rig.sink.sent[-1]["fields"] == {"str::email": "me@example.com"}
    # Someone else's signed email does not cover this one.
    other = {**by_email, "identity": sign_identity("you@example.com", SECRET, expires)}
    assert (await rig.refused(other)).reason == "identity_invalid"
    by_id = {
        "activity_id": "act:cm:login",
        "person_id": "006a0f",
        "fields": {"str::email": "victim@example.com", "str::first": "Me"},
        "merge_by": ["str::email"],
        "identity": sign_person_id("006a0f", SECRET, expires),
    }
    result = await rig.submit(by_id)
    (entry,) = result.body["activities"]
    assert sorted(w["field"] for w in entry["warnings"]) == ["fields.str::email", "merge_by"]
    sent = rig.sink.sent[-1]
    assert sent["fields"] == {"str::first": "Me"} and sent["person_id"] == "006a0f"
    assert "merge_by" not in sent and rig.sink.calls[-1]["merge_by"] is None


# -- warnings for what was dropped


async def test_dropped_optional_parts_are_warned_counted_and_logged(rig: Rig) -> None:
    body = {
        **activity("w@example.com"),
        "created": "2020-01-01T00:00:00Z",
        "merge_by": ["str::ei"],
        "location": {"source_ip": "10.0.0.1"},
    }
    log: dict[str, Any] = {}
    result = await rig.submit(body, log=log)
    assert result.status == 202
    (entry,) = result.body["activities"]
    assert [(w["field"], w["reason"], w["code"]) for w in entry["warnings"]] == [
        ("created", "dropped", "set_by_gateway"),
        ("location.source_ip", "dropped", "set_by_gateway"),
        ("merge_by", "dropped", "merge_by_not_allowed"),
    ]
    sent = rig.sink.sent[0]
    assert sent["created"] == iso_millis(rig.clock.now)  # the gateway's time, not the page's
    assert sent["location"] == {"source_ip": CLIENT}
    assert "merge_by" not in sent
    assert log["warnings"] == {"set_by_gateway": 2, "merge_by_not_allowed": 1}
    labels = {"activity_id": "act:cm:login", "reason": "set_by_gateway"}
    assert rig.sample("ortto_gateway_warnings_total", **labels) == 2


async def test_an_allowed_merge_by_travels_with_the_activity(rig: Rig) -> None:
    body = {"activities": [activity("a@example.com")], "merge_by": ["str::email"]}
    result = await rig.submit(body)
    assert "warnings" not in result.body["activities"][0]
    assert rig.sink.sent[0]["merge_by"] == ["str::email"]
    assert rig.sink.calls[0]["merge_by"] == ["str::email"]


async def test_a_dropped_key_of_the_body_is_warned_at_the_top(rig: Rig) -> None:
    body = {"activities": [activity("a@example.com")], "colour": "blue"}
    result = await rig.submit(body)
    assert result.status == 202
    assert [(w["field"], w["code"]) for w in result.body["warnings"]] == [("colour", "unknown_key")]
    assert (
        rig.sample("ortto_gateway_warnings_total", activity_id="other", reason="unknown_key") == 1
    )
