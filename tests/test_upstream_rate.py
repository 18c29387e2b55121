"""The upstream pacer: one GCRA and one pause per Ortto account in real Redis, time passed in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.limits.redis import redis_client_from_url
from gateway.metrics import Metrics
from gateway.upstream_rate import (
    RETRY_INTERVAL,
    LocalPacer,
    RedisPacer,
    account_keys,
    upstream_pacer,
)
from tests import redis_support
from tests.conftest import API_KEY, base_settings

pytestmark = pytest.mark.redis

KEYS = account_keys("ortto-gw", API_KEY, "https://api.ap3api.com")
START = 1_700_000_000.0


class FakeTime:
    """Seconds for the script's `now`, and the monotonic clock of the Redis retry; a sleep
    moves both on at once."""

    def __init__(self) -> None:
        self.now = START
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class CountingPacer(LocalPacer):
    """The local share, counting the requests it paced."""

    def __init__(self) -> None:
        super().__init__(1000.0)
        self.acquired = 0

    async def acquire(self) -> None:
        self.acquired += 1
        await super().acquire()


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process_metrics=False)


@pytest.fixture
async def make_pacer() -> AsyncIterator[list[RedisPacer]]:
    """The pacers a test made (`new_pacer`), closed at teardown."""
    made: list[RedisPacer] = []
    yield made
    for pacer in made:
        await pacer.close()


def new_pacer(
    made: list[RedisPacer],
    server: redis_support.RedisServer,
    rate: float,
    *,
    clock: FakeTime | None,
    metrics: Metrics | None = None,
    fallback: LocalPacer | None = None,
) -> RedisPacer:
    # Generous timeouts: a busy machine's Redis call must not fall back by surprise.
    client, also_close = redis_client_from_url(server.url, socket_timeout=5.0)
    pacer = RedisPacer(
        client,
        KEYS,
        rate,
        fallback or LocalPacer(rate),
        timeout=5.0,
        on_fallback=metrics.upstream_rate_fallback.inc if metrics else lambda: None,
        now=clock,
        sleep=clock.sleep if clock else asyncio.sleep,
        monotonic=clock or (lambda: 0.0),
        also_close=also_close,
    )
    made.append(pacer)
    return pacer


async def grants(pacers: list[RedisPacer], clock: FakeTime, seconds: float) -> list[float]:
    """Drive the pacers in turn for `seconds` of fake time; when each request was granted."""
    granted: list[float] = []
    end = clock.now + seconds
    while clock.now < end:
        waits = []
        for pacer in pacers:
            wait = await pacer.try_acquire()
            if wait == 0:
                granted.append(clock.now)
            waits.append(wait)
        if all(w > 0 for w in waits):
            clock.now += min(waits)
    return granted


def per_second(granted: list[float]) -> list[int]:
    seconds = [int(t - START) for t in granted]
    return [seconds.count(s) for s in range(max(seconds) + 1)]


@pytest.mark.parametrize("rate", [1.0, 10.0, 19.0, 50.0])
async def test_rate_per_second_exactly(
    make_pacer: list[RedisPacer],
    redis_server: redis_support.RedisServer,
    clock: FakeTime,
    rate: float,
) -> None:
    pacer = new_pacer(make_pacer, redis_server, rate, clock=clock)
    granted = await grants([pacer], clock, 5.0)
    counts = per_second(granted)
    # The first second has the one-request burst (the tolerance); then exactly the rate.
    assert counts[0] == int(rate) + 1
    assert counts[1:] == [int(rate)] * 4
    # Never more than W * rate + 1 in any window of W seconds (here: any one second).
    assert all(sum(1 for t in granted if start <= t < start + 1.0) <= rate + 1 for start in granted)


async def test_two_pacers_share_one_budget(
    make_pacer: list[RedisPacer], redis_server: redis_support.RedisServer, clock: FakeTime
) -> None:
    a = new_pacer(make_pacer, redis_server, 10.0, clock=clock)
    b = new_pacer(make_pacer, redis_server, 10.0, clock=clock)
    granted = await grants([a, b], clock, 4.0)
    assert per_second(granted)[1:] == [10, 10, 10]


async def test_another_account_has_its_own_budget(
    redis_server: redis_support.RedisServer, clock: FakeTime
) -> None:
    other = account_keys("ortto-gw", API_KEY, "https://api.eu.ortto.app")
    assert other != KEYS and account_keys("ortto-gw", "another-key", KEYS[0]) != KEYS
    assert all(API_KEY not in key and key.startswith("ortto-gw:upstream:{") for key in KEYS)
    made: list[RedisPacer] = []
    try:
        a = new_pacer(made, redis_server, 1.0, clock=clock)
        client, _ = redis_client_from_url(redis_server.url, socket_timeout=5.0)
        b = RedisPacer(client, other, 1.0, LocalPacer(1.0), now=clock)
        made.append(b)
        assert await a.try_acquire() == 0
        assert await b.try_acquire() == 0
        assert await a.try_acquire() > 0
    finally:
        for pacer in made:
            await pacer.close()


async def test_redis_time_when_no_time_is_passed(
    make_pacer: list[RedisPacer], redis_server: redis_support.RedisServer
) -> None:
    # One request every 10 s: the second must wait about 5 s (an interval less the
    # tolerance), less the time between the calls, which a busy machine cannot stretch
    # to 5 s.
    pacer = new_pacer(make_pacer, redis_server, 0.1, clock=None)
    assert await pacer.try_acquire() == 0
    wait = await pacer.try_acquire()
    assert 0 < wait <= 5.0


async def test_a_pause_from_one_host_stops_the_others(
    make_pacer: list[RedisPacer], redis_server: redis_support.RedisServer, clock: FakeTime
) -> None:
    a = new_pacer(make_pacer, redis_server, 100.0, clock=clock)
    b = new_pacer(make_pacer, redis_server, 100.0, clock=clock)
    a.pause("rate_limit", 30.0)
    await a.close()  # waits for the pause to be written
    make_pacer.remove(a)
    # Redis expires the pause on its own clock: the remaining time is nearly all of it.
    assert 20.0 < await b.try_acquire() <= 30.0
    # A shorter pause never shortens one in force.
    await b.share_pause("auth", 1000)
    assert 29.0 < await b.try_acquire() <= 30.0
    # acquire() waits the pause out (the fake sleep returns at once; Redis still says
    # paused, so the test lifts the pause after the first wait).
    waited = asyncio.create_task(b.acquire())
    await until(lambda: bool(clock.slept))
    client, _ = redis_client_from_url(redis_server.url, socket_timeout=5.0)
    await client.delete(KEYS[1])
    await client.aclose()
    await asyncio.wait_for(waited, 10)
    assert 29.0 < clock.slept[0] <= 30.0


async def until(predicate: Callable[[], bool]) -> None:
    """Let the event loop run until `predicate()` holds (bounded by a generous deadline)."""
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


def fallbacks(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("ortto_gateway_upstream_rate_fallback_total")
    return value or 0.0


async def test_redis_down_falls_back_to_the_local_share_and_counts(
    make_pacer: list[RedisPacer],
    redis_server: redis_support.RedisServer,
    clock: FakeTime,
    metrics: Metrics,
) -> None:
    local = CountingPacer()
    pacer = new_pacer(make_pacer, redis_server, 1.0, clock=clock, metrics=metrics, fallback=local)
    await pacer.acquire()
    assert (local.acquired, fallbacks(metrics)) == (0, 0)
    redis_server.stop()
    await pacer.acquire()  # the shared rate would make it wait a second: the local one does not
    assert (local.acquired, fallbacks(metrics)) == (1, 1)
    pacer.pause("rate_limit", 5.0)  # within the retry interval: not even tried
    assert fallbacks(metrics) == 2
    await pacer.acquire()
    assert (local.acquired, fallbacks(metrics)) == (2, 3)
    # Redis back, and the retry interval over: shared again.
    redis_server.start()
    clock.now += RETRY_INTERVAL
    assert await pacer.try_acquire() == 0
    await pacer.acquire()  # a fresh Redis lost the TAT: one wait of the shared rate
    assert (local.acquired, fallbacks(metrics)) == (2, 3)
    assert clock.slept and 0 < clock.slept[-1] <= 1.0


async def test_a_pause_not_written_is_counted(
    make_pacer: list[RedisPacer],
    redis_server: redis_support.RedisServer,
    clock: FakeTime,
    metrics: Metrics,
) -> None:
    pacer = new_pacer(make_pacer, redis_server, 1.0, clock=clock, metrics=metrics)
    redis_server.stop()
    await pacer.share_pause("auth", 30_000)
    assert fallbacks(metrics) == 1
    # Redis is back: the first call that reaches it shares what is left of the pause.
    redis_server.start()
    clock.now += RETRY_INTERVAL
    await pacer.acquire()
    await pacer.close()  # waits for the pause to be written
    make_pacer.remove(pacer)
    other = new_pacer(make_pacer, redis_server, 1.0, clock=clock)
    assert 20.0 < await other.try_acquire() <= 30.0 - RETRY_INTERVAL


async def test_settings_choose_the_pacer(tmp_path: Path, metrics: Metrics) -> None:
    settings = base_settings(tmp_path, "http://127.0.0.1:9", upstream_rate=20.0)
    local = upstream_pacer(settings, metrics)
    assert isinstance(local, LocalPacer) and local.rate == 20.0
    shared = upstream_pacer(
        base_settings(
            tmp_path,
            "http://127.0.0.1:9",
            upstream_rate=20.0,
            upstream_rate_fallback=5.0,
            redis_url="redis://127.0.0.1:9/0",
        ),
        metrics,
    )
    try:
        assert isinstance(shared, RedisPacer) and shared.rate == 20.0
        assert settings.upstream_rate_share == 20.0
    finally:
        await shared.close()
