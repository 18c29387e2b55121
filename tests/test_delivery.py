"""Delivery against the sandbox: batches, retries, refusals, dead letters, pauses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.delivery import (
    ACK_RETRY_BASE,
    ACK_RETRY_CAP,
    BAD_ANSWER_ATTEMPTS,
    BAD_REQUEST_BUDGET,
    RESTART_BASE,
    UNCONFIRMED,
    Delivery,
    _key_of,
    full_jitter,
)
from gateway.enrich import enrich
from gateway.feed import FeedEvent, Forwarded, MemoryFeed
from gateway.logs import JsonFormatter
from gateway.metrics import Metrics
from gateway.sandbox import Fault, SandboxState, wait_for
from gateway.spool import Spool, SpooledItem, SpoolError
from gateway.upstream import EXCERPT_CHARS, OrttoClient, UpstreamResponse
from gateway.validation import ActivityBody
from tests.conftest import API_KEY
from tests.disk_support import Disk
from tests.spool_support import to_queue

DAY = 86400.0


def payload(i: int, *, created: float | None = None, fields: dict[str, str] | None = None) -> bytes:
    activity: ActivityBody = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": f"p{i}@example.com", **(fields or {})},
    }
    return orjson.dumps(enrich(activity, "192.0.2.1", created or time.time()))


class PauseClock:
    """Monotonic time for `Delivery`'s pauses: a pause's sleep moves it on at once, so a
    test checks how long delivery waited without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Rig:
    """A spool, a client to the sandbox and a delivery worker, started and stopped together."""

    def __init__(self, spool: Spool, client: OrttoClient, metrics: Metrics) -> None:
        self.spool = spool
        self.client = client
        self.metrics = metrics
        self.delivery: Delivery | None = None

    def start(self, **kw: Any) -> Delivery:
        options: dict[str, Any] = {
            "rate": 1000.0,
            "concurrency": 2,
            "batch_max_wait": 0.01,
            "circuit_pause": 0.5,
            "auth_pause": 0.2,
            "rng": lambda: 0.01,
        }
        options.update(kw)
        self.delivery = Delivery(self.spool, self.client, self.metrics, **options)
        self.delivery.start()
        return self.delivery

    async def stop(self) -> None:
        if self.delivery is not None:
            await self.delivery.stop(2.0)
            self.delivery = None

    async def settled(self, timeout: float = 15.0) -> None:
        """Wait until the spool is empty and no batch is still being settled (its
        metrics, logs and dead letters written)."""
        await wait_for(
            lambda: self.spool.depth == 0 and (self.delivery is None or self.delivery.idle),
            timeout=timeout,
        )

    def value(self, name: str, **labels: str) -> float:
        got = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    """The disk under `rig`'s spool (ask for it before `rig`)."""
    return Disk().install(monkeypatch)


@pytest.fixture
async def rig(sandbox: TestServer, tmp_path: Path) -> AsyncIterator[Rig]:
    spool = Spool(tmp_path / "spool.sqlite3")
    await spool.open()
    async with aiohttp.ClientSession() as session:
        client = OrttoClient(
            session, str(sandbox.make_url("/v1/activities/create")), API_KEY, timeout=2.0
        )
        metrics = Metrics(CollectorRegistry(), ["act:cm:login"], process_metrics=False)
        r = Rig(spool, client, metrics)
        try:
            yield r
        finally:
            await r.stop()
            await spool.close()


def test_full_jitter_is_bounded() -> None:
    assert full_jitter(0, lambda: 1.0) == 0.5
    assert full_jitter(3, lambda: 1.0) == 4.0
    assert full_jitter(100, lambda: 1.0) == 60.0
    assert full_jitter(5, lambda: 0.0) == 0.0


async def test_full_batches_under_load(rig: Rig, sandbox_state: SandboxState) -> None:
    await rig.spool.put(to_queue([payload(i) for i in range(250)]))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 250)
    sizes = [r.n_activities for r in sandbox_state.requests]
    assert sizes == [100, 100, 50]
    assert all(len(r.body) < 2 * 1024 * 1024 for r in sandbox_state.requests)
    await rig.settled()
    assert (
        rig.value("ortto_gateway_activities_total", activity_id="act:cm:login", outcome="delivered")
        == 250
    )
    assert rig.value("ortto_gateway_upstream_batch_activities_count") == 3


async def test_a_full_batch_goes_without_waiting_out_the_fill_time(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # The fill wait ends as soon as 100 are waiting: batches leave one by one as they fill,
    # never several at once after the whole wait (a burst of loop work).
    await rig.spool.put(to_queue([payload(i) for i in range(30)]))
    rig.start(batch_max_wait=3600.0)
    await rig.spool.put(to_queue([payload(i) for i in range(30, 100)]))
    await wait_for(lambda: len(sandbox_state.activities) == 100)
    assert [r.n_activities for r in sandbox_state.requests] == [100]


async def test_largest_activities_fit_one_request(rig: Rig, sandbox_state: SandboxState) -> None:
    # 100 activities near Ortto's 16 kB each still make one request under its 2 MB.
    big = "x" * 3900
    payloads = []
    for i in range(100):
        activity: ActivityBody = {
            "activity_id": "act:cm:login",
            "fields": {"str::email": f"big{i}@example.com"},
            "attributes": {f"txt:cm:t{j}": big for j in range(3)},
        }
        payloads.append(orjson.dumps(enrich(activity, "192.0.2.1", time.time())))
    await rig.spool.put(to_queue(payloads))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 100)
    assert [r.n_activities for r in sandbox_state.requests] == [100]
    assert 1_000_000 < len(sandbox_state.requests[0].body) <= 2 * 1024 * 1024


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=503, count=3),
        Fault(status=503, count=2, retry_after=0.2),
        Fault(status=429, count=2, try_in_seconds=0),
        Fault(status=500, count=2),
        Fault(status=200, count=2, process=True, delay=0.0),
    ],
    ids=["503", "503-retry-after", "429-try-in", "500", "slow-success"],
)
async def test_retries_until_delivered_each_key_once(
    rig: Rig, sandbox_state: SandboxState, fault: Fault
) -> None:
    sandbox_state.add_fault(fault)
    await rig.spool.put(to_queue([payload(i) for i in range(30)]))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 30, timeout=10)
    await rig.settled()
    seen = sandbox_state.keys_seen()
    assert len(seen) == 30
    assert len({a.key for a in sandbox_state.activities}) == 30


async def test_batches_failing_together_back_off_once(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # Four batches in flight when the outage hits, all four fail: one step of backoff.
    # The next batch sent fails too: it waits the second step (rng 1.0: 1 s), where
    # counting each of the four would have made it the fifth (8 s).
    sandbox_state.add_fault(Fault(status=503, count=5, delay=0.3))
    await rig.spool.put(to_queue([payload(i) for i in range(400)]))
    clock = PauseClock()
    rig.start(concurrency=4, rng=lambda: 1.0, monotonic=clock, sleep=clock.sleep)
    await wait_for(lambda: len(sandbox_state.activities) == 400)
    assert [r.status for r in sandbox_state.requests[:5]] == [503] * 5
    assert max(clock.slept) == 1.0  # each wait one step at most: 0.5 s, then 1 s


async def test_ambiguous_failure_merges_instead_of_duplicating(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # Ortto processes the batch but the gateway sees a 503: the retry carries the same
    # key and created, so Ortto merges it.
    sandbox_state.add_fault(Fault(status=503, count=1, process=True))
    await rig.spool.put(to_queue([payload(i) for i in range(10)]))
    rig.start()
    await rig.settled()
    assert len(sandbox_state.activities) == 10
    assert sandbox_state.duplicates == 10
    assert rig.value("ortto_gateway_upstream_retries_total", reason="server_error") >= 1


async def test_timeout_is_retried(
    rig: Rig, sandbox_state: SandboxState, sandbox: TestServer
) -> None:
    async with aiohttp.ClientSession() as session:
        rig.client = OrttoClient(
            session, str(sandbox.make_url("/v1/activities/create")), API_KEY, timeout=0.2
        )
        sandbox_state.add_fault(Fault(status=200, count=1, process=True, delay=1.0))
        await rig.spool.put(to_queue([payload(i) for i in range(5)]))
        rig.start()
        await rig.settled()
        await rig.stop()
    assert len(sandbox_state.activities) == 5
    assert rig.value("ortto_gateway_upstream_requests_total", status="error") >= 1


async def test_per_activity_refusal_in_200_is_dead_lettered_then_replayed(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    good = [payload(i) for i in range(4)]
    bad = payload(99, fields={"str:cm:nickname": "Shorty"})
    await rig.spool.put(to_queue([*good[:2], bad, *good[2:]]))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 4)
    await rig.settled()
    letters = await rig.spool.list_dead_letters()
    assert len(letters) == 1
    assert "str:cm:nickname" in letters[0].error
    assert letters[0].activity_id == "act:cm:login"
    assert "p99@example.com" not in letters[0].person_hash
    assert (
        rig.value(
            "ortto_gateway_activities_total", activity_id="act:cm:login", outcome="dead_lettered"
        )
        == 1
    )
    # The field is created in Ortto; replay delivers it.
    sandbox_state.person_fields = sandbox_state.person_fields | {"str:cm:nickname"}
    assert await rig.spool.replay_dead_letters() == 1
    await wait_for(lambda: len(sandbox_state.activities) == 5)
    assert sandbox_state.activities[-1].email == "p99@example.com"


async def test_batch_400_is_bisected_to_the_refused_activity(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # The sandbox's clock runs a day ahead: the activity created 89.5 days ago is
    # still young enough for the gateway but too old for "Ortto".
    sandbox_state.clock = lambda: time.time() + DAY
    old = payload(7, created=time.time() - 89.5 * DAY)
    others = [payload(i) for i in range(20)]
    await rig.spool.put(to_queue([*others[:7], old, *others[7:]]))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 20)
    await rig.settled()
    letters = await rig.spool.list_dead_letters()
    assert [d.error for d in letters] == ["Created date is more than 90 days ago"]
    bad_requests = sum(r.status == 400 for r in sandbox_state.requests)
    assert 1 < bad_requests < BAD_REQUEST_BUDGET
    assert sandbox_state.bans == 0


async def test_activities_older_than_90_days_are_dead_lettered_locally(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    await rig.spool.put(to_queue([payload(1, created=time.time() - 91 * DAY), payload(2)]))
    rig.start()
    await wait_for(lambda: len(sandbox_state.activities) == 1)
    await rig.settled()
    letters = await rig.spool.list_dead_letters()
    assert len(letters) == 1
    assert "90 days" in letters[0].error
    assert all(r.status == 200 for r in sandbox_state.requests)


async def test_refusals_named_in_details_need_no_bisection(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # Every activity carries an unknown person field: Ortto's 400 lists each one.
    await rig.spool.put(to_queue([payload(i, fields={"str:cm:nope": "x"}) for i in range(40)]))
    rig.start()
    await rig.settled()
    assert len(sandbox_state.requests) == 1
    assert len(await rig.spool.list_dead_letters(limit=100)) == 40
    assert sandbox_state.bans == 0


async def test_a_storm_of_refusals_opens_the_circuit_not_the_ban(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    # Ortto refuses the next requests outright: bisection would feed its IP ban.
    sandbox_state.add_fault(Fault(status=400, count=BAD_REQUEST_BUDGET + 2))
    await rig.spool.put(to_queue([payload(i) for i in range(64)]))
    rig.start(concurrency=1)
    await wait_for(lambda: rig.value("ortto_gateway_delivery_paused", reason="circuit") == 1)
    await rig.settled()
    assert sandbox_state.bans == 0
    bad = sum(r.status == 400 for r in sandbox_state.requests)
    assert bad == BAD_REQUEST_BUDGET + 2
    letters = await rig.spool.list_dead_letters(limit=100)
    assert len(letters) + len(sandbox_state.activities) == 64
    assert rig.value("ortto_gateway_delivery_paused", reason="circuit") == 0


async def test_wrong_key_pauses_and_keeps_everything(rig: Rig, sandbox_state: SandboxState) -> None:
    sandbox_state.api_key = "the-right-key-is-elsewhere"
    await rig.spool.put(to_queue([payload(i) for i in range(12)]))
    rig.start()
    await wait_for(lambda: rig.value("ortto_gateway_delivery_paused", reason="auth") == 1)
    await wait_for(lambda: sum(r.status == 401 for r in sandbox_state.requests) >= 2)
    assert rig.spool.depth == 12
    assert await rig.spool.list_dead_letters() == []
    assert sandbox_state.bans == 0
    # The operator fixes the key: everything is delivered.
    sandbox_state.api_key = API_KEY
    await wait_for(lambda: len(sandbox_state.activities) == 12, timeout=10)
    await wait_for(lambda: rig.value("ortto_gateway_delivery_paused", reason="auth") == 0)


async def test_rate_limit_pause_is_visible(rig: Rig, sandbox_state: SandboxState) -> None:
    sandbox_state.add_fault(Fault(status=429, count=1, try_in_seconds=30))
    await rig.spool.put(to_queue([payload(i) for i in range(3)]))
    clock = PauseClock()
    rig.start(monotonic=clock, sleep=clock.sleep)
    await wait_for(lambda: len(sandbox_state.activities) == 3)
    assert rig.value("ortto_gateway_delivery_pauses_total", reason="rate_limit") == 1
    assert sum(clock.slept) >= 30.0  # honoured try-in-seconds, and no real wait
    assert rig.value("ortto_gateway_delivery_paused", reason="rate_limit") == 0


async def test_stop_delivers_the_spool_within_the_drain_timeout(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    await rig.spool.put(to_queue([payload(i) for i in range(250)]))
    delivery = rig.start()
    await delivery.stop(10.0)
    rig.delivery = None
    assert len(sandbox_state.activities) == 250
    assert rig.spool.depth == 0


async def test_a_batch_that_fails_during_the_drain_is_sent_again(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    sandbox_state.add_fault(Fault(status=503, count=1, delay=0.2))
    await rig.spool.put(to_queue([payload(i) for i in range(10)]))
    delivery = rig.start()
    await wait_for(lambda: rig.spool.available == 0)
    await delivery.stop(5.0)  # the batch is in flight: nothing is available to lease
    rig.delivery = None
    assert [r.status for r in sandbox_state.requests] == [503, 200]
    assert len(sandbox_state.activities) == 10
    assert rig.spool.depth == 0


async def test_drain_then_stop_waits_for_one_timeout_only(
    rig: Rig, sandbox_state: SandboxState, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox_state.add_fault(Fault(status=503, count=1000))
    await rig.spool.put(to_queue([payload(i) for i in range(3)]))
    delivery = rig.start(rng=lambda: 1.0)  # backoff 0.5 s, then 1 s
    loop = asyncio.get_running_loop()
    started = loop.time()
    await delivery.drain(1.0)
    await delivery.stop(30.0)
    rig.delivery = None
    # One timeout: stop's own 30 s would make it over 31 s, whatever the machine's speed.
    assert loop.time() - started < 30.0
    assert rig.spool.depth == 3  # kept for the next start
    (line,) = [r for r in caplog.records if r.getMessage().startswith("drain timeout")]
    assert line.__dict__["data"] == {"activities": 3, "paused": "backoff"}


async def test_stop_keeps_what_the_drain_timeout_cuts_off(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    sandbox_state.latency = 1.0
    await rig.spool.put(to_queue([payload(i) for i in range(300)]))
    delivery = rig.start(concurrency=1)
    await wait_for(lambda: len(sandbox_state.requests) == 1)
    await delivery.stop(1.5)
    rig.delivery = None
    delivered = rig.value(
        "ortto_gateway_activities_total", activity_id="act:cm:login", outcome="delivered"
    )
    # The batch in flight finished; what was not acknowledged stays for the next start.
    assert delivered >= 100
    assert rig.spool.depth > 0
    assert rig.spool.depth + delivered == 300


async def test_gauges_follow_the_spool(rig: Rig, sandbox_state: SandboxState) -> None:
    sandbox_state.add_fault(Fault(status=503, count=1000))
    await rig.spool.put(to_queue([payload(i, created=time.time() - 30) for i in range(3)]))
    rig.start()
    await wait_for(lambda: rig.value("ortto_gateway_spool_depth") == 3)
    await wait_for(lambda: rig.value("ortto_gateway_spool_oldest_age_seconds") >= 0)
    sandbox_state.clear_faults()


def delivered(rig: Rig) -> float:
    return rig.value(
        "ortto_gateway_activities_total", activity_id="act:cm:login", outcome="delivered"
    )


def no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    formatter = JsonFormatter()
    for record in caplog.records:
        assert API_KEY not in formatter.format(record)
        assert API_KEY[:8] not in formatter.format(record)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=200, count=3, answer="html"),
        Fault(status=200, count=3, answer="html", process=True),
        Fault(status=204, count=3, answer="empty"),
        Fault(status=200, count=3, answer="echo_key"),
    ],
    ids=["html", "html-after-processing", "204-empty", "200-error-echoing-the-key"],
)
async def test_a_2xx_that_does_not_account_for_each_activity_is_retried_with_backoff(
    rig: Rig, sandbox_state: SandboxState, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    # A proxy's page, a captive portal, a wrong URL: a 2xx alone proves nothing.
    sandbox_state.add_fault(fault)
    await rig.spool.put(to_queue([payload(i) for i in range(10)]))
    clock = PauseClock()
    rig.start(rng=lambda: 1.0, monotonic=clock, sleep=clock.sleep)
    await rig.settled()
    assert [r.status for r in sandbox_state.requests] == [fault.status] * 3 + [200]
    assert clock.slept == [0.5, 1.0, 2.0]  # backoff, as after a 5xx
    assert rig.value("ortto_gateway_upstream_retries_total", reason="bad_answer") == 3
    assert len(sandbox_state.activities) == 10 and len(sandbox_state.keys_seen()) == 10
    assert delivered(rig) == 10  # counted once, when Ortto's answer showed it
    assert await rig.spool.list_dead_letters() == []
    (warning, *_) = [r for r in caplog.records if r.getMessage() == "delivery failed; will retry"]
    assert warning.levelname == "WARNING"
    reason = warning.__dict__["data"]["reason"]
    assert reason.startswith(f"{UNCONFIRMED}: it answered {fault.status} with ")
    assert len(reason) < EXCERPT_CHARS + 60
    no_secret_logged(caplog)


async def test_an_activity_never_confirmed_is_dead_lettered_with_the_reason(
    rig: Rig, sandbox_state: SandboxState, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox_state.add_fault(Fault(status=200, count=BAD_ANSWER_ATTEMPTS, answer="echo_key"))
    await rig.spool.put(to_queue([payload(i) for i in range(5)]))
    clock = PauseClock()
    rig.start(monotonic=clock, sleep=clock.sleep)
    await rig.settled()
    assert len(sandbox_state.requests) == BAD_ANSWER_ATTEMPTS
    assert len(clock.slept) == BAD_ANSWER_ATTEMPTS - 1  # waited before each retry
    letters = await rig.spool.list_dead_letters()
    assert len(letters) == 5
    for letter in letters:
        assert letter.error.startswith(f"{UNCONFIRMED}: it answered 200 with ")
        assert "****" in letter.error and API_KEY not in letter.error
    assert delivered(rig) == 0
    assert (
        rig.value(
            "ortto_gateway_activities_total", activity_id="act:cm:login", outcome="dead_lettered"
        )
        == 5
    )
    no_secret_logged(caplog)
    # Ortto answers properly again: the dead letters are replayed and delivered.
    assert await rig.spool.replay_dead_letters(error_contains=UNCONFIRMED) == 5
    await wait_for(lambda: len(sandbox_state.activities) == 5, timeout=10)


class CannedClient(OrttoClient):
    """Answers each post with the next canned body (200), then with the sandbox's shape."""

    def __init__(self, answers: list[Any]) -> None:
        super().__init__(None, "http://127.0.0.1:9/", API_KEY, timeout=1.0)  # type: ignore[arg-type]
        self.answers = answers

    async def post(self, body: bytes) -> UpstreamResponse:
        count = len(orjson.loads(body)["activities"])
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            answer = {"activities": [{"status": "queued", "person_status": "queued"}] * count}
        return UpstreamResponse(200, orjson.dumps(answer), None, 0.001)


async def test_an_entry_reporting_an_error_is_never_counted_delivered(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.client = CannedClient(
        [
            {
                "activities": [
                    {"status": "ingested", "person_status": "created"},
                    {"status": "ingested", "error": "person merge failed"},
                    {"status": "invalid", "error": f"bad header X-Api-Key: {API_KEY}\n[fake]"},
                ]
            }
        ]
    )
    await rig.spool.put(to_queue([payload(i) for i in range(3)]))
    rig.start()
    await rig.settled()
    assert delivered(rig) == 1
    letters = await rig.spool.list_dead_letters()
    assert sorted(d.error for d in letters) == [
        "bad header X-Api-Key: **** [fake]",
        "person merge failed",
    ]
    no_secret_logged(caplog)


async def test_a_refusal_echoing_the_key_is_dead_lettered_masked(
    rig: Rig, sandbox_state: SandboxState, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox_state.add_fault(Fault(status=400, count=1, answer="echo_key"))
    await rig.spool.put(to_queue([payload(1)]))
    rig.start()
    await rig.settled()
    (letter,) = await rig.spool.list_dead_letters()
    assert letter.error == "the API key '****' is not allowed here"
    no_secret_logged(caplog)


async def test_an_error_while_sending_backs_off_instead_of_spinning(
    rig: Rig, sandbox_state: SandboxState, sandbox: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A key with a line break inside: aiohttp refuses the header with a ValueError, for
    # every batch. It used to be retried at once, again and again, with no backoff.
    async with aiohttp.ClientSession() as session:
        rig.client = OrttoClient(
            session, str(sandbox.make_url("/v1/activities/create")), "pk-a\nb", timeout=2.0
        )
        await rig.spool.put(to_queue([payload(i) for i in range(5)]))
        clock = PauseClock()
        rig.start(rng=lambda: 1.0, monotonic=clock, sleep=clock.sleep)
        await wait_for(lambda: len(clock.slept) >= 4, timeout=5)
        await rig.stop()
    assert clock.slept[:4] == [0.5, 1.0, 2.0, 4.0]
    assert rig.value("ortto_gateway_upstream_retries_total", reason="internal") >= 4
    assert sandbox_state.requests == []
    assert rig.spool.depth == 5 and await rig.spool.list_dead_letters() == []
    (line, *_) = [r for r in caplog.records if r.getMessage() == "delivery failed; will retry"]
    assert line.levelname == "ERROR"
    assert line.__dict__["data"]["reason"].startswith("ValueError: ")


class FailingLeases(Spool):
    """A spool whose next `failures` leases fail, as a spool that cannot be read."""

    failures = 0

    async def lease(self, max_items: int, max_bytes: int) -> list[SpooledItem]:
        if self.failures:
            self.failures -= 1
            raise SpoolError("spool database error: disk I/O error")
        return await super().lease(max_items, max_bytes)


async def test_a_worker_stopped_by_a_spool_error_is_started_again(
    sandbox: TestServer, sandbox_state: SandboxState, tmp_path: Path
) -> None:
    async with FailingLeases(tmp_path / "spool.sqlite3") as spool, aiohttp.ClientSession() as s:
        client = OrttoClient(
            s, str(sandbox.make_url("/v1/activities/create")), API_KEY, timeout=2.0
        )
        rig = Rig(spool, client, Metrics(CollectorRegistry(), process_metrics=False))
        assert rig.metrics.registry.get_sample_value("ortto_gateway_delivery_restarts_total") == 0
        await spool.put(to_queue([payload(i) for i in range(5)]))
        spool.failures = 3
        clock = PauseClock()
        rig.start(monotonic=clock, sleep=clock.sleep)
        try:
            await wait_for(lambda: len(sandbox_state.activities) == 5)
        finally:
            await rig.stop()
    assert rig.value("ortto_gateway_delivery_restarts_total") == 3
    assert clock.slept == pytest.approx([RESTART_BASE, RESTART_BASE * 2, RESTART_BASE * 4])


async def test_a_failed_ack_is_retried_first_and_nothing_is_sent_twice(
    disk: Disk, rig: Rig, sandbox_state: SandboxState
) -> None:
    await rig.spool.put(to_queue([payload(i) for i in range(10)]))
    disk.full = True  # Ortto takes the batch; the acknowledgement cannot be written
    clock = PauseClock()
    rig.start(monotonic=clock, sleep=clock.sleep)
    await wait_for(lambda: len(sandbox_state.activities) == 10)
    await wait_for(lambda: sum(clock.slept) > 4 * ACK_RETRY_CAP)  # retried, backing off
    assert (rig.spool.depth, rig.spool.leased) == (10, 10)  # kept, and not sent again
    assert len(sandbox_state.requests) == 1
    disk.full = False  # space again: the spool drains by itself, no restart
    await rig.settled()
    assert sandbox_state.duplicates == 0 and len(sandbox_state.requests) == 1
    steps = [ACK_RETRY_BASE, ACK_RETRY_BASE * 2, ACK_RETRY_BASE * 4]
    assert clock.slept[:3] == pytest.approx(steps)
    assert max(clock.slept) == pytest.approx(ACK_RETRY_CAP)
    assert rig.value("ortto_gateway_delivery_restarts_total") == 0
    await rig.spool.put(to_queue([payload(i) for i in range(10, 15)]))  # and delivery goes on
    await wait_for(lambda: len(sandbox_state.activities) == 15)
    await rig.settled()


async def test_activities_go_to_ortto_grouped_by_their_merge_by(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    def keyed(i: int, merge_by: list[str] | None) -> bytes:
        activity: ActivityBody = {
            "activity_id": "act:cm:login",
            "fields": {"str::email": f"m{i}@example.com", "str::ei": f"u-{i}"},
        }
        if merge_by:
            activity["merge_by"] = merge_by
        return orjson.dumps(enrich(activity, "192.0.2.1", time.time()))

    mixed = [None, ["str::email"], None, ["str::ei", "str::email"], ["str::email"]]
    await rig.spool.put(to_queue([keyed(i, m) for i, m in enumerate(mixed)]))
    rig.start()
    await rig.settled()
    bodies = [orjson.loads(r.body) for r in sandbox_state.requests]
    # One request per merge_by, in the order of each one's first activity, nothing lost.
    assert [b.get("merge_by") for b in bodies] == [None, ["str::email"], ["str::ei", "str::email"]]
    emails = [[a["fields"]["str::email"] for a in b["activities"]] for b in bodies]
    assert emails == [
        ["m0@example.com", "m2@example.com"],
        ["m1@example.com", "m4@example.com"],
        ["m3@example.com"],
    ]
    assert len(sandbox_state.activities) == 5


class RaceClient(OrttoClient):
    """A batch of A and B where A is given back (a 503) and then B's request fails.

    B's failing request waits until another batch is sending A again, so what the failed
    batch gives back decides whether A goes out twice at once. That second sending of A
    waits for `gate`; every request is recorded with the emails it carried.
    """

    def __init__(self, first: int) -> None:
        super().__init__(None, "http://127.0.0.1:9/", API_KEY, timeout=1.0)  # type: ignore[arg-type]
        self.first = first  # the status of the first request (A and B together, or A)
        self.posts: list[list[str]] = []
        self.sending_a = 0
        self.most_sending_a = 0
        self.a_again = asyncio.Event()
        self.gate = asyncio.Event()

    async def post(self, body: bytes) -> UpstreamResponse:
        activities = orjson.loads(body)["activities"]
        emails = [a["fields"]["str::email"] for a in activities]
        self.posts.append(emails)
        if len(self.posts) == 1:
            return UpstreamResponse(self.first, b'{"error": "no"}', None, 0.001)
        if emails == ["a@example.com"] and self.posts.count(emails) == 1:
            return UpstreamResponse(503, b"", None, 0.001)
        if emails == ["b@example.com"] and self.posts.count(emails) == 1:
            await self.a_again.wait()
            raise ValueError("a bug of the gateway's")
        if "a@example.com" in emails:
            self.sending_a += 1
            self.most_sending_a = max(self.most_sending_a, self.sending_a)
            self.a_again.set()
            try:
                await self.gate.wait()
            finally:
                self.sending_a -= 1
        answer = {"activities": [{"status": "queued", "person_status": "queued"}] * len(emails)}
        return UpstreamResponse(200, orjson.dumps(answer), None, 0.001)


@pytest.mark.parametrize(
    ("merge_by", "first"),
    [(["str::email"], 503), (None, 400)],
    ids=["a-later-merge_by-group-fails", "a-later-half-of-a-bisection-fails"],
)
async def test_a_failing_batch_never_gives_back_rows_it_gave_back_already(
    rig: Rig, merge_by: list[str] | None, first: int
) -> None:
    # A batch whose later request fails (a bug, a cancellation) used to give back all its
    # rows, those an earlier request had given back too: by then another batch's, which
    # was sending them while a third one got them again.
    def activity(email: str, merge_by: list[str] | None) -> bytes:
        body: ActivityBody = {"activity_id": "act:cm:login", "fields": {"str::email": email}}
        if merge_by:
            body["merge_by"] = merge_by
        return orjson.dumps(enrich(body, "192.0.2.1", time.time()))

    client = rig.client = RaceClient(first)
    await rig.spool.put(
        to_queue([activity("a@example.com", None), activity("b@example.com", merge_by)])
    )
    clock = PauseClock()
    rig.start(monotonic=clock, sleep=clock.sleep)
    # B is sent again once the failed batch gave it back; A, if given back too, meanwhile.
    await wait_for(lambda: client.posts.count(["b@example.com"]) == 2 or client.most_sending_a > 1)
    assert client.most_sending_a == 1  # A is not sent twice at once
    client.gate.set()
    await rig.settled()
    assert delivered(rig) == 2
    a_posts = [p for p in client.posts if "a@example.com" in p]
    assert len(a_posts) == (3 if first == 400 else 2)


# -- the console's feed


def shown(feed: MemoryFeed) -> list[Forwarded]:
    """Every forwarded body the feed keeps, as the console would be shown it."""
    return [show() for show in feed._forwarded.values()]


def feed_events(feed: MemoryFeed, outcome: str) -> list[FeedEvent]:
    return [e for e in feed._events if e["kind"] == "delivery" and e["outcome"] == outcome]


async def test_a_delivery_is_published_with_the_bodies_sent_emails_masked(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    feed = MemoryFeed()
    payloads = [payload(i) for i in range(3)]
    keys = [orjson.loads(p)["key"] for p in payloads]
    await rig.spool.put(to_queue(payloads))
    rig.start(feed=feed)
    await wait_for(lambda: len(sandbox_state.activities) == 3)
    await rig.settled()
    delivered = feed_events(feed, "delivered")
    assert sorted(k for e in delivered for k in e["keys"]) == sorted(keys)
    assert all(e["status"] == 200 and e["ms"] >= 0 for e in delivered)
    assert sum(e["count"] for e in delivered) == 3
    forwarded = await feed.forwarded(keys[1])
    assert forwarded is not None
    assert forwarded["status"] == 200
    assert forwarded["body"]["fields"]["str::email"] == "****@example.com"
    assert forwarded["body"]["key"] == keys[1]
    assert forwarded["answer"]["status"] in ("ingested", "queued")
    assert "p1@example.com" not in orjson.dumps(shown(feed)).decode()
    assert API_KEY not in orjson.dumps([list(feed._events), shown(feed)]).decode()


async def test_a_forwarded_body_is_masked_only_when_the_console_asks(
    rig: Rig, sandbox_state: SandboxState, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[bytes] = []
    show = Delivery._show

    def counted(self: Delivery, payload: bytes, *args: Any) -> Forwarded:
        shown.append(payload)
        return show(self, payload, *args)

    monkeypatch.setattr(Delivery, "_show", counted)
    feed = MemoryFeed()
    payloads = [payload(i) for i in range(3)]
    await rig.spool.put(to_queue(payloads))
    rig.start(feed=feed)
    await rig.settled()
    assert len(sandbox_state.activities) == 3
    assert shown == []  # delivered, and nothing masked yet
    forwarded = await feed.forwarded(orjson.loads(payloads[2])["key"])
    assert forwarded is not None
    assert forwarded["body"]["fields"]["str::email"] == "****@example.com"
    assert shown == [payloads[2]]


async def test_a_personal_console_sees_the_emails_sent(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    feed = MemoryFeed()
    one = payload(5)
    await rig.spool.put(to_queue([one]))
    rig.start(feed=feed, personal=True)
    await rig.settled()
    forwarded = await feed.forwarded(orjson.loads(one)["key"])
    assert forwarded is not None
    assert forwarded["body"]["fields"]["str::email"] == "p5@example.com"


async def test_a_dead_letter_and_a_retry_are_published(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    feed = MemoryFeed()
    sandbox_state.add_fault(Fault(status=503, count=1))
    sandbox_state.add_fault(Fault(status=400, count=1, answer="echo_key"))
    one = payload(1)
    key = orjson.loads(one)["key"]
    await rig.spool.put(to_queue([one]))
    rig.start(feed=feed)
    await rig.settled()
    (retried,) = feed_events(feed, "retried")
    assert (retried["status"], retried["keys"], retried["error"]) == (
        503,
        [key],
        "Ortto answered 503",
    )
    (dead,) = feed_events(feed, "dead_lettered")
    assert (dead["status"], dead["keys"], dead["count"]) == (400, [key], 1)
    assert dead["error"] == "the API key '****' is not allowed here"
    forwarded = await feed.forwarded(key)
    assert forwarded is not None and forwarded["status"] == 400
    assert forwarded["answer"] == {"error": "the API key '****' is not allowed here"}
    assert not feed_events(feed, "delivered")
    assert API_KEY not in orjson.dumps([list(feed._events), shown(feed)]).decode()


async def test_a_refusal_within_a_200_is_dead_lettered_in_the_feed(
    rig: Rig, sandbox_state: SandboxState
) -> None:
    feed = MemoryFeed()
    good, bad = payload(1), payload(99, fields={"str:cm:nickname": "Shorty"})
    await rig.spool.put(to_queue([good, bad]))
    rig.start(feed=feed)
    await rig.settled()
    (delivered,) = feed_events(feed, "delivered")
    (dead,) = feed_events(feed, "dead_lettered")
    assert delivered["keys"] == [orjson.loads(good)["key"]]
    assert dead["keys"] == [orjson.loads(bad)["key"]] and "str:cm:nickname" in dead["error"]


def test_the_key_of_a_payload_is_its_last_one() -> None:
    p = payload(3, fields={"str:cm:note": 'a "key":"not-this" inside'})
    assert _key_of(p) == orjson.loads(p)["key"]
    assert _key_of(b"{}") == ""


class GatedClient(OrttoClient):
    """Holds every post until `gate` is set; counts the posts waiting."""

    def __init__(self) -> None:
        super().__init__(None, "http://127.0.0.1:9/", API_KEY, timeout=1.0)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.waiting = 0

    async def post(self, body: bytes) -> UpstreamResponse:
        count = len(orjson.loads(body)["activities"])
        self.waiting += 1
        await self.gate.wait()
        answer = {"activities": [{"status": "queued", "person_status": "queued"}] * count}
        return UpstreamResponse(200, orjson.dumps(answer), None, 0.001)


async def test_batches_in_flight_are_a_gauge(rig: Rig) -> None:
    # What the console's delivery panel and Prometheus show as "batches in flight".
    client = rig.client = GatedClient()
    await rig.spool.put(to_queue([payload(i) for i in range(150)]))  # two batches (100 + 50)
    rig.start(concurrency=2)
    await wait_for(lambda: client.waiting == 2)
    assert rig.value("ortto_gateway_delivery_batches_in_flight") == 2
    client.gate.set()
    await rig.settled()
    assert rig.value("ortto_gateway_delivery_batches_in_flight") == 0
