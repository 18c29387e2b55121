"""The in-process feed and the console's test marker."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path

from gateway.feed import (
    TEST_TOKEN_CHARS,
    FeedEvent,
    Forwarded,
    MemoryFeed,
    console_test_token,
    is_test,
    mask_strings,
)
from gateway.feed_open import open_feed
from tests.conftest import base_settings

DEADLINE = 10.0


def event(n: int) -> FeedEvent:
    return {"kind": "request", "time": float(n), "outcome": "refused", "reason": "busy"}


def forwarded(key: str) -> Forwarded:
    return {"key": key, "time": 0.0, "body": {"key": key}, "status": 200, "answer": {}}


async def test_the_ring_keeps_the_newest_events_in_order() -> None:
    feed = MemoryFeed(max_events=3, worker=2)
    for n in range(5):
        feed.publish(event(n))
    recent = await feed.recent()
    assert [e["time"] for e in recent] == [2.0, 3.0, 4.0]
    assert [e["seq"] for e in recent] == [3, 4, 5]
    assert [e["id"] for e in recent] == ["3", "4", "5"]
    assert all(e["worker"] == 2 for e in recent)
    assert [e["seq"] for e in await feed.recent(2)] == [4, 5]
    assert await feed.recent(0) == []


async def test_follow_resumes_after_a_seq_and_wakes_on_publish() -> None:
    feed = MemoryFeed()
    for n in range(3):
        feed.publish(event(n))
    follower = feed.follow(after=1)
    assert isinstance(follower, AsyncGenerator)  # closed below
    assert (await asyncio.wait_for(anext(follower), DEADLINE))["seq"] == 2
    assert (await asyncio.wait_for(anext(follower), DEADLINE))["seq"] == 3
    waiting = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)  # let it reach its wait; the assertion below does not time it
    assert not waiting.done()
    feed.publish(event(9))
    assert (await asyncio.wait_for(waiting, DEADLINE))["time"] == 9.0
    # An event's `id` resumes as its `seq` does.
    again = feed.follow(after="3")
    assert isinstance(again, AsyncGenerator)
    assert (await asyncio.wait_for(anext(again), DEADLINE))["seq"] == 4
    await follower.aclose()
    await again.aclose()


async def test_forwarded_bodies_are_bounded_least_recently_recorded_first() -> None:
    feed = MemoryFeed(max_forwarded=2)
    for key in ("a", "b", "a", "c"):
        feed.record_forward(key, functools.partial(forwarded, key))
    assert await feed.forwarded("b") is None
    assert await feed.forwarded("a") is not None
    assert await feed.forwarded("c") is not None


def test_the_test_token_is_stable_and_depends_on_the_key(tmp_path: Path) -> None:
    settings = base_settings(tmp_path, "http://127.0.0.1:1")
    token = console_test_token(settings)
    assert len(token) == TEST_TOKEN_CHARS and int(token, 16) >= 0
    assert console_test_token(replace(settings)) == token  # every worker agrees
    other = replace(settings, api_key="another-key-0123456789")
    assert console_test_token(other) != token
    assert settings.api_key not in token
    assert is_test(token, settings)
    assert not is_test(token, other)
    assert not is_test(None, settings) and not is_test("", settings)


def test_mask_strings_reaches_every_string() -> None:
    value = {"a": ["x", {"b": "y"}], "n": 1, "t": True, "z": None}
    assert mask_strings(value, str.upper) == {"a": ["X", {"b": "Y"}], "n": 1, "t": True, "z": None}


def test_open_feed_is_in_process_without_redis(tmp_path: Path) -> None:
    settings = base_settings(tmp_path, "http://127.0.0.1:1")
    assert isinstance(open_feed(settings, worker=1), MemoryFeed)
