"""The console's feed: recent requests, activities and deliveries, as plain events.

The relay, the HTTP shell and delivery `publish` one event per thing that happened (never
blocking, never raising, never holding a full email or the API key); the operator
console reads `recent` events and `follow`s new ones (server-sent events), and looks up
what was forwarded to Ortto for one activity by its key.

`MemoryFeed` keeps a bounded ring in this process. With `GATEWAY_REDIS_URL` set, a
Redis stream carries the events instead, so the console of `--workers N` (served by the
supervisor) and of several hosts sees every process's events merged (`gateway.feed_redis`;
`gateway.feed_open` picks one).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol, TypedDict

# How many events and forwarded bodies one process keeps for the console.
RECENT_EVENTS = 1000
FORWARDED_BODIES = 500

Kind = Literal["request", "activity", "delivery"]
# The header of the console's "send a test activity" button (`console_test_token`).
TEST_HEADER = "X-Gateway-Test"


class FeedEvent(TypedDict, total=False):
    """One line of the console's stream. Only `kind`, `time` and `outcome` are always set.

    - `request`: a request refused whole (before its activities were known), e.g. a
      refused origin or a body too large: `outcome` is "refused", `reason` its code.
    - `activity`: one activity of a request: `outcome` "accepted" or "refused" (with
      `reason` and `field`), plus `warnings` (reason codes of what was normalised).
    - `delivery`: one batch's answer from Ortto: `outcome` "delivered", "retried" or
      "dead_lettered", `status` (the HTTP status, 0 for no answer), `count`, `keys`
      (the activities' keys), `error` (redacted), `ms`.
    """

    seq: int  # set by the feed: increasing within one feed
    id: str  # set by the feed: where `follow(after=id)` resumes (the Redis stream id)
    kind: Kind
    time: float  # Unix time
    outcome: str
    reason: str | None
    field: str | None
    warnings: list[str]
    request_id: str
    activity_id: str
    person: str  # a short hash (the full value only with GATEWAY_CONSOLE_PERSONAL)
    client: str  # the client address, anonymised when GATEWAY_IP_ANONYMIZE is on
    key: str  # the activity's key: look up what was forwarded with `forwarded`
    test: bool  # sent by the console's "send a test activity" button
    duplicate: bool  # accepted as a repeat of one stored before (its key is that one's)
    status: int
    count: int
    keys: list[str]
    error: str
    ms: float
    worker: int  # which of `--workers N` published it (absent for one process)


class Forwarded(TypedDict):
    """What Ortto received for one activity, and what it answered."""

    key: str
    time: float
    body: Any  # the activity as sent (emails masked unless GATEWAY_CONSOLE_PERSONAL)
    status: int
    answer: Any  # Ortto's entry for this activity, or its whole answer


# Builds what was forwarded for one activity, masked, when the console asks for it (or,
# with Redis, when it is written out): masking every delivered activity up front cost 14 %
# of the server's CPU at full load. It holds only data nobody changes afterwards; a feed
# that calls it where nobody would see an exception catches one.
ShowForwarded = Callable[[], Forwarded]


class Feed(Protocol):
    """Where events go. `publish` and `record_forward` are cheap and never raise."""

    def publish(self, event: FeedEvent) -> None: ...

    def record_forward(self, key: str, show: ShowForwarded) -> None: ...

    async def recent(self, limit: int = RECENT_EVENTS) -> list[FeedEvent]: ...

    def follow(self, after: int | str = 0) -> AsyncIterator[FeedEvent]: ...

    async def forwarded(self, key: str) -> Forwarded | None: ...

    async def close(self) -> None: ...


class MemoryFeed:
    """The events of this process, in a bounded ring; followers are woken on publish."""

    def __init__(
        self,
        max_events: int = RECENT_EVENTS,
        max_forwarded: int = FORWARDED_BODIES,
        *,
        worker: int | None = None,
    ) -> None:
        self._events: deque[FeedEvent] = deque(maxlen=max_events)
        self._forwarded: OrderedDict[str, ShowForwarded] = OrderedDict()
        self._max_forwarded = max_forwarded
        self._seq = 0
        self._worker = worker
        self._changed: asyncio.Event | None = None

    def publish(self, event: FeedEvent) -> None:
        self._seq += 1
        event["seq"] = self._seq
        event["id"] = str(self._seq)
        event.setdefault("time", time.time())
        if self._worker is not None:
            event["worker"] = self._worker
        self._events.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def record_forward(self, key: str, show: ShowForwarded) -> None:
        self._forwarded[key] = show
        self._forwarded.move_to_end(key)
        while len(self._forwarded) > self._max_forwarded:
            self._forwarded.popitem(last=False)

    async def recent(self, limit: int = RECENT_EVENTS) -> list[FeedEvent]:
        if limit <= 0:
            return []
        return list(self._events)[-limit:]

    async def follow(self, after: int | str = 0) -> AsyncIterator[FeedEvent]:
        """Every event with a `seq` above `after` (a `seq`, or an event's `id`), then each
        new one as it comes."""
        after = int(after) if isinstance(after, int) or after.isdigit() else 0
        while True:
            for event in list(self._events):
                if event["seq"] > after:
                    after = event["seq"]
                    yield event
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def forwarded(self, key: str) -> Forwarded | None:
        show = self._forwarded.get(key)
        return show() if show is not None else None

    async def close(self) -> None:
        return None


# The label the test marker signs, and the derivation of its key from the API key.
_TEST_LABEL = b"console test activity"
_TEST_KEY_LABEL = b"ortto-gw console test\0"
TEST_TOKEN_CHARS = 32


def console_test_token(settings: Any) -> str:
    """The `X-Gateway-Test` value that marks a request as the console's test activity.

    An HMAC-SHA256 of a fixed label, keyed by a secret derived from the API key: every
    worker and host that shares the key agrees on it, and a browser (which never sees
    the key) cannot forge it. It only marks the feed's events (`test`); nothing else
    changes for a test activity."""
    return _test_token(settings.api_key)


@functools.lru_cache(maxsize=4)
def _test_token(api_key: str) -> str:
    secret = hashlib.sha256(_TEST_KEY_LABEL + api_key.encode()).digest()
    return hmac.new(secret, _TEST_LABEL, hashlib.sha256).hexdigest()[:TEST_TOKEN_CHARS]


def is_test(header: str | None, settings: Any) -> bool:
    """Whether a request's `X-Gateway-Test` header is the console's token (constant time)."""
    if not header or settings is None or not settings.api_key:
        return False
    return hmac.compare_digest(header.encode(), console_test_token(settings).encode())


def mask_strings(value: Any, mask: Callable[[str], str]) -> Any:
    """A JSON value with `mask` applied to every string in it (keys of objects kept)."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: mask_strings(v, mask) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_strings(v, mask) for v in value]
    return value
