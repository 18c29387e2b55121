"""What the operator console reads (`gateway.console` serves it): one record per console."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.console_core import new_secret
from gateway.feed import Feed, FeedEvent
from gateway.spool.files import spool_files


@dataclass
class PublicAddress:
    """Where the public listener is bound: known only once it listens (port 0 in tests)."""

    host: str
    port: int | None = None


@dataclass
class Console:
    """What the console reads: settings, the feed, the metrics registry, the public
    listener (for the test button) and the spool files (for dead letters)."""

    settings: Settings
    feed: Feed
    registry: CollectorRegistry
    public: PublicAddress
    spool_files: Callable[[], list[str]] | None = None
    # Per process: signs session tokens and login cookies (a restart logs everyone out).
    secret: str = field(default_factory=new_secret)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    streams: set[asyncio.Queue[FeedEvent | None]] = field(default_factory=set)
    session: aiohttp.ClientSession | None = None

    def files(self) -> list[str]:
        """The spool files whose dead letters the console shows."""
        if self.spool_files is not None:
            return self.spool_files()
        return spool_files(self.settings.spool_path)
