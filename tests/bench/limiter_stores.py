"""The limiter stores side by side: `MemoryStore` vs `RedisStore` throughput, Redis memory.

Run in a fresh process against a `redis-server` the benchmark started (and nothing else
uses while this runs); prints one JSON line.

Throughput: `--callers` asyncio tasks in this one process, each calling
`Limiter.check_many` (what the gateway calls per request) in a closed loop for
`--duration` seconds after a `--warmup`, on the same event loop as the gateway (uvloop
when installed). Every activity is a new person and carries the gateway's two rules
(person key 10/1d, IP key 100/1h, the defaults):

- `single`: one activity per call (a request with one activity); the IP changes every
  50 calls, as in the HTTP load;
- `batch100`: 100 activities per call (a request with 100 activities: one IP, 100
  people; the IP's log fills to exactly its limit of 100, so every one is allowed).

`RedisStore` is built by `redis_store_from_url` with the gateway's prefix and its default
`GATEWAY_LIMITER_TIMEOUT` (0.5 s); a call that times out is counted as an error, not as
throughput. Redis is flushed before each phase. CPU is measured for this process and for
redis-server.

Memory: `MEMORY USAGE` of one person key (a 60-character name) after 1 and after 10
accepted events, and `used_memory` (INFO memory) growth over `--memory-keys` new person
keys with one time each (filled 1,000 per script call), divided by the keys.

    python -m tests.bench.limiter_stores --redis-url redis://127.0.0.1:PORT/0 --redis-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import resource
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis

from gateway.config import Settings
from gateway.limits import Check, Limiter, LimiterUnavailable, LimitStore, MemoryStore, Rule
from gateway.limits.redis import RedisStore, redis_store_from_url
from tests.bench.load import percentiles
from tests.bench.sysinfo import process_cpu_seconds
from tests.bench.workload import ACTIVITY_ID, PER_IP, client_ip

T = TypeVar("T")
DEFAULTS = Settings()
MEMORY_CHUNK = 1_000  # person keys per script call when filling Redis for `used_memory`


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Phase:
    """One closed-loop measurement of one store at one batch size."""

    def __init__(self, store: LimitStore, batch: int, ip_base: int, tag: str) -> None:
        self.limiter = Limiter(store)
        self.batch = batch
        self.ip_base = ip_base
        self.tag = tag
        self.calls = itertools.count()
        self.accepted = 0
        self.refused = 0
        self.errors = 0
        self.latencies: list[float] = []

    def checks(self, n: int) -> list[Check]:
        # One request's activities: one client address, a new person each.
        ip = client_ip(self.ip_base, n if self.batch == 1 else n * PER_IP)
        return [
            Check(
                activity_id=ACTIVITY_ID,
                person_key=f"e:{self.tag}-{n}-{i}@example.com",
                ip=ip,
                person_rate=DEFAULTS.person_limit,
                ip_rate=DEFAULTS.ip_limit,
            )
            for i in range(self.batch)
        ]

    async def run(self, callers: int, seconds: float) -> float:
        """Drive for `seconds`; only calls answered within them count. Returns the seconds."""
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
        clock = time.perf_counter
        start = clock()
        end = start + seconds

        async def caller() -> None:
            while clock() < end:
                checks = self.checks(next(self.calls))
                sent = clock()
                try:
                    results = await self.limiter.check_many(checks)
                except LimiterUnavailable:
                    self.errors += 1
                    continue
                done = clock()
                if done > end:
                    break
                self.latencies.append(done - sent)
                ok = sum(1 for r in results if r.accepted)
                self.accepted += ok
                self.refused += len(results) - ok

        await asyncio.gather(*(caller() for _ in range(callers)))
        return clock() - start


async def measure(
    store: LimitStore,
    *,
    batch: int,
    callers: int,
    seconds: float,
    warmup: float,
    ip_base: int,
    tag: str,
    redis_pid: int,
) -> dict[str, Any]:
    if warmup > 0:
        await Phase(store, batch, ip_base, f"{tag}w").run(callers, warmup)
    phase = Phase(store, batch, ip_base + (1 << 20), tag)
    own0, redis0 = own_cpu_seconds(), process_cpu_seconds(redis_pid)
    elapsed = await phase.run(callers, seconds)
    own1, redis1 = own_cpu_seconds(), process_cpu_seconds(redis_pid)
    calls = len(phase.latencies)
    return {
        "activities_per_call": batch,
        "callers": callers,
        "duration_s": round(elapsed, 3),
        "calls": calls,
        "accepted": phase.accepted,
        "refused": phase.refused,
        "errors": phase.errors,
        "acquires_per_s": round(phase.accepted / elapsed, 1),
        "calls_per_s": round(calls / elapsed, 1),
        "call_latency_ms": percentiles(phase.latencies, (50, 99)),
        "cpu_cores": {
            "client": round((own1 - own0) / elapsed, 2),
            "redis": round((redis1 - redis0) / elapsed, 2)
            if redis0 is not None and redis1 is not None
            else None,
        },
    }


async def redis_memory(store: RedisStore, admin: redis.Redis, keys: int) -> dict[str, Any]:
    """`MEMORY USAGE` of one person key at 1 and 10 times; `used_memory` growth per key."""
    admin.flushall()
    rate = DEFAULTS.person_limit
    now = time.time()
    probe = Rule(f"p|{ACTIVITY_ID}|e:memory-probe@example.com", rate.count, rate.window)
    name = store.redis_key(probe.key)
    usage: dict[str, int] = {}
    for n in range(1, rate.count + 1):
        decision = await store.acquire([probe], now + n / 1000)
        if not decision.allowed:
            raise RuntimeError(f"event {n} of the memory probe was refused")
        if n in (1, rate.count):
            usage[str(n)] = int(admin.memory_usage(name, samples=0) or 0)
    admin.flushall()
    before = int(admin.info("memory")["used_memory"])
    for first in range(0, keys, MEMORY_CHUNK):
        checks = [
            [Rule(f"p|{ACTIVITY_ID}|e:user{i}@example.com", rate.count, rate.window)]
            for i in range(first, min(keys, first + MEMORY_CHUNK))
        ]
        if not all(d.allowed for d in await store.acquire_many(checks, now)):
            raise RuntimeError("a first event for a new key was refused")
    after = int(admin.info("memory")["used_memory"])
    count = int(admin.dbsize())
    if count != keys:
        raise RuntimeError(f"expected {keys} keys in Redis, found {count}")
    admin.flushall()
    return {
        "key_name_chars": len(name),
        "memory_usage_bytes_by_times": usage,
        "keys": keys,
        "timestamps_per_key": 1,
        "used_memory_before": before,
        "used_memory_after": after,
        "used_memory_bytes_per_key": round((after - before) / keys, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    admin = redis.Redis.from_url(args.redis_url)
    secret = hashlib.sha256(b"ortto-gw limiter\0bench").digest()  # as the gateway keys it
    shared = redis_store_from_url(
        args.redis_url,
        prefix=DEFAULTS.redis_prefix,
        timeout=DEFAULTS.limiter_timeout,
        secret=secret,
    )
    try:
        await shared.warm_up()
        out: dict[str, Any] = {
            "callers": args.callers,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "redis_timeout_s": DEFAULTS.limiter_timeout,
            "memory_store_max_keys": DEFAULTS.limiter_max_keys,
            "rules": f"person {DEFAULTS.person_limit}, IP {DEFAULTS.ip_limit}",
        }
        out["redis_memory"] = await redis_memory(shared, admin, args.memory_keys)
        results: dict[str, dict[str, Any]] = {"memory": {}, "redis": {}}
        # Interleaved (memory, redis, redis, memory) so a drift weighs on both stores alike.
        order = (("memory", 1), ("redis", 1), ("redis", 100), ("memory", 100))
        for n, (kind, batch) in enumerate(order):
            admin.flushall()
            store: LimitStore = (
                MemoryStore(max_keys=DEFAULTS.limiter_max_keys) if kind == "memory" else shared
            )
            key = "single" if batch == 1 else f"batch{batch}"
            results[kind][key] = await measure(
                store,
                batch=batch,
                callers=args.callers,
                seconds=args.duration,
                warmup=args.warmup,
                ip_base=(n + 1) << 21,
                tag=f"s{n}",
                redis_pid=args.redis_pid,
            )
            if kind == "memory":
                results[kind][key]["keys_at_end"] = store.key_count()
        admin.flushall()
        out["throughput"] = results
        return out
    finally:
        await shared.close()
        admin.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The gateway's loop choice: uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--redis-pid", type=int, required=True)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--memory-keys", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(run(main_async(args))))


if __name__ == "__main__":
    main()
