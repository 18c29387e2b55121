"""Which feed a process opens: the in-process ring, or the Redis stream every worker shares."""

from __future__ import annotations

from gateway.config import Settings
from gateway.feed import Feed, MemoryFeed


def open_feed(settings: Settings, *, worker: int | None = None) -> Feed:
    """The feed a gateway process (or the `--workers` supervisor) publishes to and reads.

    In-process without `GATEWAY_REDIS_URL`; with it a Redis stream shared by every worker
    and host (so the supervisor's console sees every worker's events). Whoever opens a
    feed must `await feed.close()` on the way out, on the loop that used it: a Redis feed
    flushes what it still holds then, and closes its connections."""
    if not settings.redis_url:
        return MemoryFeed(worker=worker)
    from gateway.feed_redis import redis_feed_from_settings  # the optional `redis` extra

    return redis_feed_from_settings(settings, worker=worker)
