"""Limits: sliding-log stores (run against every store factory) and the limiter."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace

import pytest

from gateway.config import Rate, parse_rate
from gateway.limits import (
    Check,
    Decision,
    FallbackStore,
    Limiter,
    LimiterClosed,
    LimiterUnavailable,
    LimitResult,
    LimitStore,
    MemoryStore,
    Rule,
    rules_of,
)
from gateway.limits.limiter import PENDING_WINDOW
from tests import redis_support
from tests.limits_support import WrappedStore

DAY = 86400.0
HOUR = 3600.0
T0 = 1_700_000_000.0  # a realistic wall-clock time, exactly representable to the ms

StoreFactory = Callable[[pytest.FixtureRequest], Awaitable[LimitStore]]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_support.RedisServer]:
    """One redis-server for the store suite; each test gets its own key prefix."""
    with redis_support.running(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def memory_store(request: pytest.FixtureRequest) -> LimitStore:
    return MemoryStore()


async def redis_store(request: pytest.FixtureRequest) -> LimitStore:
    from gateway.limits.redis import redis_store_from_url

    server: redis_support.RedisServer = request.getfixturevalue("redis_server")
    # A generous timeout: these tests are about semantics, test_limits_redis about failures.
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return redis_store_from_url(server.url, prefix=prefix, timeout=5.0)


# Every store must pass the store tests below.
STORE_FACTORIES = [
    pytest.param(memory_store, id="memory"),
    pytest.param(redis_store, id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=STORE_FACTORIES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LimitStore]:
    factory: StoreFactory = request.param
    instance = await factory(request)
    yield instance
    await instance.close()


async def settled_key_count(store: LimitStore) -> int:
    """`key_count()` once a store that counts in the background has counted now."""
    refresh: Callable[[], Awaitable[int]] | None = getattr(store, "refresh_key_count", None)
    if refresh is not None:
        await refresh()
    return store.key_count()


def rule(key: str, rate: str) -> Rule:
    parsed = parse_rate(rate)
    return Rule(key, parsed.count, parsed.window)


# -- stores: semantics shared by every implementation


async def test_n_accepted_then_refused_with_exact_retry_after(store: LimitStore) -> None:
    r = rule("k", "3/10s")
    for t in (T0, T0 + 1, T0 + 2):
        assert await store.acquire([r], t) == Decision(True)
    assert await store.acquire([r], T0 + 3.5) == Decision(False, 6.5, (0,))
    assert await store.acquire([r], T0 + 9.75) == Decision(False, 0.25, (0,))


async def test_window_slides(store: LimitStore) -> None:
    r = rule("k", "3/2s")
    for t in (0.0, 0.5, 1.0):
        assert (await store.acquire([r], T0 + t)).allowed
    assert await store.acquire([r], T0 + 1.5) == Decision(False, 0.5, (0,))
    # Exactly 2 s after the first, it has left the window.
    assert (await store.acquire([r], T0 + 2.0)).allowed
    assert await store.acquire([r], T0 + 2.25) == Decision(False, 0.25, (0,))
    assert (await store.acquire([r], T0 + 2.5)).allowed
    assert (await store.acquire([r], T0 + 3.0)).allowed
    assert await store.acquire([r], T0 + 3.0) == Decision(False, 1.0, (0,))


async def test_refused_not_counted(store: LimitStore) -> None:
    r = rule("k", "1/10s")
    assert (await store.acquire([r], T0)).allowed
    for t in range(1, 10):
        assert await store.acquire([r], T0 + t) == Decision(False, 10.0 - t, (0,))
    assert (await store.acquire([r], T0 + 10)).allowed  # the nine refusals left no trace


async def test_a_refused_ip_rule_does_not_charge_the_person(store: LimitStore) -> None:
    person = rule("p", "2/1d")
    assert (await store.acquire([person, rule("ip-1", "1/1h")], T0)).allowed
    for _ in range(5):
        assert await store.acquire([person, rule("ip-1", "1/1h")], T0 + 1) == Decision(
            False, HOUR - 1, (1,)
        )
    assert (await store.acquire([person, rule("ip-2", "1/1h")], T0 + 2)).allowed
    assert await store.acquire([person, rule("ip-3", "1/1h")], T0 + 3) == Decision(
        False, DAY - 3, (0,)
    )


async def test_a_refused_person_rule_does_not_charge_the_ip(store: LimitStore) -> None:
    ip = rule("ip", "2/1h")
    assert (await store.acquire([rule("alice", "1/1d"), ip], T0)).allowed
    for _ in range(5):
        assert (await store.acquire([rule("alice", "1/1d"), ip], T0 + 1)).refused == (0,)
    assert (await store.acquire([rule("bob", "1/1d"), ip], T0 + 2)).allowed
    assert (await store.acquire([rule("carol", "1/1d"), ip], T0 + 3)).refused == (1,)


async def test_both_refuse_retry_after_is_the_max(store: LimitStore) -> None:
    person, ip = rule("p", "1/1d"), rule("i", "1/1h")
    assert (await store.acquire([person, ip], T0)).allowed
    assert await store.acquire([person, ip], T0 + 60) == Decision(False, DAY - 60, (0, 1))
    assert await store.acquire([ip, person], T0 + 60) == Decision(False, DAY - 60, (0, 1))


async def test_independent_keys(store: LimitStore) -> None:
    a, b = rule("a", "2/1h"), rule("b", "2/1h")
    assert (await store.acquire([a], T0)).allowed
    assert (await store.acquire([a], T0)).allowed
    assert not (await store.acquire([a], T0)).allowed
    assert (await store.acquire([b], T0)).allowed
    assert (await store.acquire([b], T0)).allowed


async def test_acquire_many_sees_earlier_charges_in_order(store: LimitStore) -> None:
    checks = [[rule("p", "10/1d"), rule("ip", "100/1h")] for _ in range(11)]
    decisions = await store.acquire_many(checks, T0)
    assert decisions == [Decision(True)] * 10 + [Decision(False, DAY, (0,))]
    assert await store.acquire_many([], T0) == []


async def test_acquire_many_mixed_batch(store: LimitStore) -> None:
    checks = [
        [rule("p1", "1/1d"), rule("ip", "3/1h")],
        [rule("p1", "1/1d"), rule("ip", "3/1h")],  # person refused, ip not charged
        [rule("p2", "1/1d"), rule("ip", "3/1h")],
        [rule("p3", "1/1d"), rule("ip", "3/1h")],
        [rule("p4", "1/1d"), rule("ip", "3/1h")],  # ip full
    ]
    decisions = await store.acquire_many(checks, T0)
    assert [d.refused for d in decisions] == [(), (0,), (), (), (1,)]


async def test_concurrent_acquires_on_one_key(store: LimitStore) -> None:
    r = rule("k", "10/1h")
    decisions = await asyncio.gather(*(store.acquire([r], T0) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10


async def test_forget_takes_back_a_charge(store: LimitStore) -> None:
    once, other = rule("d|act:cm:x|e:a@b.c|k1", "1/1d"), rule("d|act:cm:x|e:a@b.c|k2", "1/1d")
    assert (await store.acquire([once], T0)).allowed
    assert (await store.acquire([other], T0)).allowed
    assert not (await store.acquire([once], T0 + 1)).allowed
    await store.forget([once])
    assert (await store.acquire([once], T0 + 2)).allowed  # as if never charged
    assert not (await store.acquire([other], T0 + 2)).allowed  # the others stay
    await store.forget([rule("never-charged", "1/1d")])  # nothing to forget: no error


async def test_key_count(store: LimitStore) -> None:
    assert store.key_count() == 0
    await store.acquire([rule("p", "1/1d"), rule("ip", "5/1h")], T0)
    assert await settled_key_count(store) == 2
    await store.acquire([rule("p2", "1/1d"), rule("ip", "5/1h")], T0)
    assert await settled_key_count(store) == 3


async def test_duplicate_keys_in_one_check_are_refused(store: LimitStore) -> None:
    with pytest.raises(ValueError, match="distinct keys"):
        await store.acquire([rule("k", "1/1d"), rule("k", "5/1h")], T0)


async def test_long_windows(store: LimitStore) -> None:
    # Beyond 49.7 days the memory store's offsets no longer fit 32 bits.
    r = rule("k", "2/100d")
    assert (await store.acquire([r], T0)).allowed
    assert (await store.acquire([r], T0 + 60 * DAY + 0.25)).allowed
    assert await store.acquire([r], T0 + 61 * DAY) == Decision(False, 39 * DAY, (0,))
    assert (await store.acquire([r], T0 + 100 * DAY)).allowed
    assert await store.acquire([r], T0 + 100 * DAY) == Decision(False, 60 * DAY + 0.25, (0,))


async def test_clock_stepping_back_keeps_counting(store: LimitStore) -> None:
    r = rule("k", "3/10s")
    assert (await store.acquire([r], T0 + 5)).allowed
    assert (await store.acquire([r], T0)).allowed  # the wall clock stepped back 5 s
    assert (await store.acquire([r], T0 + 1)).allowed
    decision = await store.acquire([r], T0 + 2)
    assert not decision.allowed
    assert decision.retry_after >= 3.0


class Model:
    """The definition, brute force: every accepted time of every key, counted each time."""

    def __init__(self) -> None:
        self.accepted: dict[str, list[float]] = defaultdict(list)

    def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        refused: list[int] = []
        retry = 0.0
        for index, r in enumerate(rules):
            live = [t for t in self.accepted[r.key] if now - t < r.window]
            if len(live) >= r.count:
                refused.append(index)
                retry = max(retry, sorted(live)[-r.count] + r.window - now)
        if refused:
            return Decision(False, retry, tuple(refused))
        for r in rules:
            self.accepted[r.key].append(now)
        return Decision(True)


@pytest.mark.parametrize("seed", range(8))
async def test_matches_brute_force_model(store: LimitStore, seed: int) -> None:
    rng = random.Random(seed)
    model = Model()
    rates = {"p": parse_rate("3/2s"), "i": parse_rate("4/3s")}
    now_ms = 0
    for _ in range(200):
        now_ms += rng.choice([0, 1, 10, 100, 250, 500, 999, 1000, 1999, 2000, 3000])
        now = T0 + now_ms / 1000
        batch = [
            [
                Rule(f"p{rng.randrange(3)}", rates["p"].count, rates["p"].window),
                Rule(f"i{rng.randrange(3)}", rates["i"].count, rates["i"].window),
            ]
            for _ in range(rng.choice([1, 1, 1, 2, 4]))
        ]
        got = await store.acquire_many(batch, now)
        want = [model.acquire(rules, now) for rules in batch]
        for g, w in zip(got, want, strict=True):
            assert (g.allowed, g.refused) == (w.allowed, w.refused)
            assert g.retry_after == pytest.approx(w.retry_after, abs=1e-6)
    # The invariant itself: no period of a window's length holds more than `count`.
    for key, times in model.accepted.items():
        r = rates[key[0]]
        for i, t in enumerate(times):
            assert sum(t <= u < t + r.window for u in times[i:]) <= r.count


# -- the memory store: eviction and compaction


async def test_eviction_keeps_the_bound_and_reports() -> None:
    evictions: list[int] = []
    store = MemoryStore(max_keys=4, on_evict=evictions.append)  # generations of 2 keys
    for key in ("a", "b", "c"):
        assert (await store.acquire([rule(key, "1/1d")], T0)).allowed
    assert evictions == []  # "a" and "b" are now the old generation, "c" the young one
    assert not (await store.acquire([rule("a", "1/1d")], T0 + 1)).allowed  # "a" is used again
    await store.acquire([rule("d", "1/1d")], T0 + 2)  # drops the old generation: "b"
    assert evictions == [1]
    assert store.key_count() == 3
    assert not (await store.acquire([rule("a", "1/1d")], T0 + 3)).allowed  # kept: recently used
    assert (await store.acquire([rule("b", "1/1d")], T0 + 3)).allowed  # forgotten: budget reset
    decisions = await store.acquire_many([[rule(k, "1/1d")] for k in "efgh"], T0 + 4)
    assert all(d.allowed for d in decisions)
    assert store.key_count() <= 4
    assert sum(evictions) >= 3


async def test_expired_keys_are_dropped_when_touched() -> None:
    store = MemoryStore()
    person, ip = rule("p", "1/1h"), rule("ip", "1/1d")
    assert (await store.acquire([person, ip], T0)).allowed
    assert store.key_count() == 2
    assert (await store.acquire([person, ip], T0 + HOUR)).refused == (1,)
    assert store.key_count() == 1  # "p" expired and, refused by "ip", was not charged


def test_memory_store_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryStore(max_keys=0)


def test_rule_rejects_empty_limits() -> None:
    with pytest.raises(ValueError):
        Rule("k", 0, 1.0)
    with pytest.raises(ValueError):
        Rule("k", 1, 0.0)


# -- the fallback store (a fake primary here; test_limits_redis runs it against Redis)


class FlakyStore(WrappedStore):
    """A primary that fails on demand, or blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.calls = 0
        self.closed = False
        self.gate: asyncio.Event | None = None

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise LimiterUnavailable("Redis is down")
        return await super().acquire_many(checks, now)

    async def close(self) -> None:
        self.closed = True


class Ticks:
    """A settable monotonic clock for the circuit breaker."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fallback(
    mode: str, primary: FlakyStore | None = None, local: MemoryStore | None = None
) -> tuple[FallbackStore, FlakyStore, MemoryStore, list[None], Ticks]:
    errors: list[None] = []
    ticks = Ticks()
    primary = primary or FlakyStore()
    local = local or MemoryStore()
    store = FallbackStore(
        primary,
        local,
        mode,  # type: ignore[arg-type]
        on_error=lambda: errors.append(None),
        retry_interval=1.0,
        clock=ticks,
    )
    return store, primary, local, errors, ticks


async def test_fallback_passes_through_while_the_primary_answers() -> None:
    store, primary, local, errors, _ = fallback("closed")
    r = rule("k", "2/1h")
    assert [(await store.acquire([r], T0)).allowed for _ in range(3)] == [True, True, False]
    assert (primary.calls, local.key_count(), errors, store.degraded) == (3, 0, [], False)
    assert store.key_count() == primary.key_count() == 1


async def test_fallback_local_answers_and_charges_in_process() -> None:
    store, primary, local, errors, _ = fallback("local")
    r = rule("k", "2/1h")
    assert (await store.acquire([r], T0)).allowed  # charged in the primary
    primary.failing = True
    decisions = await store.acquire_many([[r], [r], [r]], T0 + 1)
    assert decisions == [Decision(True), Decision(True), Decision(False, HOUR, (0,))]
    assert (errors, store.degraded, local.key_count()) == ([None], True, 1)


async def test_fallback_open_allows_everything() -> None:
    store, primary, _, errors, _ = fallback("open")
    primary.failing = True
    r = rule("k", "1/1h")
    assert await store.acquire_many([[r]] * 5, T0) == [Decision(True)] * 5
    assert errors == [None]


async def test_fallback_closed_raises() -> None:
    store, primary, _, errors, _ = fallback("closed")
    primary.failing = True
    with pytest.raises(LimiterClosed) as caught:
        await store.acquire([rule("k", "1/1h")], T0)
    assert isinstance(caught.value, LimiterUnavailable)  # the app maps both to 503
    assert isinstance(caught.value.__cause__, LimiterUnavailable)
    with pytest.raises(LimiterClosed):  # while the circuit is open: no cause, still refused
        await store.acquire([rule("k", "1/1h")], T0)
    assert errors == [None]


async def test_fallback_skips_a_failed_primary_then_probes_it() -> None:
    store, primary, local, errors, ticks = fallback("local")
    r = rule("k", "100/1h")
    primary.failing = True
    await store.acquire([r], T0)
    assert (primary.calls, errors) == (1, [None])
    ticks.now += 0.999
    for _ in range(5):
        await store.acquire([r], T0)
    assert (primary.calls, errors) == (1, [None])  # not hammered within retry_interval
    ticks.now += 0.001
    await store.acquire([r], T0)
    assert (primary.calls, errors) == (2, [None, None])  # probed, failed again
    primary.failing = False
    ticks.now += 1.0
    await store.acquire([r], T0)
    assert (primary.calls, store.degraded) == (3, False)  # shared limiting resumed
    await store.acquire([r], T0)
    assert (primary.calls, local.key_count(), len(errors)) == (4, 1, 2)


async def test_fallback_probes_with_one_call_at_a_time() -> None:
    store, primary, _, errors, ticks = fallback("open")
    primary.failing = True
    await store.acquire([rule("k", "1/1h")], T0)
    ticks.now += 1.0
    primary.gate = asyncio.Event()
    probe = asyncio.create_task(store.acquire([rule("k", "1/1h")], T0))
    while primary.calls < 2:  # the probe is now waiting inside the primary
        await asyncio.sleep(0)
    assert (await store.acquire([rule("k", "1/1h")], T0)).allowed  # answered by the mode
    assert primary.calls == 2
    primary.gate.set()
    assert (await probe).allowed
    assert errors == [None, None]


async def test_fallback_lets_bad_checks_through_uncounted() -> None:
    store, _, _, errors, _ = fallback("open")
    with pytest.raises(ValueError, match="distinct keys"):
        await store.acquire([rule("k", "1/1d"), rule("k", "5/1h")], T0)
    assert (errors, store.degraded) == ([], False)


async def test_fallback_closes_both_and_checks_its_mode() -> None:
    store, primary, _, _, _ = fallback("local")
    await store.close()
    assert primary.closed
    with pytest.raises(ValueError, match="mode"):
        FallbackStore(MemoryStore(), MemoryStore(), "fail")  # type: ignore[arg-type]


# -- the limiter


PERSON = parse_rate("10/1d")
IP = parse_rate("100/1h")


def check(
    person: str = "chris@example.com",
    *,
    activity: str = "act:cm:logged-in",
    ip: str = "203.0.113.7",
    person_rate: Rate = PERSON,
    ip_rate: Rate = IP,
) -> Check:
    return Check(activity, person, ip, person_rate, ip_rate)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingStore(WrappedStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[list[str]]] = []

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        self.calls.append([[r.key for r in rules] for rules in checks])
        return await super().acquire_many(checks, now)


def test_rule_keys() -> None:
    person, ip = rules_of(check("a|b@example.com", activity="act:cm:x", ip="2001:db8::1"))
    assert (person.key, person.count, person.window) == ("p|act:cm:x|a|b@example.com", 10, DAY)
    assert (ip.key, ip.count, ip.window) == ("i|act:cm:x|2001:db8::1", 100, HOUR)
    with pytest.raises(ValueError):
        check(activity="act:cm:a|b")


async def test_one_store_call_per_request() -> None:
    store = RecordingStore()
    limiter = Limiter(store, clock=Clock())
    results = await limiter.check_many([check("a@x.io"), check("b@x.io")])
    assert results == [LimitResult("accepted")] * 2
    assert store.calls == [
        [
            ["p|act:cm:logged-in|a@x.io", "i|act:cm:logged-in|203.0.113.7"],
            ["p|act:cm:logged-in|b@x.io", "i|act:cm:logged-in|203.0.113.7"],
        ]
    ]
    assert await limiter.check_many([]) == []
    assert len(store.calls) == 1


async def test_a_repeated_browser_key_is_a_duplicate_and_charges_nothing() -> None:
    store = RecordingStore()
    limiter = Limiter(store, clock=Clock())
    first = replace(check("a@x.io"), idempotency_key="k-1")
    assert await limiter.check_many([first]) == [LimitResult("accepted")]
    keys = store.calls[-1][0]
    assert keys[2].startswith("d|act:cm:logged-in|a@x.io|") and "k-1" not in keys[2]
    assert keys[3].startswith("q|act:cm:logged-in|a@x.io|")
    # Being stored: a repeat is asked to try again (not yet a duplicate: it could fail).
    assert await limiter.check_many([first]) == [LimitResult("in_flight", 1.0)]
    await limiter.confirm([first])
    # Stored: the repeat, even twice in one request, is a duplicate, charged nothing.
    assert await limiter.check_many([first, first]) == [LimitResult("duplicate")] * 2
    assert await limiter.check_many([check("a@x.io")] * 9) == [LimitResult("accepted")] * 9
    assert (await limiter.check_many([check("a@x.io")]))[0].verdict == "rate_limited_person"
    # A repeat is told as such even when the limits are spent by now.
    assert await limiter.check_many([first]) == [LimitResult("duplicate")]
    # The same key for another person or another activity is another activity.
    others = [
        replace(check("b@x.io"), idempotency_key="k-1"),
        replace(check("a@x.io", activity="act:cm:signup"), idempotency_key="k-1"),
    ]
    assert await limiter.check_many(others) == [LimitResult("accepted")] * 2


async def test_forget_makes_a_key_new_again_without_refunding_limits() -> None:
    limiter = Limiter(MemoryStore(), clock=Clock())
    keyed = replace(check("a@x.io", person_rate=parse_rate("2/1d")), idempotency_key="k")
    assert (await limiter.check_many([keyed]))[0].accepted
    await limiter.forget([keyed, check("b@x.io")])  # unkeyed checks have nothing to forget
    assert (await limiter.check_many([keyed]))[0].accepted  # a retry is new
    await limiter.confirm([keyed])
    assert (await limiter.check_many([keyed]))[0].verdict == "duplicate"
    unkeyed = replace(keyed, idempotency_key=None)  # both charges stand: 2 of 2 spent
    assert (await limiter.check_many([unkeyed]))[0].verdict == "rate_limited_person"


async def test_a_pending_key_is_new_again_after_its_window() -> None:
    """Neither confirmed nor forgotten (the store failed meanwhile): after the pending
    window a repeat is taken as new, so nothing accepted stays unstored for good."""
    clock = Clock()
    limiter = Limiter(MemoryStore(), clock=clock)
    keyed = replace(check("a@x.io"), idempotency_key="k")
    assert (await limiter.check_many([keyed]))[0].accepted
    clock.now += PENDING_WINDOW - 1
    assert (await limiter.check_many([keyed]))[0].verdict == "in_flight"
    clock.now += 2
    assert (await limiter.check_many([keyed]))[0].accepted


async def test_a_check_only_rule_refuses_and_is_never_charged(store: LimitStore) -> None:
    seen = Rule("seen", 1, 60.0, charge=False)
    charged = rule("charged", "5/1m")
    for t in (T0, T0 + 1, T0 + 2):  # never charged: it never refuses
        assert (await store.acquire([charged, seen], t)).allowed
    assert (await store.acquire([Rule("seen", 1, 60.0)], T0 + 3)).allowed  # now charged
    decision = await store.acquire([charged, seen], T0 + 4)
    assert (decision.allowed, decision.refused) == (False, (1,))
    assert (await store.acquire([charged], T0 + 5)).allowed  # 4 of 5: the refusal took none


async def test_eleventh_of_a_person_refused_while_another_activity_passes() -> None:
    clock = Clock()
    limiter = Limiter(MemoryStore(), clock=clock)
    for _ in range(10):
        assert (await limiter.check_many([check()]))[0].accepted
        clock.now += 60
    assert await limiter.check_many([check(), check(activity="act:cm:signup")]) == [
        LimitResult("rate_limited_person", DAY - 600),
        LimitResult("accepted"),
    ]


async def test_hundred_and_first_from_one_ip_refused() -> None:
    clock = Clock()
    limiter = Limiter(MemoryStore(), clock=clock)
    results = await limiter.check_many([check(f"user{i}@example.com") for i in range(100)])
    assert all(r.accepted for r in results)
    clock.now += 90
    assert await limiter.check_many([check("new@example.com")]) == [
        LimitResult("rate_limited_ip", HOUR - 90)
    ]
    assert (await limiter.check_many([check("new@example.com", ip="198.51.100.1")]))[0].accepted


async def test_verdict_when_both_refuse_names_the_person() -> None:
    clock = Clock()
    limiter = Limiter(MemoryStore(), clock=clock)
    one_a_minute, one_an_hour = parse_rate("1/1m"), parse_rate("1/1h")
    c = check(person_rate=one_a_minute, ip_rate=one_an_hour)
    assert (await limiter.check_many([c]))[0].accepted
    clock.now += 30
    # Both refuse; the IP's wait is the longer one and is the one to report.
    assert await limiter.check_many([c]) == [LimitResult("rate_limited_person", HOUR - 30)]
    clock.now += 60
    assert await limiter.check_many([c]) == [LimitResult("rate_limited_ip", HOUR - 90)]


async def test_batch_of_eleven_from_one_person() -> None:
    limiter = Limiter(MemoryStore(), clock=Clock())
    results = await limiter.check_many([check()] * 11)
    assert results == [LimitResult("accepted")] * 10 + [LimitResult("rate_limited_person", DAY)]


class LateStore(WrappedStore):
    """Answers as a shared call run a little after this caller's time would."""

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        decisions = await super().acquire_many(checks, now)
        return [
            d if d.allowed else Decision(False, d.retry_after + 0.004, d.refused) for d in decisions
        ]


async def test_retry_after_never_exceeds_the_refusing_window() -> None:
    limiter = Limiter(LateStore(), clock=Clock())
    results = await limiter.check_many([check()] * 11)
    assert results[-1] == LimitResult("rate_limited_person", DAY)  # not DAY + 0.004
    ip_only = [check(f"u{i}@example.com") for i in range(101)]
    limiter = Limiter(LateStore(), clock=Clock())
    assert (await limiter.check_many(ip_only))[-1] == LimitResult("rate_limited_ip", HOUR)
