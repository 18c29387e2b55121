"""Activities to spool in tests, with the columns their payloads hold."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.spool import QueuedActivity
from gateway.spool.payload import describe


def to_queue(payloads: Iterable[bytes]) -> list[QueuedActivity]:
    """Each payload with its activity id, person hash and `created` read out of it."""
    return [describe(payload) for payload in payloads]
