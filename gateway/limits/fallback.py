"""A shared store with a policy for when it fails: `GATEWAY_LIMITER_ON_ERROR`.

When the primary (Redis) store fails or times out, the mode decides:

- `local`: answer from the in-process store and charge it; limits then hold per
  process (each replica lets up to N through), not per site, until Redis is back;
- `open`: accept every activity (availability over limits);
- `closed`: raise `LimiterClosed`, which the app answers with 503 (limits over
  availability).

Each failed call to the primary is reported through `on_error`. After a failure the
primary is skipped for `retry_interval` seconds (a circuit breaker: a dead Redis
costs one timeout per interval, not one per request); then a single call probes it
while the others still get the fallback answer, and shared limiting resumes by
itself once a probe succeeds. Charges made locally during an outage are not copied
to Redis, nor Redis's to the local store: during an outage and for one window after
it, a key may get up to its limit from each replica plus its limit from Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from gateway.limits.base import (
    ALLOWED,
    Decision,
    LimiterClosed,
    LimiterUnavailable,
    LimitStore,
    Rule,
)

log = logging.getLogger("gateway.limits")

OnError = Literal["local", "open", "closed"]
_MODES = ("local", "open", "closed")

# What a failing primary raises: `RedisStore` wraps everything in `LimiterUnavailable`;
# the others cover any store that does not. Anything else (a bad check) propagates.
_FAILURES = (LimiterUnavailable, OSError, TimeoutError)


class FallbackStore:
    """`primary` while it answers; else `local`, allow-all or refuse, as `mode` says."""

    def __init__(
        self,
        primary: LimitStore,
        local: LimitStore,
        mode: OnError,
        *,
        on_error: Callable[[], None] | None = None,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if retry_interval < 0:
            raise ValueError(f"retry_interval must not be negative, got {retry_interval}")
        self.primary = primary
        self.local = local
        self.mode: OnError = mode
        self._on_error = on_error
        self._retry_interval = retry_interval
        self._clock = clock
        self._retry_at: float | None = None  # None: the primary is healthy
        self._probing = False

    async def warm_up(self) -> None:
        """Prepare the primary store; a failure is counted and left to the on-error policy."""
        warm_up = getattr(self.primary, "warm_up", None)
        if warm_up is None:
            return
        try:
            await warm_up()
        except LimiterUnavailable:
            log.warning(
                "shared limiter store unavailable at start",
                extra={"data": {"on_error": self.mode}},
            )
            self._retry_at = self._clock() + self._retry_interval
            if self._on_error is not None:
                self._on_error()

    @property
    def degraded(self) -> bool:
        """Whether the last call to the primary failed (answers follow `mode`)."""
        return self._retry_at is not None

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        """The primary's decision, or the mode's when the primary fails."""
        return (await self.acquire_many([rules], now))[0]

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        """The primary's decisions, or the mode's when the primary fails."""
        error: Exception | None = None
        if self._retry_at is None:
            try:
                return await self.primary.acquire_many(checks, now)
            except _FAILURES as exc:
                error = self._failed(exc)
        elif not self._probing and self._clock() >= self._retry_at:
            self._probing = True
            try:
                decisions = await self.primary.acquire_many(checks, now)
            except _FAILURES as exc:
                error = self._failed(exc)
            else:
                self._retry_at = None
                log.warning("shared limiter store answers again; shared limits resume")
                return decisions
            finally:
                self._probing = False
        if self.mode == "local":
            return await self.local.acquire_many(checks, now)
        if self.mode == "open":
            return [ALLOWED] * len(checks)
        raise LimiterClosed("the shared rate limiter is unavailable") from error

    async def forget(self, rules: Sequence[Rule]) -> None:
        """Forget in both stores (either may hold the charge); a failing primary is
        reported like a failed check, and what it keeps expires with its window."""
        await self.local.forget(rules)
        try:
            await self.primary.forget(rules)
        except _FAILURES as exc:
            self._failed(exc)

    def key_count(self) -> int:
        """The primary's figure: the shared keys (the local store only fills in outages)."""
        return self.primary.key_count()

    async def close(self) -> None:
        """Close both stores."""
        try:
            await self.primary.close()
        finally:
            await self.local.close()

    def _failed(self, exc: Exception) -> Exception:
        if self._retry_at is None:
            log.error(
                "shared limiter store failed; applying the on-error policy",
                extra={"data": {"on_error": self.mode, "error": type(exc).__name__}},
            )
        self._retry_at = self._clock() + self._retry_interval
        if self._on_error is not None:
            self._on_error()
        return exc
