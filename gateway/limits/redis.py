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
batch (one round trip, `EVALSHA`); on a Redis Cluster, one call per slot, sent at
once: a script may only touch keys of one slot, and redis-py refuses `EVALSHA` in
cluster pipelines anyway (see Cluster for what that costs the atomic rule).

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
dump and a list of candidate emails can test them). The `{...}` hash tag decides a
key's Redis Cluster slot. Keys of rules that are not the limiter's (no activity
field) share the tag `-`.

Cluster. The person key and the IP key of an activity share only the activity id,
and any person may come from any IP, so one atomic script for both needs every key
of the activity in one slot: a hot shard per activity. That is `?keys=per-activity`
(and any store built with `spread=False`, as on a single Redis): exact, but the
busiest activity's shard takes all its calls. By default a cluster's keys are
*spread*: tagged `{<activity id>|<16 hex>}`, a keyed digest of (activity, person) or
(activity, IP), so a person's keys (with its browser keys' `d`/`q` keys) share one
slot and an IP's another. A check then runs as steps, one per slot, in the order of
its rules (person, then IP): each step is the same atomic script (check every rule
of the slot, charge all or none); a check refused by a step is only checked by the
later ones (for its refusing rules and `retry_after`, as one script would report
them, but for a batch with one person twice: see docs/scaling-redis.md), and the
charges its earlier steps made are taken back at once by
`REFUND_SCRIPT` (each removes the very time it wrote). What this trades: no limit
is ever exceeded (every charge is checked against its limit atomically, a refund
only lowers a count), and an IP refusal is never wrong (the IP is charged last,
never refunded); but between a person's charge and its refund (one round trip) the
person's count is one too high, so a concurrent request of the same person and
activity from another IP, arriving when the person is one below the limit, can be
refused although it would have passed. Also, if Redis fails between the steps, or
the refund fails, the person stays charged (stricter, as a lost answer is). A
person is charged first because a person key has one user and an IP key many: a
transient extra charge on the IP would hit more concurrent requests. A spread check
costs two round trips (three when the IP refuses after the person passed) and its
calls batch per slot rather than per activity (tests/test_limits_cluster.py
measures both).

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
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import CLUSTER_KEYS  # the default first (see Cluster above)
from gateway.limits.base import ALLOWED, Decision, LimiterUnavailable, Rule

# Checks one batch of activities in order. ARGV[1]: now in ms; then, for each check, its
# number of rules R and R pairs of count and window (ms; negative for a rule that is only
# checked, never charged). KEYS: the logs of every rule of every check, in the same order.
# Returns one reply per check: {0, then per rule the time written to its log (0 for a
# rule only checked)} when every rule allowed (and all were charged), else {retry_at_ms,
# indexes of the refusing rules (from 0)...}; retry_at_ms is never 0.
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
  local written = {0}
  for r = 1, n_rules do
    local count, window = tonumber(ARGV[a + 2 * r - 1]), tonumber(ARGV[a + 2 * r])
    written[r + 1] = 0
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
      written[r + 1] = t
    end
  end
  return written
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

# Takes back charges that `SCRIPT` wrote (a check that a later slot refused, see Cluster).
# ARGV[1]: now in ms; then, for each key, the time its charge wrote and its window (ms).
# Removes that one time from the log (a time never reappears below a newer one, so the
# search stops there); a log left with nothing in the window is deleted.
REFUND_SCRIPT = """
local now = tonumber(ARGV[1])
for k = 1, #KEYS do
  local t, window = tonumber(ARGV[2 * k]), tonumber(ARGV[2 * k + 1])
  local log = redis.call('GET', KEYS[k]) or ''
  for i = #log / 6, 1, -1 do
    local time = struct.unpack('>I6', log, 6 * i - 5)
    if time < t then break end
    if time == t then
      log = string.sub(log, 1, 6 * i - 6) .. string.sub(log, 6 * i + 1)
      local ttl = 0
      if #log > 0 then ttl = struct.unpack('>I6', log, #log - 5) + window - now end
      if ttl > 0 then
        redis.call('SET', KEYS[k], log, 'PX', ttl)
      else
        redis.call('DEL', KEYS[k])
      end
      break
    end
  end
end
return 0
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
# A spread key's tag: 64 bits spread people over the 16384 slots (a collision only puts
# two people in one slot, which is harmless).
TAG_DIGEST_BYTES = 8
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

    def add(
        self, index: int, keys: Sequence[str], rules: Sequence[Rule], *, charge: bool = True
    ) -> None:
        """Add a check's rules; with `charge=False` every one of them is only checked."""
        self.indexes.append(index)
        self.keys += keys
        self.args.append(len(rules))
        for rule in rules:
            window = max(1, _ms(rule.window))
            self.args += (rule.count, window if rule.charge and charge else -window)


@dataclass(slots=True)
class _Part:
    """The rules of one check that share a slot: one step of its acquire (see Cluster)."""

    slot: str
    indexes: list[int]  # of the rules in the check
    keys: list[str]


@dataclass(slots=True)
class _Outcome:
    """What the steps of one check found so far."""

    refused: list[int] = field(default_factory=list)  # indexes of the refusing rules
    retry_at_ms: int = 0
    # charges to take back if a later step refuses: (slot, key, time written, window ms)
    charged: list[tuple[str, str, int, int]] = field(default_factory=list)


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
        spread: bool | None = None,
    ) -> None:
        """`spread`: hash tags per person and per IP (see Cluster); by default only on a
        `RedisCluster`, whose keys of one activity would otherwise all sit in one slot."""
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
        self._cluster = isinstance(client, RedisCluster)
        self._topology = asyncio.Lock()  # see `_learn_topology`
        self._topology_known = not self._cluster
        self._spread = self._cluster if spread is None else spread
        self._script = client.register_script(SCRIPT)
        self._refund_script = client.register_script(REFUND_SCRIPT)
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

    @property
    def spread(self) -> bool:
        """Whether keys are tagged per person and per IP (else per activity)."""
        return self._spread

    def redis_key(self, key: str) -> str:
        """The Redis key of a rule key: prefix, hash tag, digest (no email in clear)."""
        digest = hashlib.blake2b(key.encode(), digest_size=DIGEST_BYTES, key=self._secret)
        return f"{self._prefix}:{{{self._tag(key)}}}:{digest.hexdigest()}"

    def _tag(self, key: str) -> str:
        # Rule keys are "<kind>|<activity>|<person or IP>[|...]" (see `rules_of`).
        parts = key.split("|", 3)
        if len(parts) < 3 or not parts[1]:
            return NO_ACTIVITY_TAG
        if not self._spread:
            return parts[1]
        # The person's keys (p, and a browser key's d and q) share their first three
        # fields, so they share a tag; the digest hides the email as the key's does.
        owner = f"{parts[1]}|{parts[2]}".encode()
        digest = hashlib.blake2b(owner, digest_size=TAG_DIGEST_BYTES, key=self._secret)
        return f"{parts[1]}|{digest.hexdigest()}"

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        """Atomically check all rules; if all allow, charge all (one round trip)."""
        return (await self.acquire_many([rules], now))[0]

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        """`acquire` each check in order, each seeing the earlier ones' charges.

        One round trip when each check's keys share a slot (always on a single Redis);
        with spread keys on a cluster, one step per slot of a check (see Cluster).
        """
        now_ms = _ms(now)
        plans = [self._plan(rules) for rules in checks]
        self._maybe_start_sweep()
        outcomes = [_Outcome() for _ in checks]
        try:
            async with asyncio.timeout(self._timeout):
                for step in range(max(map(len, plans), default=0)):
                    await self._step(checks, plans, outcomes, step, now_ms)
        except _FAILURES as exc:
            raise LimiterUnavailable(f"Redis limiter store: {exc!r}") from exc
        await self._refund([o for o in outcomes if o.refused and o.charged], now_ms)
        return [
            Decision(False, o.retry_at_ms / 1000 - now, tuple(sorted(o.refused)))
            if o.refused
            else ALLOWED
            for o in outcomes
        ]

    def _plan(self, rules: Sequence[Rule]) -> list[_Part]:
        """A check's rules by slot, in the order of their first rule: its steps."""
        if len(rules) > 1 and len({rule.key for rule in rules}) != len(rules):
            raise ValueError("the rules of one check need distinct keys")
        parts: dict[str, _Part] = {}
        for index, rule in enumerate(rules):
            key = self.redis_key(rule.key)
            slot = self._slot_group(key)
            part = parts.setdefault(slot, _Part(slot, [], []))
            part.indexes.append(index)
            part.keys.append(key)
        return list(parts.values())

    async def _step(
        self,
        checks: Sequence[Sequence[Rule]],
        plans: Sequence[Sequence[_Part]],
        outcomes: Sequence[_Outcome],
        step: int,
        now_ms: int,
    ) -> None:
        """Run the `step`th part of every check that has one: one script call per slot.

        A check already refused by an earlier part is only checked (for its refusing
        rules and `retry_at`), never charged."""
        batches: dict[str, _Batch] = {}
        for index, (rules, plan) in enumerate(zip(checks, plans, strict=True)):
            if step < len(plan):
                part = plan[step]
                batch = batches.setdefault(part.slot, _Batch(now_ms))
                charge = not outcomes[index].refused
                batch.add(index, part.keys, [rules[i] for i in part.indexes], charge=charge)
        replies = await self._call_all(list(batches.items()))
        for batch, reply in zip(batches.values(), replies, strict=True):
            for index, answer in zip(batch.indexes, reply, strict=True):
                part, outcome = plans[index][step], outcomes[index]
                status, *rest = (int(x) for x in answer)
                if status:  # refused: rest are the refusing rules, by index in the part
                    outcome.retry_at_ms = max(outcome.retry_at_ms, status)
                    outcome.refused += (part.indexes[i] for i in rest)
                elif not outcome.refused:  # allowed and charged: rest are the times written
                    for i, key, written in zip(part.indexes, part.keys, rest, strict=True):
                        if written:
                            window = max(1, _ms(checks[index][i].window))
                            outcome.charged.append((part.slot, key, written, window))

    async def _refund(self, outcomes: Sequence[_Outcome], now_ms: int) -> None:
        """Take back the charges of checks that a later step refused (one call per slot).

        The refusal stands whatever happens here: if Redis fails now, the charges stay
        (stricter, as a lost answer would be)."""
        groups: dict[str, tuple[list[str], list[int]]] = {}
        for outcome in outcomes:
            for slot, key, written, window in outcome.charged:
                keys, args = groups.setdefault(slot, ([], [now_ms]))
                keys.append(key)
                args += (written, window)
        if not groups:
            return

        async def call(keys: list[str], args: list[int]) -> None:
            async with self._turns:
                await self._refund_script(keys, args)

        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(*(call(keys, args) for keys, args in groups.values()))
        except _FAILURES:
            pass  # see the docstring

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
                await self._learn_topology()
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
        # A cluster needs one call per slot (keys with different tags may share one).
        # Elsewhere the whole batch is one call (one atomic script, one round trip).
        if self._cluster:
            return str(key_slot(redis_key.encode()))
        return ""

    async def _learn_topology(self) -> None:
        """On a cluster, ask for the slot map once before the first burst of calls.

        redis-py 8.1's `RedisCluster`, used for the first time by many calls at once,
        fails some with `AttributeError` on a half-open connection
        (tests/test_limits_cluster.py reaches it); one call first avoids that."""
        if self._topology_known:
            return
        async with self._topology:
            if not self._topology_known:
                assert isinstance(self._client, RedisCluster)
                await self._client.initialize()
                self._topology_known = True

    async def _call_all(self, batches: Sequence[tuple[str, _Batch]]) -> list[list[list[int]]]:
        # One batch per slot (several only on a cluster): their script calls run at once.
        await self._learn_topology()
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
    """A `RedisStore` for a URL (`redis_client_from_url`); every socket operation is
    bounded by `timeout`. One immediate retry per command (a pooled connection to a
    restarted Redis); anything more is the `FallbackStore`'s job."""
    client, also_close = redis_client_from_url(
        url,
        max_connections=MAX_IN_FLIGHT,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )
    spread = cluster_keys(url) == "spread"
    return RedisStore(
        client, prefix=prefix, timeout=timeout, secret=secret, also_close=also_close, spread=spread
    )


def cluster_keys(url: str) -> str | None:
    """A cluster URL's `?keys=` (`spread`, the default, or `per-activity`); None for a URL
    that is not a cluster's."""
    scheme = url.partition("://")[0]
    if scheme not in {"redis+cluster", "rediss+cluster"}:
        return None
    keys = parse_qs(urlsplit(url).query, keep_blank_values=True).get("keys", [CLUSTER_KEYS[0]])
    if len(keys) != 1 or keys[0] not in CLUSTER_KEYS:
        raise ValueError(f"?keys= is one of {', '.join(CLUSTER_KEYS)}")
    return keys[0]


def redis_client_from_url(
    url: str, **options: Any
) -> tuple[Redis | RedisCluster, list[_Closeable]]:
    """A client for a URL, with redis-py's connection `options`, and what else to close
    with it (a Sentinel's connections).

    `redis://`, `rediss://` (TLS) and `unix://` are redis-py's own URLs (query options
    such as `?db=` and `?ssl_cert_reqs=` work); `redis+sentinel://[user:pw@]host:port
    [,host:port...]/service_name[/db]` asks the Sentinels for the current master (the
    credentials are the master's); `redis+cluster://[user:pw@]host:port[,host:port...]`
    is a Redis Cluster, its limiter keys spread per person and per IP
    (`?keys=per-activity`: one slot per activity, see `cluster_keys`).
    `rediss+sentinel://` and `rediss+cluster://` use TLS.
    """
    scheme = url.partition("://")[0]
    if scheme not in URL_SCHEMES:
        # The URL is not echoed: it may hold a password.
        raise ValueError(f"{scheme}:// is not a Redis URL ({', '.join(URL_SCHEMES)})")
    if scheme in {"redis", "rediss", "unix"}:
        return Redis.from_url(url, **options), []
    parts = urlsplit(url)
    cluster = scheme in {"redis+cluster", "rediss+cluster"}
    query = parse_qs(parts.query, keep_blank_values=True)
    if cluster:
        cluster_keys(url)  # checked here; the limiter's store reads it
        query.pop("keys", None)
    if query or parts.fragment:
        what = "only ?keys=" if cluster else "no query or fragment"
        raise ValueError(f"{scheme}:// URLs take {what}")
    tls = scheme.startswith("rediss+")
    if cluster:
        user, password, hosts = _parse_hosts(parts.netloc, 6379)
        if parts.path.strip("/"):
            raise ValueError("a Redis Cluster URL has no path (a cluster has only db 0)")
        nodes = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in hosts],
            username=user or None,
            password=password or None,
            ssl=tls,
            **options,
        )
        return nodes, []
    # redis+sentinel, rediss+sentinel
    user, password, hosts = _parse_hosts(parts.netloc, 26379)
    path = [p for p in parts.path.split("/") if p]
    if len(path) not in (1, 2) or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends with /service_name or /service_name/db")
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
        hosts,
        sentinel_kwargs={
            "socket_timeout": options.get("socket_timeout"),
            "socket_connect_timeout": options.get("socket_connect_timeout"),
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
    return master, [sentinel]
