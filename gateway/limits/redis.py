"""The shared store: the same sliding logs as `MemoryStore`, kept in Redis for every replica.

Algorithm. Exactly `MemoryStore`'s: a key's log holds the times (whole ms) of its
accepted events, ascending; an event at `now` is allowed by a rule (count N, window
W) when fewer than N logged times t satisfy `t > now - W`; when refused, the Nth
newest time plus W is when one more would pass (`retry_after`); a new time never
goes below the newest logged one of its key. A Lua script takes a batch of checks
and, in order, checks every rule of one and charges all of them only if all allow
(refused activities leave no trace). Redis runs a script atomically, so concurrent
gateways can never let more than N through, and each check of a batch sees the
charges of the earlier ones. `acquire_many` makes one script call for the whole
batch (one round trip, `EVALSHA`); on a Redis Cluster, one call per slot (per
activity, see Keys), sent at once: a script may only touch keys of one slot, and
redis-py refuses `EVALSHA` in cluster pipelines anyway.

Data structure. A log is a plain string of 6-byte big-endian times in ms (enough
until the year 10889), oldest first: the Nth newest time is one fixed offset away,
`GET`/`SET` are the only commands, and a charge writes the newest N - 1 live times
plus the new one (out-of-window times are dropped then), so a log never holds more
than N times. Every write sets the key's expiry to when its newest time leaves the
window (`SET ... PX`), so idle keys vanish by themselves. Measured on Redis 7.0 for
a person key (a 60-character name) holding 1 / 10 times, `MEMORY USAGE` (key name,
value and main-dict entry): this string 120 / 168 bytes, a sorted set 136 / 328, a
list 216 / 296; the string is the cheapest at every size (and a sorted set would
also need a unique member per time). Counting the expiry entry and the hash-table
slots too, `used_memory` grows by about 190 / 225 bytes per key
(tests/test_limits_redis.py prints the figures).

Keys. `<prefix>:{<activity id>}:<32 hex>`: the prefix lets several sites share one
Redis; the hex is a BLAKE2b-128 digest of the whole rule key (`p|<activity>|<email>`
or `i|<activity>|<ip>`), so a Redis dump or `KEYS *` shows no email or IP (pass a
`secret` shared by every replica to key the digest: without one, someone holding a
dump and a list of candidate emails can test them). The `{...}` hash tag is for
Redis Cluster, where the keys of one script call must share a slot: the person key
and the IP key of an activity share only the activity id, and since any person may
come from any IP, all keys of an activity must share one slot. So each activity
lives on one shard (a hot slot for the busiest activity): that shard sees one
script call per request and activity, far below what one Redis shard serves (tens
of thousands a second) given that Ortto takes a few thousand activities a second at
most; different activities spread over the shards. Keys of rules that are not the
limiter's (no activity field) share the tag `-`.

Clock. Times are the gateway's `now` (its wall clock), not Redis's, so tests are
deterministic and one request's checks use one instant. Replicas' clocks must
agree (run NTP): a replica whose clock is S seconds ahead sees the others' events S
seconds older and may let the next one through up to S early; one behind is
stricter by S. Expiry is relative (`PX`), so Redis's own clock does not matter.

Failures. Each call is bounded by `timeout` (`asyncio.timeout` around the whole
operation, plus socket timeouts on clients built by `redis_store_from_url`); any
error or timeout raises `LimiterUnavailable`, and the verdict is then unknown (a
charge may land although its answer was lost, which can only make a limit
stricter). A broken connection is dropped by redis-py and the next call opens a new
one. The script is registered once and run by `EVALSHA`; on `NOSCRIPT` (a
restarted or failed-over Redis: the refused call ran nothing) redis-py loads it and
runs the call again.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.limits.base import ALLOWED, Decision, LimiterUnavailable, Rule

# Checks one batch of activities in order. ARGV[1]: now in ms; then, for each check, its
# number of rules R and R pairs of count and window (ms; negative for a rule that is only
# checked, never charged). KEYS: the logs of every rule of every check, in the same order.
# Returns one reply per check: {} when every rule allowed (and all were charged), else
# {retry_at_ms, indexes of the refusing rules (from 0)...}.
SCRIPT = """
local now = tonumber(ARGV[1])

local function check(k, a, n_rules)
  local logs, firsts, refused = {}, {}, {}
  local retry_at = 0
  for r = 1, n_rules do
    local count, window = tonumber(ARGV[a + 2 * r - 1]), math.abs(tonumber(ARGV[a + 2 * r]))
    local log = redis.call('GET', KEYS[k + r]) or ''
    local n = #log / 6
    -- the first time still in the window: a binary search over the fixed-width records
    local lo, hi = 1, n + 1
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if struct.unpack('>I6', log, 6 * mid - 5) > now - window then hi = mid else lo = mid + 1 end
    end
    if n - lo + 1 >= count then
      refused[#refused + 1] = r - 1
      local at = struct.unpack('>I6', log, 6 * (n - count) + 1) + window
      if at > retry_at then retry_at = at end
    end
    logs[r], firsts[r] = log, lo
  end
  if #refused > 0 then
    table.insert(refused, 1, retry_at)
    return refused
  end
  for r = 1, n_rules do
    local count, window = tonumber(ARGV[a + 2 * r - 1]), tonumber(ARGV[a + 2 * r])
    if window > 0 then
      local log = logs[r]
      local n = #log / 6
      local t = now
      if n > 0 then
        local newest = struct.unpack('>I6', log, #log - 5)
        if newest > t then t = newest end
      end
      -- keep the newest count - 1 times still in the window, then the new one
      local keep = math.max(firsts[r], n - count + 2)
      redis.call('SET', KEYS[k + r], string.sub(log, 6 * keep - 5) .. struct.pack('>I6', t),
        'PX', t + window - now)
    end
  end
  return {}
end

local replies = {}
local k, a = 0, 2
while a <= #ARGV do
  local n_rules = tonumber(ARGV[a])
  replies[#replies + 1] = check(k, a, n_rules)
  k, a = k + n_rules, a + 1 + 2 * n_rules
end
return replies
"""

URL_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
DIGEST_BYTES = 16  # 128 bits: no collision among billions of keys
NO_ACTIVITY_TAG = "-"  # the hash tag of keys without an activity field
# Script calls (and SCANs) in flight at once per store; more wait for a turn, within the
# timeout. redis-py's pools refuse a connection past their maximum instead of waiting.
MAX_IN_FLIGHT = 64
# Start-up may wait a little longer than a request for Redis to answer.
WARM_UP_TIMEOUT = 5.0
SCAN_BATCH = 1000  # keys per SCAN call when counting
SCAN_PAUSE = 0.005  # seconds between SCAN calls: a sweep never loads Redis
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


# What a failing Redis raises (`RedisClusterException` is not a `RedisError`).
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


# Checks one shared script call carries at most: more would hold Redis (single-threaded)
# in one script for long; a request of 100 activities gains nothing from sharing.
MAX_SHARED_CHECKS = 200


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


class _Batch:
    """The arguments of one script call: checks sharing a slot, in order."""

    def __init__(self, now_ms: int) -> None:
        self.indexes: list[int] = []  # positions of the checks in `acquire_many`'s argument
        self.keys: list[str] = []
        self.args: list[int] = [now_ms]

    def add(self, index: int, keys: Sequence[str], rules: Sequence[Rule]) -> None:
        self.indexes.append(index)
        self.keys += keys
        self.args.append(len(rules))
        for rule in rules:
            window = max(1, _ms(rule.window))
            self.args += (rule.count, window if rule.charge else -window)


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds (as `MemoryStore` counts them)."""
    return round(seconds * 1000)


class RedisStore:
    """Sliding logs in Redis, shared by every worker and host that uses the same prefix."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "ortto-gw",
        timeout: float = 0.25,
        secret: bytes = b"",
        count_interval: float = 60.0,
        max_in_flight: int = MAX_IN_FLIGHT,
        also_close: Sequence[_Closeable] = (),
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty, without braces: {prefix!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        # BLAKE2b takes a key of at most 64 bytes: a longer secret is hashed down first.
        self._secret = secret if len(secret) <= 64 else hashlib.blake2b(secret).digest()
        self._count_interval = count_interval
        self._also_close = tuple(also_close)
        self._script = client.register_script(SCRIPT)
        self._turns = asyncio.Semaphore(max_in_flight)  # the client's pool must be as large
        self._key_count = 0
        self._counted_at = float("-inf")  # monotonic start of the sweep that gave _key_count
        self._sweep: asyncio.Task[None] | None = None
        self._next_sweep = 0.0  # monotonic time the next background sweep may start
        # Calls made in the same loop turn share one script call per slot (see `_submit`).
        self._pending: dict[str, list[tuple[_Batch, asyncio.Future[list[list[int]]]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    @property
    def prefix(self) -> str:
        """The prefix of every key of this store."""
        return self._prefix

    def redis_key(self, key: str) -> str:
        """The Redis key of a rule key: prefix, activity hash tag, digest (no email in clear)."""
        parts = key.split("|", 2)
        tag = parts[1] if len(parts) == 3 and parts[1] else NO_ACTIVITY_TAG
        digest = hashlib.blake2b(key.encode(), digest_size=DIGEST_BYTES, key=self._secret)
        return f"{self._prefix}:{{{tag}}}:{digest.hexdigest()}"

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        """Atomically check all rules; if all allow, charge all (one round trip)."""
        return (await self.acquire_many([rules], now))[0]

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        """`acquire` each check in order, each seeing the earlier ones' charges (one round trip)."""
        now_ms = _ms(now)
        batches: dict[str, _Batch] = {}  # one script call per hash tag (per slot) on a cluster
        for index, rules in enumerate(checks):
            if len(rules) > 1 and len({rule.key for rule in rules}) != len(rules):
                raise ValueError("the rules of one check need distinct keys")
            if not rules:
                continue
            keys = [self.redis_key(rule.key) for rule in rules]
            batch = batches.setdefault(self._slot_group(keys[0]), _Batch(now_ms))
            batch.add(index, keys, rules)
        self._maybe_start_sweep()
        decisions = [ALLOWED] * len(checks)
        if not batches:
            return decisions
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._call_all(list(batches.items()))
        except _FAILURES as exc:
            raise LimiterUnavailable(f"Redis limiter store: {exc!r}") from exc
        for batch, reply in zip(batches.values(), replies, strict=True):
            for index, answer in zip(batch.indexes, reply, strict=True):
                if answer:
                    retry_at_ms, *refused = (int(x) for x in answer)
                    decisions[index] = Decision(False, retry_at_ms / 1000 - now, tuple(refused))
        return decisions

    async def forget(self, rules: Sequence[Rule]) -> None:
        """Delete these rules' logs (one `DEL` per slot); `LimiterUnavailable` on failure."""
        groups: dict[str, list[str]] = {}
        for rule in rules:
            key = self.redis_key(rule.key)
            groups.setdefault(self._slot_group(key), []).append(key)
        if not groups:
            return
        try:
            async with self._turns, asyncio.timeout(self._timeout):
                await asyncio.gather(*(self._client.delete(*keys) for keys in groups.values()))
        except _FAILURES as exc:
            raise LimiterUnavailable(f"redis: {type(exc).__name__}") from None

    async def warm_up(self) -> None:
        """Connect and load the script now, so the first burst of requests does not."""
        try:
            async with asyncio.timeout(max(self._timeout, WARM_UP_TIMEOUT)):
                await self._client.script_load(SCRIPT)
        except _FAILURES as exc:
            raise LimiterUnavailable(f"Redis limiter store: {exc!r}") from exc

    def key_count(self) -> int:
        """Keys under this prefix at the last count (a SCAN sweep at most every `count_interval`).

        Approximate and never blocking: it counts every replica's keys, including keys
        whose times have all left their windows but that have not expired yet.
        """
        return self._key_count

    async def refresh_key_count(self) -> int:
        """Count the keys under this prefix now (a full SCAN sweep) and cache the figure."""
        started = time.monotonic()
        count = 0
        match = _GLOB_SPECIAL.sub(r"\\\1", self._prefix) + ":*"
        client = self._client
        if isinstance(client, RedisCluster):
            async with asyncio.timeout(self._timeout):
                await client.initialize()  # learn the nodes (a no-op once done)
            for node in client.get_primaries():
                cursor = 0
                while True:
                    async with self._turns, asyncio.timeout(self._timeout):
                        reply: Any = await client.scan(
                            cursor, match=match, count=SCAN_BATCH, target_nodes=node
                        )
                    cursors, keys = reply  # redis-py types the non-cluster reply
                    count += len(keys)
                    cursor = cursors[node.name]
                    if cursor == 0:
                        break
                    await asyncio.sleep(SCAN_PAUSE)
        else:
            cursor = 0
            while True:
                async with self._turns, asyncio.timeout(self._timeout):
                    cursor, keys = await client.scan(cursor, match=match, count=SCAN_BATCH)
                count += len(keys)
                if cursor == 0:
                    break
                await asyncio.sleep(SCAN_PAUSE)
        if started > self._counted_at:  # a sweep that began earlier must not overwrite it
            self._key_count, self._counted_at = count, started
        return count

    async def close(self) -> None:
        """Stop counting and close the Redis client (and any Sentinel connections)."""
        for task in list(self._flushes):
            task.cancel()
        if self._flushes:
            await asyncio.wait(self._flushes)
        if self._sweep is not None:
            self._sweep.cancel()
            await asyncio.wait([self._sweep])  # its cancellation is not ours to raise
            self._sweep = None
        try:
            await self._client.aclose()
        finally:
            for resource in self._also_close:
                await resource.aclose()

    def _slot_group(self, redis_key: str) -> str:
        # A cluster needs one call per slot; the hash tag decides the slot. Elsewhere the
        # whole batch is one call (one atomic script, one round trip).
        if isinstance(self._client, RedisCluster):
            return redis_key[len(self._prefix) + 1 : redis_key.index("}") + 1]
        return ""

    async def _call_all(self, batches: Sequence[tuple[str, _Batch]]) -> list[list[list[int]]]:
        # One batch per slot (several only on a cluster): their script calls run at once.
        futures = [self._submit(slot, batch) for slot, batch in batches]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:  # one failed or we gave up: the others are not awaited
                future.cancel()
            raise

    def _submit(self, slot: str, batch: _Batch) -> asyncio.Future[list[list[int]]]:
        """Queue a batch for the slot's next script call; its replies, in order.

        Every request checked in the same event-loop turn shares one script call: the
        script runs their checks in order, exactly as separate calls in that order would,
        and redis-py's cost per call (about 150 µs of CPU) is paid once for all of them.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[int]]] = loop.create_future()
        pending = self._pending.get(slot)
        if pending is not None and (
            sum(len(queued.indexes) for queued, _ in pending) + len(batch.indexes)
            > MAX_SHARED_CHECKS
        ):
            self._start_call(slot)  # big enough: send it now, start another
            pending = None
        if pending is None:
            pending = self._pending[slot] = []
            loop.call_soon(self._start_call, slot, pending)
        pending.append((batch, future))
        return future

    def _start_call(
        self,
        slot: str,
        only: list[tuple[_Batch, asyncio.Future[list[list[int]]]]] | None = None,
    ) -> None:
        if only is not None and self._pending.get(slot) is not only:
            return  # that list was sent already (it grew past MAX_SHARED_CHECKS)
        queued = self._pending.pop(slot, [])
        queued = [(batch, future) for batch, future in queued if not future.done()]
        if queued:
            task = asyncio.get_running_loop().create_task(self._call(queued))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _call(self, queued: list[tuple[_Batch, asyncio.Future[list[list[int]]]]]) -> None:
        # One `now` for the call: the latest of the callers' (they differ by microseconds).
        merged = _Batch(max(batch.args[0] for batch, _ in queued))
        for batch, _ in queued:
            merged.keys += batch.keys
            merged.args += batch.args[1:]
        expected = sum(len(batch.indexes) for batch, _ in queued)
        try:
            # `AsyncScript` runs EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis),
            # loads the script and runs it again: a script that was refused ran nothing.
            async with self._turns, asyncio.timeout(self._timeout):
                reply: list[list[int]] = await self._script(merged.keys, merged.args)
            if len(reply) != expected:
                raise RedisError(f"the limiter script answered {len(reply)} of {expected}")
        except asyncio.CancelledError:  # the store is closing
            for _, future in queued:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for batch, future in queued:
            end = start + len(batch.indexes)
            if not future.done():  # its caller gave up (timeout): the charge stands
                future.set_result(reply[start:end])
            start = end

    def _maybe_start_sweep(self) -> None:
        if self._sweep is not None or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self._count_interval
        self._sweep = asyncio.get_running_loop().create_task(self._background_sweep())

    async def _background_sweep(self) -> None:
        try:
            await self.refresh_key_count()
        except _FAILURES:
            pass  # keep the last figure; the next sweep tries again
        finally:
            self._sweep = None


def _parse_hosts(netloc: str, default_port: int) -> tuple[str, str, list[tuple[str, int]]]:
    """`[user[:password]@]host[:port][,host[:port]...]` as (user, password, [(host, port)])."""
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        parts = urlsplit(f"//{item.strip()}")
        try:
            port = parts.port or default_port
        except ValueError:
            raise ValueError(f"bad port in Redis address {item!r}") from None
        if not parts.hostname:
            raise ValueError(f"no host in Redis address {item!r}")
        found.append((parts.hostname, port))
    return unquote(user), unquote(password), found


def redis_store_from_url(
    url: str, *, prefix: str, timeout: float, secret: bytes = b""
) -> RedisStore:
    """A `RedisStore` for a URL (`redis_client_from_url`)."""
    client, also_close = redis_client_from_url(url, timeout=timeout)
    return RedisStore(client, prefix=prefix, timeout=timeout, secret=secret, also_close=also_close)


def redis_client_from_url(
    url: str, *, timeout: float
) -> tuple[Redis | RedisCluster, tuple[_Closeable, ...]]:
    """A client for a URL, and what to close with it; every socket operation is bounded
    by `timeout`.

    `redis://`, `rediss://` (TLS) and `unix://` are redis-py's own URLs (query options
    such as `?db=` and `?ssl_cert_reqs=` work); `redis+sentinel://[user:pw@]host:port
    [,host:port...]/service_name[/db]` asks the Sentinels for the current master (the
    credentials are the master's); `redis+cluster://[user:pw@]host:port[,host:port...]`
    is a Redis Cluster. `rediss+sentinel://` and `rediss+cluster://` use TLS. One
    immediate retry per command (a pooled connection to a restarted Redis); anything
    more is the caller's job (the `FallbackStore`, the upstream pacer's fallback).
    """
    options: dict[str, Any] = {
        "max_connections": MAX_IN_FLIGHT,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
    }
    scheme = url.partition("://")[0]
    if scheme not in URL_SCHEMES:
        # The URL is not echoed: it may hold a password.
        raise ValueError(f"{scheme}:// is not a Redis URL ({', '.join(URL_SCHEMES)})")
    if scheme in {"redis", "rediss", "unix"}:
        return Redis.from_url(url, **options), ()
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// URLs take no query or fragment")
    tls = scheme.startswith("rediss+")
    if scheme in {"redis+cluster", "rediss+cluster"}:
        user, password, hosts = _parse_hosts(parts.netloc, 6379)
        if parts.path.strip("/"):
            raise ValueError("a Redis Cluster URL has no path (a cluster has only db 0)")
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in hosts],
            username=user or None,
            password=password or None,
            ssl=tls,
            **options,
        )
        return cluster, ()
    # redis+sentinel, rediss+sentinel
    user, password, hosts = _parse_hosts(parts.netloc, 26379)
    path = [p for p in parts.path.split("/") if p]
    if len(path) not in (1, 2) or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends with /service_name or /service_name/db")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts,
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "ssl": tls,
        },
        **options,
    )
    master = sentinel.master_for(
        unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=user or None,
        password=password or None,
        ssl=tls,
    )
    return master, (sentinel,)
