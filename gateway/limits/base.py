"""The limiter's vocabulary: a rule, a store's decision, and the store protocol.

A rule allows at most `count` accepted events in ANY period of `window` seconds
for its key (a sliding log, not a calendar window). A store checks every rule
of one activity before charging any: either all allow and all are charged once,
or none is charged. Refused activities are never counted. A rule with
`charge=False` is only checked: it can refuse, and is never charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit applied to one key."""

    key: str  # e.g. "p|act:cm:logged-in|chris@example.com", built by `Limiter`
    count: int
    window: float  # seconds
    charge: bool = True  # False: checked with the others, never charged (see `Limiter`)

    def __post_init__(self) -> None:
        if self.count < 1 or not self.window > 0:
            raise ValueError(f"a rule needs count >= 1 and window > 0, got {self!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """A store's answer for one activity."""

    allowed: bool
    retry_after: float = 0.0  # when refused: seconds until every refusing rule lets one through
    refused: tuple[int, ...] = ()  # indexes of the rules that refused


ALLOWED = Decision(True)


class LimiterUnavailable(Exception):
    """A shared store did not answer in time (down, slow or failing); its verdict is unknown."""


class LimiterClosed(LimiterUnavailable):
    """The shared store is unavailable and the policy is `closed` (`FallbackStore`): refuse
    with 503. Here, not in fallback.py: a compiled build tests `isinstance` against a
    compiled class by its known subclasses, so every subclass is compiled with it."""


class LimitStore(Protocol):
    """Where the logs of accepted events live: in process or shared (Redis)."""

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        """Atomically check all rules; if all allow, charge all (keys must be distinct)."""
        ...

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        """`acquire` each check in order, each seeing the charges of the earlier ones."""
        ...

    async def forget(self, rules: Sequence[Rule]) -> None:
        """Remove these rules' logs: what they were charged is as if it never happened.

        For a rule of count 1 whose charge must be taken back (an idempotency key whose
        activity could not be stored): its log holds that one charge only."""
        ...

    def key_count(self) -> int:
        """How many keys the store holds now (some may hold only expired events)."""
        ...

    async def close(self) -> None:
        """Release the store's resources."""
        ...
