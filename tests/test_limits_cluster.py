"""The Redis store on a real three-node Redis Cluster: spread keys, and what spreading trades.

With spread keys (the default on a cluster) a check runs one step per slot, person then
IP, refunding the person when the IP refuses (gateway/limits/redis.py, Cluster). These
tests hold it to the single-script semantics of test_limits.py and test_limits_redis.py
and measure the one thing it gives up: a concurrent request can be refused by a person
count that a refund is about to lower.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

import pytest
from redis.asyncio import RedisCluster

from gateway.config import Rate, parse_rate
from gateway.limits import (
    Check,
    Decision,
    Limiter,
    LimitResult,
    LimitStore,
    MemoryStore,
    Rule,
    rules_of,
)
from gateway.limits.redis import RedisStore, redis_store_from_url
from tests.redis_cluster_support import Cluster, running_cluster

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
DAY = 86400.0
HOUR = 3600.0
ACTIVITY = "act:cm:logged-in"
PERSON = parse_rate("10/1d")
IP = parse_rate("100/1h")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One three-node cluster for the module; each test uses its own key prefix."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
async def store(cluster: Cluster) -> AsyncIterator[RedisStore]:
    """A store with spread keys (the cluster default)."""
    instance = redis_store_from_url(cluster.url, prefix=fresh_prefix(), timeout=5.0)
    assert instance.spread
    yield instance
    await instance.close()


@pytest.fixture
async def inspector(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    """A plain cluster client to look at what a store wrote."""
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    yield client
    await client.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def fresh_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def check(
    person: str = "chris@example.com",
    ip: str = "203.0.113.7",
    activity: str = ACTIVITY,
    person_rate: Rate = PERSON,
    ip_rate: Rate = IP,
    key: str | None = None,
) -> Check:
    return Check(activity, person, ip, person_rate, ip_rate, key)


async def keys_of(inspector: RedisCluster, store: RedisStore) -> list[str]:
    """Every key of the store, from every node."""
    found = [k async for k in inspector.scan_iter(match=f"{store.prefix}:*")]
    return sorted(k.decode() if isinstance(k, bytes) else k for k in found)


async def slot_of(inspector: RedisCluster, key: str) -> int:
    """`CLUSTER KEYSLOT`, as the cluster computes it."""
    return int(await inspector.execute_command("CLUSTER KEYSLOT", key))


def node_of(inspector: RedisCluster, key: str) -> str:
    """The name of the node that holds the key's slot."""
    node = inspector.get_node_from_key(key)
    assert node is not None
    return node.name


# -- the limits


async def test_person_limit(store: RedisStore) -> None:
    clock = Clock()
    limiter = Limiter(store, clock=clock)
    for _ in range(10):
        assert (await limiter.check_many([check()]))[0].accepted
        clock.now += 60
    assert await limiter.check_many([check(), check(activity="act:cm:signup")]) == [
        LimitResult("rate_limited_person", DAY - 600),
        LimitResult("accepted"),
    ]


async def test_ip_limit(store: RedisStore) -> None:
    clock = Clock()
    limiter = Limiter(store, clock=clock)
    results = await limiter.check_many([check(f"user{i}@example.com") for i in range(100)])
    assert all(r.accepted for r in results)
    clock.now += 90
    assert await limiter.check_many([check("new@example.com")]) == [
        LimitResult("rate_limited_ip", HOUR - 90)
    ]
    assert (await limiter.check_many([check("new@example.com", ip="198.51.100.1")]))[0].accepted


async def test_a_batch_of_eleven_from_one_person(store: RedisStore) -> None:
    limiter = Limiter(store, clock=Clock())
    results = await limiter.check_many([check()] * 11)
    assert results == [LimitResult("accepted")] * 10 + [LimitResult("rate_limited_person", DAY)]


async def test_a_refused_ip_leaves_the_person_as_it_was(
    store: RedisStore, inspector: RedisCluster
) -> None:
    one_an_hour, two_a_day = parse_rate("1/1h"), parse_rate("2/1d")
    limiter = Limiter(store, clock=Clock())
    first = check("a@x.io", ip="198.51.100.1", person_rate=two_a_day, ip_rate=one_an_hour)
    assert (await limiter.check_many([first]))[0].accepted  # the IP is spent
    b = replace(first, person_key="b@x.io")
    assert (await limiter.check_many([b]))[0].verdict == "rate_limited_ip"
    b_key = store.redis_key(rules_of(b)[0].key)
    assert not await inspector.exists(b_key)  # charged in its slot, then refunded
    a_key = store.redis_key(rules_of(first)[0].key)
    log = await inspector.get(a_key)
    assert (await limiter.check_many([first]))[0].verdict == "rate_limited_ip"
    assert await inspector.get(a_key) == log  # the refund took out exactly its own time
    assert 0 < await inspector.pttl(a_key) <= DAY * 1000
    # b was never charged: two from other IPs pass, the third is b's own limit.
    others = [replace(b, ip=f"198.51.100.{i}") for i in (2, 3, 4)]
    assert [r.verdict for r in await limiter.check_many(others)] == [
        "accepted",
        "accepted",
        "rate_limited_person",
    ]


async def test_a_refused_person_does_not_charge_the_ip(
    store: RedisStore, inspector: RedisCluster
) -> None:
    one_a_day = parse_rate("1/1d")
    limiter = Limiter(store, clock=Clock())
    assert (await limiter.check_many([check(person_rate=one_a_day)]))[0].accepted
    other_ip = check(person_rate=one_a_day, ip="198.51.100.1")
    assert (await limiter.check_many([other_ip]))[0].verdict == "rate_limited_person"
    assert not await inspector.exists(store.redis_key(rules_of(other_ip)[1].key))


async def test_when_both_refuse_the_person_is_named_with_the_longer_wait(
    store: RedisStore,
) -> None:
    clock = Clock()
    limiter = Limiter(store, clock=clock)
    c = check(person_rate=parse_rate("1/1m"), ip_rate=parse_rate("1/1h"))
    assert (await limiter.check_many([c]))[0].accepted
    clock.now += 30
    # The person step refuses; the IP step still checks (never charges) for its wait.
    assert await limiter.check_many([c]) == [LimitResult("rate_limited_person", HOUR - 30)]
    clock.now += 60
    assert await limiter.check_many([c]) == [LimitResult("rate_limited_ip", HOUR - 90)]
    rules = rules_of(c)
    assert await store.acquire(rules, clock.now) == Decision(False, HOUR - 90, (1,))


async def test_browser_keys(store: RedisStore, inspector: RedisCluster) -> None:
    clock = Clock()
    limiter = Limiter(store, clock=clock)
    keyed = check("a@x.io", key="k-1")
    person, _, stored, pending = rules_of(keyed)
    # A person's browser keys live in the person's slot: duplicates are decided there.
    slots = {await slot_of(inspector, store.redis_key(r.key)) for r in (person, stored, pending)}
    assert len(slots) == 1
    assert await limiter.check_many([keyed]) == [LimitResult("accepted")]
    assert await limiter.check_many([keyed]) == [LimitResult("in_flight", 1.0)]
    await limiter.confirm([keyed])
    assert await limiter.check_many([keyed, keyed]) == [LimitResult("duplicate")] * 2
    assert await limiter.check_many([check("a@x.io")] * 9) == [LimitResult("accepted")] * 9
    assert (await limiter.check_many([check("a@x.io")]))[0].verdict == "rate_limited_person"
    assert await limiter.check_many([keyed]) == [LimitResult("duplicate")]
    await limiter.forget([keyed])
    assert await limiter.check_many([keyed]) == [LimitResult("duplicate")]  # stored stays


async def test_a_browser_key_refused_by_the_ip_is_new_again(store: RedisStore) -> None:
    limiter = Limiter(store, clock=Clock())
    spent = check("a@x.io", ip_rate=parse_rate("1/1h"))
    assert (await limiter.check_many([spent]))[0].accepted
    keyed = replace(spent, person_key="b@x.io", idempotency_key="k-2")
    assert (await limiter.check_many([keyed]))[0].verdict == "rate_limited_ip"
    # Its pending key was refunded with the person: from another IP it is new, not in flight.
    assert (await limiter.check_many([replace(keyed, ip="198.51.100.1")]))[0].accepted


async def test_check_only_rules_refuse_and_are_never_charged(store: RedisStore) -> None:
    # Negative windows in the script: a rule only checked, in a slot of its own.
    seen = Rule(f"p|{ACTIVITY}|seen@x.io", 1, 60.0, charge=False)
    charged = Rule(f"i|{ACTIVITY}|203.0.113.7", 5, 60.0)
    for t in (T0, T0 + 1, T0 + 2):
        assert (await store.acquire([seen, charged], t)).allowed
    assert (await store.acquire([replace(seen, charge=True)], T0 + 3)).allowed
    assert await store.acquire([seen, charged], T0 + 4) == Decision(False, 59.0, (0,))
    assert (await store.acquire([charged], T0 + 5)).allowed  # 4 of 5: the refusal took none
    assert (await store.acquire([charged], T0 + 6)).allowed
    assert await store.acquire([charged], T0 + 7) == Decision(False, 53.0, (0,))


async def test_sequential_checks_match_the_memory_store(store: RedisStore) -> None:
    """One request at a time (batches without a person twice), the spread store's verdicts
    and waits are exactly the single-script ones."""
    rng = random.Random(20)
    clock = Clock()
    spread, memory = Limiter(store, clock=clock), Limiter(MemoryStore(), clock=clock)
    short, long = parse_rate("3/1m"), parse_rate("5/10m")
    rates = {ACTIVITY: (short, long), "act:cm:signup": (long, short)}  # (person, IP)
    verdicts: Counter[str] = Counter()
    for _ in range(150):
        ip = f"198.51.100.{rng.randrange(4)}"
        people = rng.sample([f"u{i}@x.io" for i in range(8)], rng.randint(1, 3))
        activities = [rng.choice(list(rates)) for _ in people]
        batch = [check(p, ip, a, *rates[a]) for p, a in zip(people, activities, strict=True)]
        expected = await memory.check_many(batch)
        assert await spread.check_many(batch) == expected
        verdicts.update(r.verdict for r in expected)
        clock.now += rng.uniform(0, 20)
    assert set(verdicts) == {"accepted", "rate_limited_person", "rate_limited_ip"}


# -- keys


async def test_keys_of_one_activity_spread_over_slots_and_nodes(
    cluster: Cluster, store: RedisStore, inspector: RedisCluster
) -> None:
    checks = [check(f"user{i}@example.com", ip=f"198.51.100.{i % 20}") for i in range(60)]
    await Limiter(store, clock=Clock()).check_many(checks)
    keys = await keys_of(inspector, store)
    assert len(keys) == 80  # 60 people, 20 IPs
    slots = {await slot_of(inspector, k) for k in keys}
    nodes = {node_of(inspector, k) for k in keys}
    print(f"\n80 keys of one activity: {len(slots)} slots on {len(nodes)} of 3 nodes")
    assert len(slots) > 40 and len(nodes) == 3
    assert all(k.startswith(f"{store.prefix}:{{{ACTIVITY}|") for k in keys)
    assert "user" not in " ".join(keys) and "198.51" not in " ".join(keys)

    # ?keys=per-activity: today's single-slot layout, one atomic script per check.
    url = cluster.url + "?keys=per-activity"
    single = redis_store_from_url(url, prefix=fresh_prefix(), timeout=5.0)
    try:
        assert not single.spread
        await Limiter(single, clock=Clock()).check_many(checks)
        keys = await keys_of(inspector, single)
        assert len(keys) == 80
        assert {await slot_of(inspector, k) for k in keys} == {
            await slot_of(inspector, f"{{{ACTIVITY}}}")
        }
    finally:
        await single.close()


async def test_key_count_and_forget_across_nodes(store: RedisStore) -> None:
    await store.acquire_many([rules_of(check(f"u{i}@x.io")) for i in range(30)], T0)
    assert await store.refresh_key_count() == 31
    people = [rules_of(check(f"u{i}@x.io"))[0] for i in range(10)]
    await store.forget(people)
    assert await store.refresh_key_count() == 21


# -- concurrency


async def run_concurrently(
    stores: Sequence[LimitStore], checks: Sequence[Check]
) -> list[LimitResult]:
    limiters = [Limiter(s, clock=lambda: T0) for s in stores]
    results = await asyncio.gather(
        *(limiters[i % len(limiters)].check_many([c]) for i, c in enumerate(checks))
    )
    return [r[0] for r in results]


async def test_concurrent_charges_of_one_person_and_ip_never_exceed_either(
    cluster: Cluster,
) -> None:
    prefix = fresh_prefix()
    stores = [redis_store_from_url(cluster.url, prefix=prefix, timeout=10.0) for _ in range(4)]
    try:
        one = check(person_rate=parse_rate("10/1d"), ip_rate=parse_rate("25/1h"))
        results = await run_concurrently(stores, [one] * 200)
        assert sum(r.accepted for r in results) == 10
        # The IP: 25 an hour, 40 people each trying 3 times at once.
        many = [replace(one, person_key=f"u{i % 40}@x.io") for i in range(120)]
        results = await run_concurrently(stores, many)
        accepted = Counter(c.person_key for c, r in zip(many, results, strict=True) if r.accepted)
        assert sum(accepted.values()) == 15  # the 10 above spent the rest
        assert max(accepted.values()) <= 10
    finally:
        for s in stores:
            await s.close()


def wrong_refusals(checks: Sequence[Check], results: Sequence[LimitResult]) -> tuple[int, int, int]:
    """(refusals, person refusals of a person left below its limit, the same for IPs).

    With one script per check a refusal means the count was at its limit, and with
    windows longer than the run counts never fall: so a refused person (or IP) ends
    at its limit. One that ends below was refused by a charge later refunded."""
    people = Counter(c.person_key for c, r in zip(checks, results, strict=True) if r.accepted)
    ips = Counter(c.ip for c, r in zip(checks, results, strict=True) if r.accepted)
    refusals = wrong_person = wrong_ip = 0
    for c, r in zip(checks, results, strict=True):
        assert people[c.person_key] <= c.person_rate.count and ips[c.ip] <= c.ip_rate.count
        if r.verdict == "rate_limited_person":
            refusals += 1
            wrong_person += people[c.person_key] < c.person_rate.count
        elif r.verdict == "rate_limited_ip":
            refusals += 1
            wrong_ip += ips[c.ip] < c.ip_rate.count
    return refusals, wrong_person, wrong_ip


ROUNDS = 2


@pytest.mark.parametrize("keys", ["spread", "per-activity"])
async def test_wrong_refusals_under_contention(cluster: Cluster, keys: str) -> None:
    """Measures the trade: 8 stores, rounds of 1000 concurrent checks of 15 people from 3
    IPs, each person allowed 4 a day and each IP 20 an hour, so both limits bind and
    people near their limit often race a request of theirs that the IP refuses."""
    rng = random.Random(3)
    url = f"{cluster.url}?keys={keys}"
    totals: Counter[str] = Counter()
    elapsed = 0.0
    for _ in range(ROUNDS):
        prefix = fresh_prefix()
        stores = [redis_store_from_url(url, prefix=prefix, timeout=30.0) for _ in range(8)]
        checks = [
            check(f"u{rng.randrange(15)}@x.io", f"198.51.100.{rng.randrange(3)}",
                  person_rate=parse_rate("4/1d"), ip_rate=parse_rate("20/1h"))
            for _ in range(1000)
        ]  # fmt: skip
        try:
            started = time.perf_counter()
            results = await run_concurrently(stores, checks)
            elapsed += time.perf_counter() - started
        finally:
            for s in stores:
                await s.close()
        refusals, wrong_person, wrong_ip = wrong_refusals(checks, results)
        totals.update(
            checks=len(checks),
            accepted=sum(r.accepted for r in results),
            refusals=refusals,
            wrong_person=wrong_person,
            wrong_ip=wrong_ip,
        )
    print(
        f"\n{keys}: {totals['checks']} checks, {totals['accepted']} accepted, "
        f"{totals['refusals']} refused, of which {totals['wrong_person']} by a person count "
        f"later refunded and {totals['wrong_ip']} by an IP count below its limit; "
        f"{totals['checks'] / elapsed:.0f} checks/s (8 stores in one process: not a benchmark)"
    )
    assert totals["wrong_ip"] == 0  # the IP is charged last and never refunded
    if keys == "per-activity":
        assert totals["wrong_person"] == 0  # one script per check: exact
