"""The values the spool takes and hands out: queued activities and its gauges."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QueuedActivity", "SpoolStats", "SpooledItem"]


@dataclass(frozen=True, slots=True)
class QueuedActivity:
    """One activity to spool: its encoded payload and what delivery needs to know of it
    without reading the payload (stored in columns beside it)."""

    payload: bytes
    activity_id: str
    person: str  # the short person hash (`gateway.identity.person_hash`), "" if unknown
    created: float | None  # unix time of its `created`, None if unknown


@dataclass(frozen=True, slots=True)
class SpooledItem:
    """One queued activity as handed to the delivery worker."""

    id: int
    payload: bytes
    enqueued_at: float
    attempts: int
    activity_id: str
    person: str
    created: float | None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Queue gauges from in-memory counters."""

    depth: int
    bytes: int
    oldest_enqueued_at: float | None
    dead_letters: int
