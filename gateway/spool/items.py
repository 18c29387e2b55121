"""The values the spool hands out: queued items and its gauges."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpoolStats", "SpooledItem"]


@dataclass(frozen=True, slots=True)
class SpooledItem:
    """One queued activity as handed to the delivery worker."""

    id: int
    payload: bytes
    enqueued_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """Queue gauges from in-memory counters."""

    depth: int
    bytes: int
    oldest_enqueued_at: float | None
    dead_letters: int
