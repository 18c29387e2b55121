"""Per-person and per-IP limits of each activity, over any `LimitStore`.

A browser's `key` makes an activity idempotent, in two steps so that no repeat is
called a duplicate of an activity that was never stored:

- with the two limits, in the same atomic call, the key's *stored* rule (one event per
  `IDEMPOTENCY_WINDOW`) is only checked, and its *pending* rule (one event per
  `PENDING_WINDOW`) is charged. A repeat refused by the stored rule is a `duplicate`;
  one refused by the pending rule only is `in_flight` (its first copy is being stored:
  try again shortly);
- once the activity is stored, `confirm` charges the stored rule and forgets the
  pending one; if it could not be stored, `forget` forgets the pending one, so the
  browser's retry is new.

The key is scoped to the person and the activity, so one visitor's key can never stand
for another's activity.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import Rate
from gateway.limits.base import LimitStore, Rule

Verdict = Literal["accepted", "rate_limited_person", "rate_limited_ip", "duplicate", "in_flight"]

_PERSON = 0  # index of the person rule in each check's rules; the IP rule is 1
_STORED = 2  # with a browser's key: its stored rule (checked only) is 2
_PENDING = 3  # and its pending rule (charged) is 3
# How long a browser's key is remembered: a reloaded thank-you page or a retry after a
# lost answer comes within a day (Ortto's own merge of `key` has no documented window).
IDEMPOTENCY_WINDOW = 86400.0
# How long a key's first copy may take to be stored (a spool write, or Ortto's answer in
# sync mode) before a repeat is taken as new; `confirm` or `forget` ends it sooner.
PENDING_WINDOW = 120.0


@dataclass(frozen=True, slots=True)
class Check:
    """One activity to check: who sent it, from where, and the limits that apply."""

    activity_id: str
    person_key: str
    ip: str
    person_rate: Rate
    ip_rate: Rate
    idempotency_key: str | None = None  # the browser's `key` for the activity, if any

    def __post_init__(self) -> None:
        # Keys are "p|<activity_id>|<person_key>" and "i|<activity_id>|<ip>": with no "|"
        # before the last field, no two checks can share a key by accident.
        if "|" in self.activity_id or "|" in self.ip:
            raise ValueError(f"'|' in an activity id or IP: {self.activity_id!r}, {self.ip!r}")


@dataclass(frozen=True, slots=True)
class LimitResult:
    """The limiter's answer for one activity."""

    verdict: Verdict
    retry_after: float = 0.0  # when refused: seconds until it would pass

    @property
    def accepted(self) -> bool:
        """Whether the activity was accepted (and charged to both limits)."""
        return self.verdict == "accepted"


ACCEPTED = LimitResult("accepted")
DUPLICATE = LimitResult("duplicate")
IN_FLIGHT_RETRY = 1.0  # seconds a repeat of a key being stored is told to wait
IN_FLIGHT = LimitResult("in_flight", IN_FLIGHT_RETRY)


def rules_of(check: Check) -> tuple[Rule, ...]:
    """The person rule and the IP rule of one activity, and its key's two rules."""
    person = Rule(
        f"p|{check.activity_id}|{check.person_key}",
        check.person_rate.count,
        check.person_rate.window,
    )
    ip = Rule(f"i|{check.activity_id}|{check.ip}", check.ip_rate.count, check.ip_rate.window)
    if check.idempotency_key is None:
        return person, ip
    return person, ip, stored_rule(check, charge=False), pending_rule(check)


def _key_of(check: Check, kind: str) -> str:
    """The rule key of a browser's key: hashed to hex, which holds no "|", so no person
    key and browser key can form another's."""
    assert check.idempotency_key is not None
    digest = hashlib.blake2b(check.idempotency_key.encode(), digest_size=16).hexdigest()
    return f"{kind}|{check.activity_id}|{check.person_key}|{digest}"


def stored_rule(check: Check, *, charge: bool) -> Rule:
    """One stored copy per `IDEMPOTENCY_WINDOW` of (activity, person, key)."""
    return Rule(_key_of(check, "d"), 1, IDEMPOTENCY_WINDOW, charge)


def pending_rule(check: Check) -> Rule:
    """One copy being stored at a time of (activity, person, key)."""
    return Rule(_key_of(check, "q"), 1, PENDING_WINDOW)


class Limiter:
    """Checks and charges the activities of one request in one store call."""

    def __init__(self, store: LimitStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    async def check_many(self, checks: Sequence[Check]) -> list[LimitResult]:
        """The verdicts in order; each activity sees the charges of the earlier ones."""
        if not checks:
            return []
        rules = [rules_of(c) for c in checks]
        decisions = await self.store.acquire_many(rules, self._clock())
        results: list[LimitResult] = []
        for decision, pair in zip(decisions, rules, strict=True):
            if decision.allowed:
                results.append(ACCEPTED)
                continue
            if _STORED in decision.refused:  # a repeat: whatever the limits say now
                results.append(DUPLICATE)
                continue
            if _PENDING in decision.refused:  # its first copy is being stored
                results.append(IN_FLIGHT)
                continue
            # Never longer than the refusing rules' window: by then everything logged now
            # has expired. (A shared store call runs at its latest caller's time, a few ms
            # after this one's, which could otherwise round up to one second more.)
            window = max((pair[i].window for i in decision.refused), default=decision.retry_after)
            wait = min(decision.retry_after, window)
            if _PERSON in decision.refused:  # both refused: the person's limit is named
                results.append(LimitResult("rate_limited_person", wait))
            else:
                results.append(LimitResult("rate_limited_ip", wait))
        return results

    async def confirm(self, checks: Sequence[Check]) -> None:
        """The accepted activities were stored: their keys now mark repeats as duplicates."""
        keyed = [c for c in checks if c.idempotency_key is not None]
        if keyed:
            now = self._clock()
            await self.store.acquire_many([[stored_rule(c, charge=True)] for c in keyed], now)
            await self.store.forget([pending_rule(c) for c in keyed])

    async def forget(self, checks: Sequence[Check]) -> None:
        """The accepted activities could not be stored: the browser's retry is new (the
        limits stay charged)."""
        rules = [pending_rule(c) for c in checks if c.idempotency_key is not None]
        if rules:
            await self.store.forget(rules)
