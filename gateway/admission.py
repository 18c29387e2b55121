"""The request budget (`GATEWAY_MAX_CONCURRENT`) and the slots of slow bodies (`..._BODY_READERS`).

A request holds one unit of the budget from the shell's admission to its answer, except
while it waits for a body that did not follow its headers within `BODY_GRACE`: then it
holds a body slot instead. Clients that trickle their bodies fill the slots, not the
budget (1,024 of them used to lock every visitor out for `GATEWAY_READ_TIMEOUT`); a
visitor whose body comes with its headers, or right after them, never waits for a slot;
a slow body that finds every slot taken gets 503 at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.errors import Unavailable

# How long a body may take to follow its headers before it needs a slot: a browser's
# comes in the same packets or within a round trip or two (a slow mobile one included).
BODY_GRACE = 1.0
# What a refused client is told to wait, in seconds.
BUSY_RETRY_AFTER = 1.0


class Admission:
    """Counts of requests in the budget and of bodies holding a slot."""

    def __init__(
        self,
        max_concurrent: int,
        max_body_readers: int,
        *,
        on_readers: Callable[[int], None] | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_body_readers = max_body_readers
        self.in_flight = 0
        self.readers = 0
        self._on_readers = on_readers

    def enter(self) -> bool:
        """Count a request in; False when that takes the budget over its bound."""
        self.in_flight += 1
        return self.in_flight <= self.max_concurrent

    def leave(self) -> None:
        """Count a request out (whatever `enter` said)."""
        self.in_flight -= 1

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Trade the request's unit of the budget for a body slot while its body comes.

        503 when every slot is taken; 503 too when the budget is full once the body is in
        (the request would go over it to be handled).
        """
        if self.readers >= self.max_body_readers:
            raise Unavailable(
                "too many slow uploads in progress; try again shortly",
                retry_after=BUSY_RETRY_AFTER,
                reason="busy",
            )
        self._set_readers(self.readers + 1)
        self.in_flight -= 1
        try:
            yield
        finally:
            self.in_flight += 1
            self._set_readers(self.readers - 1)
        if self.in_flight > self.max_concurrent:
            raise Unavailable(
                "the gateway is busy; try again shortly",
                retry_after=BUSY_RETRY_AFTER,
                reason="busy",
            )

    def _set_readers(self, value: int) -> None:
        self.readers = value
        if self._on_readers is not None:
            self._on_readers(value)
