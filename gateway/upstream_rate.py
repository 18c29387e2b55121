"""The upstream rate: when this gateway may send its next request to Ortto.

Ortto limits requests per account (per API key), not per process or host, and its 429
(`try-in-seconds`), a refused key (401/403) and its IP ban after repeated 400s concern
the whole account too. A pacer answers both questions for the delivery worker:
`acquire()` waits until one more request may be sent; `pause(reason, seconds)` stops
every sender of the account for that long.

`LocalPacer` is one process on its own: aiolimiter at `GATEWAY_UPSTREAM_RATE`; its
pauses are the delivery worker's own, so there is nothing to share.

`RedisPacer` (with `GATEWAY_REDIS_URL`) shares one rate and one pause between every
worker and host that send with the same key to the same Ortto base:

- Rate: GCRA (the generic cell rate algorithm) in one Lua script on one key per
  account, holding the theoretical arrival time (TAT, ms). A request may go when
  `now >= TAT - tolerance`; it then moves TAT to `max(TAT, now) + 1/rate`. The
  tolerance (`TOLERANCE`, half an interval) absorbs a waiter's wake-up lateness so the
  long-run rate is the configured one, and bounds any window of W seconds to at most
  `W * rate + 1.5` requests: a burst of one, never a catch-up burst after an
  idle spell. Whichever host asks first when a slot is due gets it, so the hosts
  with work share the account's whole rate, and idle hosts take nothing.
- Pauses: a second key (same hash tag, so one Cluster slot) set with `PX` to the
  pause's length, the reason as value, only when longer than what is left of the
  current one (a pause is never shortened). The rate script reads it first, in the
  same call: a paused account answers with the pause's remaining time and charges no
  slot. A pause is written in the background (`pause` is called from synchronous
  code); the process that saw the answer is paused by its delivery worker at once.
- Time: Redis's `TIME` (one clock for every host: no skew between them); the tests
  pass the time in (`now=`) instead and drive it with a fake clock.
- Keys: `<prefix>:upstream:{<16 hex>}:rate|pause`; the hex is a BLAKE2b digest of the
  upstream base and the API key, so two accounts (or a sandbox and Ortto) never share
  a budget and no key appears in Redis.
- Redis Cluster (`redis+cluster://`): both scripts name their keys (`KEYS`), which share
  the hash tag, so redis-py routes each `EVALSHA` to the node holding the account's slot
  (after a `NOSCRIPT` it loads the script on every primary and runs the call again).
  `TIME` before a write is fine: Redis 5+ replicates a script by its effects.
  tests/test_multi_host.py runs three hosts on a real three-node cluster.

When Redis fails (an error or `GATEWAY_LIMITER_TIMEOUT`), the request is paced by the
local fallback instead, at this process's share (`GATEWAY_UPSTREAM_RATE_FALLBACK`,
default the whole rate, right for one process: set it to rate / processes when there
are more), and each such request (and each pause not shared) is counted in
`ortto_gateway_upstream_rate_fallback_total`. After a failure Redis is skipped for
`RETRY_INTERVAL`, so a dead Redis costs one timeout a second, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from aiolimiter import AsyncLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    from gateway.config import Settings
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.upstream_rate")

# Half an interval: absorbs a waiter's lateness (a timer's wake-up on a busy host, a Redis
# round trip) so the rate is used fully, yet no second sees more than rate + 1 requests.
TOLERANCE = 0.5
# After a Redis failure the local share is used for this long before Redis is tried again.
RETRY_INTERVAL = 1.0
# Connections of the pacer's client: at most one call per batch in flight, plus pauses.
PACER_CONNECTIONS = 16
DIGEST_BYTES = 8  # 64 bits: accounts behind one prefix never collide in practice

# KEYS[1]: the account's TAT (ms), KEYS[2]: its pause (value: the reason). ARGV[1]: the
# emission interval (ms, may be fractional), ARGV[2]: the tolerance (ms), ARGV[3]: now (ms)
# or '' for Redis's TIME. Returns {0, ''} when a request may go (and charges it), else
# {ms to wait, the pause's reason or '' for the rate}.
ACQUIRE_SCRIPT = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {paused, redis.call('GET', KEYS[2]) or ''}
end
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local now
if ARGV[3] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
else
  now = tonumber(ARGV[3])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tat - tolerance then
  return {math.ceil(tat - tolerance - now), ''}
end
if tat < now then tat = now end
tat = tat + interval
-- kept a minute past its TAT (a stale TAT is harmless: `now` replaces it), so a
-- caller whose `now` is not Redis's (the tests' fake clock) never sees it expire early
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 60000)
return {0, ''}
"""

# KEYS[1]: the pause key. ARGV[1]: the pause (whole ms), ARGV[2]: its reason. A pause is
# only ever lengthened. Returns 1 when this one was written.
PAUSE_SCRIPT = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) >= ms then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ms)
return 1
"""


class UpstreamPacer(Protocol):
    """How fast, and whether, requests to Ortto may be sent now."""

    async def acquire(self) -> None:
        """Wait until one more request may be sent (and count it as sent)."""

    def pause(self, reason: str, seconds: float) -> None:
        """Stop every sender of the account for `seconds` (`reason` as in the metrics)."""

    async def close(self) -> None:
        """Release what the pacer holds (a Redis connection)."""


class LocalPacer:
    """This process's own rate (aiolimiter); pauses are the delivery worker's own."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        # aiolimiter wants a whole capacity: below one a second, one per 1/rate seconds.
        self._limiter = AsyncLimiter(rate, 1.0) if rate >= 1 else AsyncLimiter(1, 1.0 / rate)

    async def acquire(self) -> None:
        await self._limiter.acquire()

    def pause(self, reason: str, seconds: float) -> None:
        """Nothing to share: the delivery worker that saw the answer pauses itself."""

    async def close(self) -> None:
        pass


def account_keys(prefix: str, api_key: str, upstream_base: str) -> tuple[str, str]:
    """The rate and pause keys of one Ortto account: no key in clear, one Cluster slot."""
    account = b"ortto-gw upstream\0" + upstream_base.encode() + b"\0" + api_key.encode()
    digest = hashlib.blake2b(account, digest_size=DIGEST_BYTES).hexdigest()
    base = f"{prefix}:upstream:{{{digest}}}"
    return f"{base}:rate", f"{base}:pause"


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


class RedisPacer:
    """One GCRA and one pause per account in Redis; `fallback` when Redis fails."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        keys: tuple[str, str],
        rate: float,
        fallback: UpstreamPacer,
        *,
        timeout: float = 0.5,
        on_fallback: Callable[[], None] = lambda: None,
        now: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        also_close: Sequence[_Closeable] = (),
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.rate = rate
        self._client = client
        self._keys = list(keys)
        self._interval_ms = 1000.0 / rate
        self._tolerance_ms = TOLERANCE * self._interval_ms
        self._fallback = fallback
        self._timeout = timeout
        self._on_fallback = on_fallback
        self._now = now  # seconds; None: Redis's TIME (production)
        self._sleep = sleep
        self._monotonic = monotonic
        self._also_close = tuple(also_close)
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._pause = client.register_script(PAUSE_SCRIPT)
        self._retry_at: float | None = None  # monotonic; None while Redis answers
        self._writes: set[asyncio.Task[None]] = set()
        self._shared_reason = ""  # the shared pause last waited for (logged once each)
        # A pause Redis did not take (reason, monotonic end): written once it answers again.
        self._unshared: tuple[str, float] | None = None

    async def acquire(self) -> None:
        while True:
            if self._skipping():
                self._on_fallback()
                await self._fallback.acquire()
                return
            try:
                wait_ms, reason = await self._try()
            except Exception as exc:  # any failure of the shared pacer: pace locally
                self._failed("rate", exc)
                continue
            self._retry_at = None
            self._share_unshared()
            if wait_ms <= 0:
                self._shared_reason = ""
                return
            if reason and reason != self._shared_reason:
                log.info(
                    "sending paused for every host of the account",
                    extra={"data": {"reason": reason, "seconds": round(wait_ms / 1000, 3)}},
                )
            self._shared_reason = reason
            await self._sleep(wait_ms / 1000)

    async def try_acquire(self) -> float:
        """One attempt: 0 when a request may go (it is charged), else seconds to wait."""
        wait_ms, _ = await self._try()
        return wait_ms / 1000

    async def _try(self) -> tuple[int, str]:
        now = "" if self._now is None else f"{self._now() * 1000:.3f}"
        args = [f"{self._interval_ms:.3f}", f"{self._tolerance_ms:.3f}", now]
        async with asyncio.timeout(self._timeout):
            reply: Any = await self._acquire(self._keys, args)
        wait_ms, reason = reply
        return int(wait_ms), reason.decode() if isinstance(reason, bytes) else str(reason)

    def pause(self, reason: str, seconds: float) -> None:
        ms = math.ceil(seconds * 1000)
        if ms <= 0:
            return
        if self._skipping():
            self._on_fallback()
            self._remember(reason, ms)
            return
        self._write(reason, ms)

    def _write(self, reason: str, ms: int) -> None:
        task = asyncio.get_running_loop().create_task(self.share_pause(reason, ms))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def share_pause(self, reason: str, ms: int) -> None:
        """Write a pause of `ms` for every host (unless a longer one is in force); if Redis
        cannot take it now, it is written, for what is left of it, once Redis answers."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._pause([self._keys[1]], [ms, reason])
        except Exception as exc:
            self._failed("pause", exc)
            self._remember(reason, ms)

    def _remember(self, reason: str, ms: int) -> None:
        until = self._monotonic() + ms / 1000
        if self._unshared is None or until > self._unshared[1]:
            self._unshared = (reason, until)

    def _share_unshared(self) -> None:
        """Redis answers again: the other hosts learn of a pause still in force here."""
        if self._unshared is None:
            return
        reason, until = self._unshared
        self._unshared = None
        left = math.ceil((until - self._monotonic()) * 1000)
        if left > 0:
            self._write(reason, left)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes))
        await self._client.aclose()
        for other in self._also_close:
            await other.aclose()

    def _skipping(self) -> bool:
        """Whether Redis failed less than `RETRY_INTERVAL` ago (the local share applies)."""
        return self._retry_at is not None and self._monotonic() < self._retry_at

    def _failed(self, what: str, exc: Exception) -> None:
        if self._retry_at is None:
            log.warning(
                "shared upstream rate unavailable; pacing by this process's share",
                extra={"data": {"call": what, "error": repr(exc)}},
            )
        self._retry_at = self._monotonic() + RETRY_INTERVAL
        if what == "pause":
            self._on_fallback()


def upstream_pacer(settings: Settings, metrics: Metrics) -> UpstreamPacer:
    """The pacer the settings ask for: shared through Redis when `GATEWAY_REDIS_URL` is set."""
    local = LocalPacer(settings.upstream_rate_share)
    if not settings.redis_url:
        return local
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from gateway.limits.redis import redis_client_from_url  # the optional `redis` extra

    # Bounded like the limiter's: one immediate retry, then the local share takes over.
    client, also_close = redis_client_from_url(
        settings.redis_url,
        max_connections=PACER_CONNECTIONS,
        socket_timeout=settings.limiter_timeout,
        socket_connect_timeout=settings.limiter_timeout,
        retry=Retry(NoBackoff(), 1),
    )
    return RedisPacer(
        client,
        account_keys(settings.redis_prefix, settings.api_key, settings.upstream_base),
        settings.upstream_rate,
        local,
        timeout=settings.limiter_timeout,
        on_fallback=metrics.upstream_rate_fallback.inc,
        also_close=also_close,
    )
