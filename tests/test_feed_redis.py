"""The Redis feed against a real redis-server: workers merged, resuming, never blocking."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.feed import FeedEvent, Forwarded, ShowForwarded
from gateway.feed_open import open_feed
from gateway.feed_redis import RedisFeed, seq_of, stream_id_of
from gateway.sandbox import wait_for
from tests.conftest import API_KEY, base_settings, forwarded
from tests.redis_cluster_support import running_cluster
from tests.redis_support import RedisServer

pytestmark = pytest.mark.redis

DEADLINE = 10.0
_prefixes = itertools.count()


@pytest.fixture
async def feeds(server: RedisServer, tmp_path: Path) -> AsyncIterator[list[RedisFeed]]:
    """Workers 0 and 1 and a reader (the supervisor's console), on one fresh prefix."""
    settings = base_settings(
        tmp_path, "http://127.0.0.1:1", redis_url=server.url, redis_prefix=f"feed{next(_prefixes)}"
    )
    opened = [open_feed(settings, worker=0), open_feed(settings, worker=1), open_feed(settings)]
    assert all(isinstance(f, RedisFeed) for f in opened)
    yield opened  # type: ignore[misc]
    for feed in opened:
        await feed.close()


def event(n: int, **extra: object) -> FeedEvent:
    return {"kind": "activity", "outcome": "accepted", "request_id": f"r{n}", **extra}  # type: ignore[typeddict-item]


async def test_two_workers_are_read_merged_in_order(feeds: list[RedisFeed]) -> None:
    w0, w1, reader = feeds
    for n, feed in enumerate((w0, w1, w0)):
        feed.publish(event(n))
        await feed.flush()
    recent = await reader.recent()
    assert [(e["request_id"], e["worker"]) for e in recent] == [("r0", 0), ("r1", 1), ("r2", 0)]
    assert [e["seq"] for e in recent] == sorted(e["seq"] for e in recent)
    assert all(seq_of(e["id"]) == e["seq"] for e in recent)
    assert [e["request_id"] for e in await reader.recent(2)] == ["r1", "r2"]

    # Resumed after the first event, by its id or its seq; then woken by a new one.
    afters: tuple[int | str, ...] = (recent[0]["id"], recent[0]["seq"])
    for i, after in enumerate(afters):
        follower = reader.follow(after=after)
        assert isinstance(follower, AsyncGenerator)  # closed below
        missed = ["r1", "r2"] + [f"r{3 + j}" for j in range(i)]  # the last pass's too
        got = [await asyncio.wait_for(anext(follower), DEADLINE) for _ in missed]
        assert [e["request_id"] for e in got] == missed
        waiting = asyncio.ensure_future(anext(follower))
        w1.publish(event(3 + i))
        new = await asyncio.wait_for(waiting, DEADLINE)
        assert (new["request_id"], new["worker"]) == (f"r{3 + i}", 1)
        await follower.aclose()
        await w1.flush()


def shown(record: Forwarded) -> ShowForwarded:
    return lambda: record


async def test_forwarded_bodies_are_found_by_key(feeds: list[RedisFeed]) -> None:
    w0, w1, reader = feeds
    for n in range(250):  # more than one page of the lookup
        body = forwarded(f"k{n}", {"n": n})
        (w0 if n % 2 else w1).record_forward(body["key"], shown(body))
    await w0.flush()
    await w1.flush()
    found = await reader.forwarded("k3")
    assert found is not None and found["body"] == {"n": 3}
    assert await reader.forwarded("nope") is None


async def test_a_forwarded_body_that_cannot_be_shown_is_dropped_and_the_rest_written(
    feeds: list[RedisFeed],
) -> None:
    w0, _, reader = feeds

    def unshowable() -> Forwarded:
        raise RecursionError("an answer nested deeper than masking walks")

    w0.record_forward("bad", unshowable)
    w0.record_forward(
        "good", shown({"key": "good", "time": 1.0, "body": {}, "status": 200, "answer": {}})
    )
    await w0.flush()
    assert w0.dropped == 1
    assert await reader.forwarded("bad") is None
    assert (await reader.forwarded("good")) is not None
    w0.publish(event(7))  # the writer still runs
    await w0.flush()
    assert (await reader.recent())[-1]["request_id"] == "r7"


async def test_an_event_that_cannot_be_encoded_is_dropped_and_the_rest_written(
    feeds: list[RedisFeed],
) -> None:
    w0, _, reader = feeds
    w0.publish(event(1))
    w0.publish(event(2, ms=2**70))  # an integer orjson refuses
    w0.publish(event(3))
    await w0.flush()
    assert w0.dropped == 1
    assert [e["request_id"] for e in await reader.recent()][-2:] == ["r1", "r3"]
    w0.publish(event(4))  # the writer still runs
    await w0.flush()
    assert (await reader.recent())[-1]["request_id"] == "r4"


async def test_a_batch_is_one_script_call_with_every_entry_in_order(
    feeds: list[RedisFeed], server: RedisServer
) -> None:
    """One command per batch, not one XADD per entry: those cost the gateway nearly a
    fifth of its instructions (docs/benchmarks.md)."""
    w0, _, reader = feeds
    admin = Redis.from_url(server.url)

    async def calls(command: str) -> int:
        stats: dict[str, dict[str, int]] = await admin.info("commandstats")
        return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

    try:
        await w0.flush()
        before = {c: await calls(c) for c in ("xadd", "evalsha", "eval")}
        for n in range(40):
            w0.publish(event(n))
            body = forwarded(f"b{n}", {"n": n})
            w0.record_forward(body["key"], shown(body))
        await w0.flush()
        after = {c: await calls(c) for c in before}
    finally:
        await admin.aclose()
    assert after["xadd"] - before["xadd"] == 80
    # The 80 XADDs ran in the script: EVALSHA, and once per server a NOSCRIPT answer, then
    # EVALSHA again after loading it.
    assert 1 <= after["evalsha"] + after["eval"] - before["evalsha"] - before["eval"] <= 2
    assert [e["request_id"] for e in await reader.recent()][-40:] == [f"r{n}" for n in range(40)]
    found = await reader.forwarded("b39")
    assert found is not None and found["body"] == {"n": 39}


async def test_nothing_secret_is_stored(feeds: list[RedisFeed], server: RedisServer) -> None:
    w0, _, _ = feeds
    w0.publish(event(1, person="0123456789ab", reason="busy"))
    body = forwarded("k", {"f": "****@x.com"})
    w0.record_forward("k", lambda: body)
    await w0.flush()
    raw = Redis.from_url(server.url)
    try:
        dumped = b""
        for key in (w0.events_key, w0.forwarded_key):
            entries = await raw.xrange(key)
            assert entries is not None
            for _id, fields in entries:
                assert fields is not None
                for value in fields.values():
                    assert isinstance(value, bytes)
                    dumped += value
    finally:
        await raw.aclose()
    assert b"0123456789ab" in dumped  # what was scanned is what was written
    assert API_KEY.encode() not in dumped


async def test_publish_with_redis_down_neither_raises_nor_blocks(
    own_server: RedisServer, tmp_path: Path
) -> None:
    settings = replace(
        base_settings(tmp_path, "http://127.0.0.1:1"), redis_url=own_server.url, redis_prefix="down"
    )
    feed = open_feed(settings, worker=0)
    assert isinstance(feed, RedisFeed)
    own_server.stop()
    feed.record_forward("bad", lambda: {"too": {1, 2}})  # type: ignore[typeddict-item]
    for n in range(99):
        feed.publish(event(n))  # returns at once: it only appends to a buffer
    # Each entry counted once: the one that could not be shown is not counted again when
    # the write of the others fails.
    await wait_for(lambda: feed.dropped == 100, timeout=DEADLINE)
    assert await feed.recent() == []  # the console shows nothing, and does not fail
    # Back again: events flow again.
    own_server.start()
    feed.publish(event(7))
    await feed.flush()
    await wait_for(lambda: feed.dropped == 100, timeout=DEADLINE)
    assert [e["request_id"] for e in await feed.recent()] == ["r7"]
    await asyncio.wait_for(feed.close(), DEADLINE)


def test_stream_ids_and_seqs() -> None:
    assert seq_of("1712345678901-3") == 1712345678901003
    assert stream_id_of(1712345678901003) == "1712345678901-3"
    assert stream_id_of("1712345678901-3") == "1712345678901-3"
    assert stream_id_of(0) == stream_id_of("0") == "0-0"


async def test_a_feed_on_a_redis_cluster_writes_and_reads(tmp_path: Path) -> None:
    """Both streams share the `{feed}` slot, so one script call writes a batch there."""
    with running_cluster(tmp_path) as cluster:
        settings = base_settings(
            tmp_path, "http://127.0.0.1:1", redis_url=cluster.url, redis_prefix="feedc"
        )
        writer, reader = open_feed(settings, worker=0), open_feed(settings)
        assert isinstance(writer, RedisFeed) and isinstance(reader, RedisFeed)
        try:
            for n in range(3):
                writer.publish(event(n))
                body = forwarded(f"c{n}", {"n": n})
                writer.record_forward(body["key"], shown(body))
            await writer.flush()
            assert writer.dropped == 0
            assert [e["request_id"] for e in await reader.recent()] == ["r0", "r1", "r2"]
            found = await reader.forwarded("c1")
            assert found is not None and found["body"] == {"n": 1}
        finally:
            await writer.close()
            await reader.close()
