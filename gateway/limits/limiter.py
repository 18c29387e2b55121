"""Per-person and per-IP limits of each activity, over any `LimitStore`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import Rate
from gateway.limits.base import LimitStore, Rule

Verdict = Literal["accepted", "rate_limited_person", "rate_limited_ip"]

_PERSON = 0  # index of the person rule in each check's rules; the IP rule is 1


@dataclass(frozen=True, slots=True)
class Check:
    """One activity to check: who sent it, from where, and the limits that apply."""

    activity_id: str
    person_key: str
    ip: str
    person_rate: Rate
    ip_rate: Rate

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


def rules_of(check: Check) -> tuple[Rule, Rule]:
    """The person rule and the IP rule of one activity."""
    return (
        Rule(
            f"p|{check.activity_id}|{check.person_key}",
            check.person_rate.count,
            check.person_rate.window,
        ),
        Rule(f"i|{check.activity_id}|{check.ip}", check.ip_rate.count, check.ip_rate.window),
    )


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
