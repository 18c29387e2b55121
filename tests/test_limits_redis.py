"""The Redis store against real redis-servers: atomicity, keys, memory, failures, Cluster, Sentinel.

The semantics every store shares run in test_limits.py (the `redis` case of `store`).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection

from gateway.config import parse_rate
from gateway.limits import (
    Check,
    Decision,
    FallbackStore,
    LimiterClosed,
    LimiterUnavailable,
    MemoryStore,
    OnError,
    Rule,
    rules_of,
)
from gateway.limits import redis as redis_module
from gateway.limits.redis import RedisStore, redis_store_from_url
from tests import redis_support, redis_tls_support
from tests.redis_support import RedisServer

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
HOUR = 3600.0
TIMEOUT = 0.25  # the store's timeout in the failure tests
# A call to a failed Redis ends within its TIMEOUT; the bug this catches is a call that
# hangs (no timeout: forever), so the bound is 20 times TIMEOUT, not a speed test.
WAIT_BOUND = 5.0
ACTIVITY = "act:cm:logged-in"
PERSON = parse_rate("10/1d")
IP = parse_rate("100/1h")


@pytest.fixture
async def inspector(server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client to look at what the store wrote."""
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


def fresh_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def check(person: str, ip: str = "203.0.113.7", activity: str = ACTIVITY) -> tuple[Rule, Rule]:
    person_rule, ip_rule = rules_of(Check(activity, person, ip, PERSON, IP))
    return person_rule, ip_rule


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


# -- atomicity


async def test_concurrent_acquires_from_several_clients_allow_exactly_n(
    server: RedisServer,
) -> None:
    prefix = fresh_prefix()
    stores = [redis_store_from_url(server.url, prefix=prefix, timeout=5.0) for _ in range(5)]
    try:
        r = Rule("k", 10, HOUR)
        decisions = await asyncio.gather(*(stores[i % 5].acquire([r], T0) for i in range(200)))
        assert sum(d.allowed for d in decisions) == 10
        assert all(d == Decision(False, HOUR, (0,)) for d in decisions if not d.allowed)
    finally:
        for store in stores:
            await store.close()


async def test_more_calls_than_connections_wait_their_turn(server: RedisServer) -> None:
    # redis-py's pool refuses a connection past its maximum; the store queues instead.
    store = redis_store_from_url(server.url, prefix=fresh_prefix(), timeout=10.0)
    try:
        r = Rule("k", 100, HOUR)
        decisions = await asyncio.gather(*(store.acquire([r], T0) for _ in range(500)))
        assert sum(d.allowed for d in decisions) == 100
    finally:
        await store.close()


async def test_calls_in_one_loop_turn_share_a_script_call(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = redis_store_from_url(server.url, prefix=fresh_prefix(), timeout=5.0)
    sizes: list[int] = []
    script = store._script

    async def counted(keys: list[str], args: list[int]) -> object:
        sizes.append(len(keys))
        return await script(keys, args)

    monkeypatch.setattr(store, "_script", counted)
    monkeypatch.setattr(redis_module, "MAX_SHARED_CHECKS", 120)
    try:
        # 15 requests for one person (limit 10), then 300 for new people from one IP
        # (limit 100): each in the order submitted, as if they were separate calls.
        same = await asyncio.gather(*(store.acquire(check("p@x"), T0) for _ in range(15)))
        assert [d.allowed for d in same] == [True] * 10 + [False] * 5
        assert sizes == [30]  # one script call for all 15 (two keys each)
        sizes.clear()
        many = await asyncio.gather(
            *(store.acquire(check(f"n{i}@x", ip="198.51.100.9"), T0) for i in range(300))
        )
        assert [d.allowed for d in many] == [True] * 100 + [False] * 200
        assert all(d.refused == (1,) for d in many[100:])
        assert sizes == [240, 240, 120]  # at most 120 checks (240 keys) a call
    finally:
        await store.close()


async def test_concurrent_batches_check_both_rules_before_charging(
    server: RedisServer, inspector: Redis
) -> None:
    # 100 people, each twice, from one IP allowed 20 an hour: exactly 20 pass, 20 people.
    prefix = fresh_prefix()
    stores = [redis_store_from_url(server.url, prefix=prefix, timeout=5.0) for _ in range(4)]
    one_a_day, twenty_an_hour = parse_rate("1/1d"), parse_rate("20/1h")
    checks = [
        rules_of(Check(ACTIVITY, f"user{i}@example.com", "198.51.100.9", one_a_day, twenty_an_hour))
        for i in range(100)
    ] * 2
    batches = [checks[i : i + 10] for i in range(0, len(checks), 10)]
    try:
        results = await asyncio.gather(
            *(stores[i % 4].acquire_many(b, T0) for i, b in enumerate(batches))
        )
        allowed = [c[0].key for b, ds in zip(batches, results, strict=True) for c, d in
                   zip(b, ds, strict=True) if d.allowed]  # fmt: skip
        assert len(allowed) == len(set(allowed)) == 20
        keys = [k async for k in inspector.scan_iter(match=f"{prefix}:*")]
        assert len(keys) == 21  # 20 people and the IP: refused people were never charged
        ip_key = stores[0].redis_key(checks[0][1].key)
        assert await inspector.strlen(ip_key) == 20 * 6
    finally:
        for store in stores:
            await store.close()


# -- keys


async def test_keys_expire_with_their_window(server: RedisServer, inspector: Redis) -> None:
    store = redis_store_from_url(server.url, prefix=fresh_prefix(), timeout=5.0)
    try:
        person, ip = check("chris@example.com")
        assert (await store.acquire([person, ip], time.time())).allowed
        assert 0 < await inspector.pttl(store.redis_key(person.key)) <= PERSON.window * 1000
        assert 0 < await inspector.pttl(store.redis_key(ip.key)) <= IP.window * 1000
        short = Rule("short", 1, 0.05)
        assert (await store.acquire([short], time.time())).allowed
        key = store.redis_key(short.key)

        async def gone() -> bool:
            return not await inspector.exists(key)

        await eventually(gone)
    finally:
        await store.close()


async def test_prefixes_isolate_sites(server: RedisServer, inspector: Redis) -> None:
    # "s*" would match "sx" keys as a SCAN pattern: the count escapes it.
    a = redis_store_from_url(server.url, prefix=f"{fresh_prefix()}-s*", timeout=5.0)
    b = RedisStore(Redis.from_url(server.url), prefix=a.prefix.replace("*", "x"), timeout=5.0)
    try:
        r = Rule("k", 1, HOUR)
        assert (await a.acquire([r], T0)).allowed
        assert not (await a.acquire([r], T0)).allowed
        assert (await b.acquire([r], T0)).allowed
        assert (await b.acquire([Rule("k2", 1, HOUR)], T0)).allowed
        assert (await a.refresh_key_count(), await b.refresh_key_count()) == (1, 2)
        assert a.redis_key(r.key).startswith(a.prefix + ":")
        assert a.redis_key(r.key) != b.redis_key(r.key)
    finally:
        await a.close()
        await b.close()


async def test_person_and_ip_keys_are_hashed(server: RedisServer, inspector: Redis) -> None:
    store = redis_store_from_url(server.url, prefix=fresh_prefix(), timeout=5.0)
    keyed = redis_store_from_url(server.url, prefix=store.prefix, timeout=5.0, secret=b"s" * 80)
    try:
        person, ip = check("Chris.Secret@example.com".lower(), ip="2001:db8::7")
        assert (await store.acquire([person, ip], T0)).allowed
        raw = await inspector.keys(f"{store.prefix}:*")
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in raw)
        pattern = re.escape(store.prefix) + r":\{act:cm:logged-in\}:[0-9a-f]{32}"
        assert len(keys) == 2 and all(re.fullmatch(pattern, k) for k in keys), keys
        dump = " ".join(keys)
        assert "chris" not in dump and "example" not in dump and "2001" not in dump
        assert keyed.redis_key(person.key) != store.redis_key(person.key)  # a keyed digest
    finally:
        await store.close()
        await keyed.close()


async def test_key_count_is_refreshed_in_the_background(server: RedisServer) -> None:
    client = Redis.from_url(server.url)
    store = RedisStore(client, prefix=fresh_prefix(), timeout=5.0, count_interval=0.0)
    try:
        assert store.key_count() == 0
        await store.acquire_many([check(f"u{i}@example.com") for i in range(5)], T0)

        async def counted() -> bool:
            await store.acquire([Rule("other", 100, HOUR)], T0)  # each call may start a sweep
            return store.key_count() == 7

        await eventually(counted)
    finally:
        await store.close()


async def test_a_flushed_script_cache_is_reloaded(server: RedisServer, inspector: Redis) -> None:
    store = redis_store_from_url(server.url, prefix=fresh_prefix(), timeout=5.0)
    try:
        r = Rule("k", 2, HOUR)
        assert (await store.acquire([r], T0)).allowed
        await inspector.script_flush()
        assert await store.acquire_many([[r], [r]], T0) == [
            Decision(True),
            Decision(False, HOUR, (0,)),
        ]
    finally:
        await store.close()


# -- memory


async def test_memory_per_key(server: RedisServer) -> None:
    url = server.url.rsplit("/", 1)[0] + "/1"  # a database of its own, to measure deltas
    store = redis_store_from_url(url, prefix="ortto-gw", timeout=5.0)
    client = Redis.from_url(url)
    try:
        await client.flushdb()
        person = check("chris.example@example.com")[0]
        for _ in range(10):
            await store.acquire([person], T0)
        key = store.redis_key(person.key)
        ten = await client.memory_usage(key, samples=0)
        await client.delete(key)
        await store.acquire([person], T0)
        one = await client.memory_usage(key, samples=0)

        async def used_per_key(keys: int, times: int) -> float:
            await client.flushdb()
            before = int((await client.info("memory"))["used_memory"])
            people = [[check(f"user{i}@example.com")[0]] for i in range(keys)]
            for _ in range(times):
                for start in range(0, keys, 1000):
                    await store.acquire_many(people[start : start + 1000], T0)
            return (int((await client.info("memory"))["used_memory"]) - before) / keys

        used_one, used_ten = await used_per_key(10_000, 1), await used_per_key(2_000, 10)
        print(
            f"\nRedis memory per person key ({len(key)}-char name): MEMORY USAGE "
            f"{one} B with 1 time, {ten} B with 10; used_memory per key "
            f"{used_one:.0f} B with 1 time, {used_ten:.0f} B with 10"
        )
        assert one is not None and ten is not None
        assert one <= 160 and ten <= 220
        assert used_one <= 260 and used_ten <= 320
    finally:
        await client.flushdb()
        await client.aclose()
        await store.close()


# -- failures


def fail(server: RedisServer, how: str) -> None:
    """Stop the server (connections close) or freeze it (nothing answers: timeouts)."""
    if how == "stopped":
        server.stop()
    else:
        server.pause()


def recover(server: RedisServer, how: str) -> None:
    """Restart a stopped server on its port (empty), or resume a frozen one."""
    if how == "stopped":
        server.restart()
    else:
        server.resume()


@pytest.mark.parametrize("failure", ["stopped", "frozen"])
async def test_redis_store_fails_fast_and_recovers(own_server: RedisServer, failure: str) -> None:
    store = redis_store_from_url(own_server.url, prefix=fresh_prefix(), timeout=TIMEOUT)
    try:
        kept = Rule("kept", 1, HOUR)
        assert (await store.acquire([kept], T0)).allowed
        fail(own_server, failure)
        r = Rule("k", 2, HOUR)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await store.acquire([r], T0)
            assert time.monotonic() - started < WAIT_BOUND
        recover(own_server, failure)

        async def answers() -> bool:
            try:
                await store.acquire([Rule("probe", 1000, HOUR)], T0)
            except LimiterUnavailable:
                return False
            return True

        await eventually(answers)  # the same client: no connection was left poisoned
        # A restarted Redis is empty (and has no script cache); a resumed one kept its state.
        # (Calls that timed out against the frozen one may land when it resumes: their
        # verdict is unknown, which is why this checks another key.)
        assert (await store.acquire([kept], T0)).allowed == (failure == "stopped")
    finally:
        await store.close()


@pytest.mark.parametrize("failure", ["stopped", "frozen"])
@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_fallback_modes_when_redis_fails(
    own_server: RedisServer, mode: OnError, failure: str
) -> None:
    prefix = fresh_prefix()
    errors: list[str] = []

    def replica(name: str) -> FallbackStore:
        return FallbackStore(
            redis_store_from_url(own_server.url, prefix=prefix, timeout=TIMEOUT),
            MemoryStore(),
            mode,
            on_error=lambda: errors.append(name),
            retry_interval=0.05,
        )

    a, b = replica("a"), replica("b")
    r = Rule("k", 3, HOUR)
    try:
        assert [(await a.acquire([r], T0)).allowed for _ in range(3)] == [True] * 3
        assert not (await b.acquire([r], T0)).allowed  # shared: b sees a's charges
        assert errors == []

        fail(own_server, failure)
        answers: list[bool] = []
        for _ in range(6):
            started = time.monotonic()
            try:
                answers.append((await a.acquire([r], T0)).allowed)
            except LimiterClosed:
                answers.append(False)
                assert mode == "closed"
            assert time.monotonic() - started < WAIT_BOUND
        expected = {"local": [True] * 3 + [False] * 3, "open": [True] * 6, "closed": [False] * 6}
        assert answers == expected[mode]
        assert a.degraded and errors and set(errors) == {"a"}

        recover(own_server, failure)

        async def shared_again() -> bool:
            try:
                await a.acquire([Rule("probe", 1000, HOUR)], T0)
            except LimiterClosed:
                return False
            return not a.degraded

        await eventually(shared_again)
        fresh = Rule("fresh", 1, HOUR)
        assert (await a.acquire([fresh], T0)).allowed
        await eventually(lambda: _refused(b, fresh))  # b sees a's charge: shared again
    finally:
        await a.close()
        await b.close()


async def _refused(store: FallbackStore, rule: Rule) -> bool:
    """Whether the shared store (not the fallback) refuses `rule` now."""
    try:
        decision = await store.acquire([rule], T0)
    except LimiterClosed:
        return False
    return not decision.allowed and not store.degraded


# -- Redis Cluster and Sentinel


async def test_redis_cluster(tmp_path: Path) -> None:
    with redis_support.running_cluster(tmp_path) as node:
        store = redis_store_from_url(
            f"redis+cluster://127.0.0.1:{node.port}", prefix=fresh_prefix(), timeout=5.0
        )
        try:
            # Two activities (two slots) in one batch; the one-node cluster still refuses a
            # script whose keys span slots, so this passes only with the hash tags.
            batch = [check("a@x.io"), check("a@x.io", activity="act:cm:signup")] * 11
            decisions = await store.acquire_many(batch, T0)
            assert [d.allowed for d in decisions] == [True] * 20 + [False] * 2
            assert decisions[-1] == Decision(False, PERSON.window, (0,))
            assert await store.refresh_key_count() == 4
        finally:
            await store.close()


async def test_redis_sentinel(server: RedisServer, tmp_path: Path) -> None:
    with redis_support.running_sentinel(tmp_path, server, "gateway") as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port},localhost:{sentinel.port}/gateway/2"
        store = redis_store_from_url(url, prefix=fresh_prefix(), timeout=5.0)
        client = Redis.from_url(server.url.rsplit("/", 1)[0] + "/2")
        try:
            assert (await store.acquire(list(check("s@x.io")), T0)).allowed
            assert len(await client.keys(f"{store.prefix}:*")) == 2  # in db 2 of the master
        finally:
            await store.close()
            await client.aclose()


# -- construction


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost:6379", "not a Redis URL"),
        ("redis+sentinel://localhost:26379", "service_name"),
        ("redis+sentinel://localhost:26379/svc/x", "service_name"),
        ("redis+sentinel://localhost:26379/svc?db=1", "no query"),
        ("redis+sentinel://localhost:notaport/svc", "bad port"),
        ("redis+cluster://localhost:6379/1", "no path"),
        ("redis+cluster://:pw@", "no host"),
        ("redis+cluster://localhost:6379?keys=per-slot", "keys= is one of"),
        ("redis+cluster://localhost:6379?keys=spread&db=1", "take only"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        redis_store_from_url(url, prefix="p", timeout=1.0)


async def test_bad_prefix_or_timeout() -> None:
    client = Redis()
    try:
        for prefix in ("", "a{b}"):
            with pytest.raises(ValueError, match="prefix"):
                RedisStore(client, prefix=prefix)
        with pytest.raises(ValueError, match="timeout"):
            RedisStore(client, timeout=0)
    finally:
        await client.aclose()


# -- TLS (rediss://)


async def test_rediss_url_speaks_tls_and_checks_the_certificate(tmp_path: Path) -> None:
    with redis_tls_support.running_tls(tmp_path) as tls:
        store = redis_store_from_url(tls.url, prefix=fresh_prefix(), timeout=5.0)
        # Without the CA the server's certificate is not trusted: no connection.
        untrusted = redis_store_from_url(
            f"rediss://127.0.0.1:{tls.tls_port}/0", prefix=store.prefix, timeout=5.0
        )
        try:
            assert (await store.acquire(list(check("t@x.io")), T0)).allowed
            plain = Redis.from_url(tls.server.url)  # the same server, its plain port
            try:
                assert len(await plain.keys(f"{store.prefix}:*")) == 2
            finally:
                await plain.aclose()
            with pytest.raises(LimiterUnavailable) as refused:
                await untrusted.acquire(list(check("t@x.io")), T0)
            causes = []
            cause: BaseException | None = refused.value
            while cause is not None:
                causes.append(repr(cause))
                cause = cause.__cause__ or cause.__context__
            assert "CERTIFICATE_VERIFY_FAILED" in " ".join(causes), causes
        finally:
            await store.close()
            await untrusted.close()


def test_cluster_and_sentinel_urls_choose_tls_and_key_layout() -> None:
    for url, spread in [
        ("redis+cluster://a:1,b:2", True),
        ("rediss+cluster://u:pw@a:1?keys=spread", True),
        ("redis+cluster://a:1?keys=per-activity", False),
    ]:
        store = redis_store_from_url(url, prefix="p", timeout=1.0)
        assert store.spread is spread
        assert isinstance(store._client, RedisCluster)
        connection = store._client.connection_kwargs["connection_class"]
        assert issubclass(connection, SSLConnection) is url.startswith("rediss")
    plain = redis_store_from_url("redis://localhost/0", prefix="p", timeout=1.0)
    assert not plain.spread
    assert plain.redis_key(f"p|{ACTIVITY}|a@x.io").startswith(f"p:{{{ACTIVITY}}}:")
