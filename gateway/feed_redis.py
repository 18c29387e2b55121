"""The console's feed in Redis: every worker's and host's events in one stream.

Keys (the prefix is `GATEWAY_REDIS_PREFIX`; `{feed}` is a Redis Cluster hash tag, so
both keys live on one shard):

- `<prefix>:{feed}:events`, a stream capped at about `RECENT_EVENTS` entries
  (`XADD ... MAXLEN ~`): one entry per event, its field `e` the event as JSON.
- `<prefix>:{feed}:forwarded`, a stream capped at about `FORWARDED_BODIES` entries:
  what was sent to Ortto for one activity, field `k` its key and `f` the `Forwarded`
  as JSON. Looked up by key newest first (`XREVRANGE`, a page at a time): a console
  click, not a hot path, and memory stays bounded however fast activities go.

Ids and resuming. An event read back has `id`, its stream id (`<ms>-<n>`, exact: pass
it to `follow(after=...)` to resume, e.g. from an SSE `Last-Event-ID`), and `seq`, the
same id as one integer `ms * 1000 + n` (n capped at 999; a JavaScript-safe number that
increases along the stream), also accepted by `follow`. Events of every worker are
merged in the stream's order, each with the `worker` that published it.

Never blocking, never raising. `publish` and `record_forward` append to a bounded
buffer in memory and wake a background task that writes it in one script call
(`APPEND_SCRIPT`); while Redis is down or slow a failed write is dropped (counted in
`dropped`, logged once per outage), and past `MAX_BUFFER` new events are dropped too.
The task starts with the first event (or `start()`); `close()` flushes what is left (for
at most `CLOSE_TIMEOUT`) and closes the connections. Whoever opened the feed must await
it.

Nothing secret is stored: events hold reason codes, hashed people and keys of
activities; forwarded bodies are masked (by delivery's `show`) as they are written. The
connection's password (in the URL) is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.feed import FORWARDED_BODIES, RECENT_EVENTS, FeedEvent, Forwarded, ShowForwarded
from gateway.limits.redis import redis_client_from_url

log = logging.getLogger("gateway.feed")

# Events and bodies waiting for a write; past it new ones are dropped (Redis down).
MAX_BUFFER = 10_000
# At most this many events, and as many forwarded records, per script call.
FLUSH_BATCH = 500
# How long a follower's XREAD waits for new entries before asking again.
FOLLOW_BLOCK_MS = 5_000
# Entries one XREAD returns at most.
FOLLOW_COUNT = 200
# Socket timeouts: above the follower's block, so a quiet stream is not an error.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 2.0
# After a failed write or read, wait this long before the next attempt.
RETRY_PAUSE = 1.0
# What `close()` waits at most for the last write.
CLOSE_TIMEOUT = 2.0
# Entries of the forwarded stream read per page when looking up a key.
LOOKUP_PAGE = 100
# `seq` = the id's milliseconds * SEQ_SCALE + its sequence number (capped below).
SEQ_SCALE = 1000
_FAILURES = (RedisError, OSError, TimeoutError)
# Appends a batch in one call: KEYS events, forwarded; ARGV each stream's MAXLEN (about),
# the number of events, the events' JSON, then each forwarded record's key and JSON. One
# command instead of one XADD each: the client packs and parses one, where an XADD per
# entry cost the gateway nearly a fifth of its instructions (docs/benchmarks.md). The
# entries, their order and ids are what separate XADDs give; both keys share the `{feed}`
# slot.
APPEND_SCRIPT = """
local events = tonumber(ARGV[3])
for i = 4, 3 + events do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
for i = 4 + events, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'k', ARGV[i], 'f', ARGV[i + 1])
end
return events
"""


class _Closeable(Protocol):
    async def aclose(self) -> None: ...


def seq_of(stream_id: str) -> int:
    """A stream id `<ms>-<n>` as one increasing integer (see the module docstring)."""
    ms, _, n = stream_id.partition("-")
    return int(ms) * SEQ_SCALE + min(int(n or 0), SEQ_SCALE - 1)


def stream_id_of(after: int | str) -> str:
    """Where to resume: an event's `id` as is, or a `seq` (0: from the start)."""
    if isinstance(after, str):
        if "-" in after:
            return after
        after = int(after) if after.isdigit() else 0
    if after <= 0:
        return "0-0"
    return f"{after // SEQ_SCALE}-{after % SEQ_SCALE}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply: Any) -> list[tuple[str, dict[str, bytes]]]:
    """Stream entries as redis-py returns them (bytes or str) as (id, {field: bytes}),
    without those trimmed away meanwhile."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for stream_id, fields in reply or ():
        if stream_id is None or fields is None:
            continue
        decoded = {
            _text(k): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()
        }
        out.append((_text(stream_id), decoded))
    return out


def _warn_unreadable(exc: BaseException) -> None:
    log.warning("console feed: cannot read Redis", extra={"data": {"error": type(exc).__name__}})


class RedisFeed:
    """The `Feed` of every worker and host sharing a Redis and a prefix."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "ortto-gw",
        worker: int | None = None,
        max_events: int = RECENT_EVENTS,
        max_forwarded: int = FORWARDED_BODIES,
        retry_pause: float = RETRY_PAUSE,
        block_ms: int = FOLLOW_BLOCK_MS,
        also_close: Sequence[_Closeable] = (),
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty, without braces: {prefix!r}")
        self._client = client
        self._append = client.register_script(APPEND_SCRIPT)
        self.events_key = f"{prefix}:{{feed}}:events"
        self.forwarded_key = f"{prefix}:{{feed}}:forwarded"
        self._worker = worker
        self._max_events = max_events
        self._max_forwarded = max_forwarded
        self._retry_pause = retry_pause
        self._block_ms = block_ms
        self._also_close = tuple(also_close)
        self._events: deque[FeedEvent] = deque()
        self._forwards: deque[tuple[str, ShowForwarded]] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False  # since the last failed write: logged once per outage
        self.dropped = 0  # events and bodies never written (Redis down, buffer full)

    # -- writing: cheap, never raising

    def publish(self, event: FeedEvent) -> None:
        event.setdefault("time", time.time())
        if self._worker is not None:
            event["worker"] = self._worker
        self._buffer(self._events, event)

    def record_forward(self, key: str, show: ShowForwarded) -> None:
        self._buffer(self._forwards, (key, show))

    def _buffer(self, queue: deque[Any], item: Any) -> None:
        if self._closed or len(self._events) + len(self._forwards) >= MAX_BUFFER:
            self.dropped += 1
            return
        queue.append(item)
        self._wake.set()
        if self._task is None:
            self.start()

    def start(self) -> None:
        """Start the background writer (the first event does, if nobody did)."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet: the first event inside one starts it
            return
        self._task = loop.create_task(self._write_loop(), name="ortto-gateway-feed")

    async def _write_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while (self._events or self._forwards) and not self._closed:
                if not await self._write_some():
                    await asyncio.sleep(self._retry_pause)  # Redis down: not in a spin

    async def flush(self) -> None:
        """Write (or, Redis down, drop) everything buffered so far."""
        while self._events or self._forwards:
            await self._write_some()

    async def _write_some(self) -> bool:
        """One script call for the buffered entries; False (and them dropped) when it
        failed."""
        async with self._lock:
            events = [self._events.popleft() for _ in range(min(FLUSH_BATCH, len(self._events)))]
            forwards = [
                self._forwards.popleft() for _ in range(min(FLUSH_BATCH, len(self._forwards)))
            ]
            if not events and not forwards:
                return True
            encoded = [e for e in map(self._event_json, events) if e is not None]
            shown: list[tuple[str, bytes]] = []
            for key, show in forwards:
                body = self._forward_json(show)
                if body is not None:
                    shown.append((key, body))
            args: list[bytes | str | int] = [self._max_events, self._max_forwarded, len(encoded)]
            args += encoded
            for key, body in shown:
                args += (key, body)
            try:
                async with asyncio.timeout(SOCKET_TIMEOUT):
                    await self._append(keys=[self.events_key, self.forwarded_key], args=args)
            except _FAILURES as exc:
                self.dropped += len(encoded) + len(shown)
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "console feed: Redis unavailable; its events are dropped meanwhile",
                        extra={"data": {"error": type(exc).__name__}},
                    )
                return False
            if self._failing:
                self._failing = False
                log.info(
                    "console feed: Redis available again", extra={"data": {"dropped": self.dropped}}
                )
            return True

    def _event_json(self, event: FeedEvent) -> bytes | None:
        """The event as JSON; None (dropped, logged) if it cannot be: never raising."""
        try:
            return orjson.dumps(event)
        except Exception as exc:  # a value orjson refuses: that one event is dropped
            self._drop("an event could not be encoded", exc)
            return None

    def _forward_json(self, show: ShowForwarded) -> bytes | None:
        """What was forwarded, masked, as JSON; None (dropped, logged) if it cannot be."""
        try:
            return orjson.dumps(show())
        except Exception as exc:  # an answer too odd to mask: that one is dropped
            self._drop("a forwarded activity could not be shown", exc)
            return None

    def _drop(self, what: str, exc: Exception) -> None:
        self.dropped += 1
        log.warning(f"console feed: {what}", extra={"data": {"error": type(exc).__name__}})

    # -- reading: for the console

    @staticmethod
    def _decode(stream_id: str, fields: dict[str, bytes]) -> FeedEvent | None:
        try:
            event: FeedEvent = orjson.loads(fields.get("e", b""))
        except orjson.JSONDecodeError:
            return None
        event["id"] = stream_id
        event["seq"] = seq_of(stream_id)
        return event

    async def recent(self, limit: int = RECENT_EVENTS) -> list[FeedEvent]:
        """The newest `limit` events of every worker, oldest first ([] while Redis is down)."""
        if limit <= 0:
            return []
        try:
            reply: Any = await self._client.xrevrange(self.events_key, count=limit)
        except _FAILURES as exc:
            _warn_unreadable(exc)
            return []
        entries = reversed(_entries(reply))
        decoded = (self._decode(stream_id, fields) for stream_id, fields in entries)
        return [event for event in decoded if event is not None]

    async def follow(self, after: int | str = 0) -> AsyncIterator[FeedEvent]:
        """Every event after `after` (an event's `id` or `seq`; 0: the whole stream), then
        each new one as it comes, from any worker. While Redis is down it waits and asks
        again, resuming where it was."""
        last = stream_id_of(after)
        while True:
            try:
                reply = await self._client.xread(
                    {self.events_key: last}, count=FOLLOW_COUNT, block=self._block_ms
                )
            except _FAILURES:
                await asyncio.sleep(self._retry_pause)
                continue
            streams: Any = reply.items() if isinstance(reply, dict) else (reply or [])
            for _key, found in streams:
                if found and isinstance(found[0], list) and len(found) == 1:
                    found = found[0]  # RESP3 wraps the entries once more
                for stream_id, fields in _entries(found):
                    last = stream_id
                    event = self._decode(stream_id, fields)
                    if event is not None:
                        yield event

    async def forwarded(self, key: str) -> Forwarded | None:
        """What was sent to Ortto for the activity `key` (the newest record), if kept."""
        wanted = key.encode()
        end = "+"
        try:
            while True:
                reply: Any = await self._client.xrevrange(
                    self.forwarded_key, max=end, count=LOOKUP_PAGE
                )
                entries = _entries(reply)
                for _id, fields in entries:
                    if fields.get("k") == wanted:
                        found: Forwarded = orjson.loads(fields.get("f", b"null"))
                        return found
                if not entries or len(reply) < LOOKUP_PAGE:
                    return None
                end = "(" + entries[-1][0]  # exclusive: the page after this one
        except _FAILURES as exc:
            _warn_unreadable(exc)
            return None

    async def close(self) -> None:
        """Write what is buffered (for at most `CLOSE_TIMEOUT`), stop, close connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.flush()
        self._closed = True
        self.dropped += len(self._events) + len(self._forwards)
        self._events.clear()
        self._forwards.clear()
        await self._client.aclose()
        for resource in self._also_close:
            await resource.aclose()


def redis_feed_from_settings(settings: Any, *, worker: int | None = None) -> RedisFeed:
    """A `RedisFeed` on `GATEWAY_REDIS_URL` under `GATEWAY_REDIS_PREFIX`."""
    client, also_close = redis_client_from_url(
        settings.redis_url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
    )
    return RedisFeed(client, prefix=settings.redis_prefix, worker=worker, also_close=also_close)
