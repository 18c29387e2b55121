"""The factory's cleanup contexts, each alone on a bare app holding only the keys it reads.

Started and cleaned up through `web.AppRunner` without a site: nothing listens, and no
request reaches Ortto (the upstream URL is never called: the spool stays empty)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import delivery_ctx, relay_ctx, spool_ctx, upstream_ctx
from gateway.config import Delivery, Settings
from gateway.feed import MemoryFeed
from gateway.keys import CLIENT, CLOCK, DELIVERY, FEED, LIFECYCLE, METRICS, RELAY, SETTINGS, SPOOL
from gateway.metrics import Metrics
from gateway.relay import Relay
from gateway.spool import Spool, SpoolClosed, in_use
from gateway.state import Lifecycle
from gateway.upstream import OrttoClient
from tests.conftest import base_settings

# Never called: each test leaves the spool empty and sends nothing.
UNUSED_UPSTREAM = "http://127.0.0.1:9"
DELIVERY_TASKS = ("ortto-gateway-delivery", "ortto-gateway-gauges")

Context = Callable[[web.Application], AsyncIterator[None]]


def bare_app(settings: Settings) -> web.Application:
    """An app with what `create_app` sets before start-up, and no context."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
    app[CLOCK] = time.time
    app[FEED] = MemoryFeed()
    app[LIFECYCLE] = Lifecycle()
    return app


@asynccontextmanager
async def started(app: web.Application, *contexts: Context) -> AsyncIterator[web.Application]:
    """`app` with `contexts` started; cleaned up on the way out."""
    app.cleanup_ctx.extend(contexts)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield app
    finally:
        await runner.cleanup()


def running(names: tuple[str, ...]) -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()} & set(names)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return base_settings(tmp_path, UNUSED_UPSTREAM)


async def test_upstream_context_closes_its_session(settings: Settings) -> None:
    async with started(bare_app(settings), upstream_ctx) as app:
        client = app[CLIENT]
        assert isinstance(client, OrttoClient)
        assert client.endpoint == settings.upstream_endpoint
        session: aiohttp.ClientSession = client._session  # what the context owns
        assert not session.closed
    assert session.closed


async def test_spool_context_opens_and_closes_the_spool_file(settings: Settings) -> None:
    async with started(bare_app(settings), spool_ctx) as app:
        spool = app[SPOOL]
        assert spool.path == settings.spool_path
        assert await spool.list_dead_letters() == []  # open: it answers
        assert Path(settings.spool_path).exists()
        mode = app[METRICS].registry.get_sample_value(
            "ortto_gateway_spool_commit_mode", {"mode": settings.spool_commit}
        )
        assert mode == 1
    with pytest.raises(SpoolClosed):
        await spool.list_dead_letters()
    assert not in_use(settings.spool_path)  # let go of: the next gateway may take it


async def test_delivery_context_starts_and_stops_delivery(settings: Settings) -> None:
    async with (
        aiohttp.ClientSession() as session,
        Spool(settings.spool_path, commit_on="loop") as spool,
    ):
        app = bare_app(settings)
        app[SPOOL] = spool
        app[CLIENT] = OrttoClient(session, UNUSED_UPSTREAM, settings.api_key, timeout=1.0)
        async with started(app, delivery_ctx):
            assert app[DELIVERY] is not None
            assert running(DELIVERY_TASKS) == set(DELIVERY_TASKS)
        assert running(DELIVERY_TASKS) == set()
        assert await spool.list_dead_letters() == []  # still open: not the context's to close


@pytest.mark.parametrize("delivery", ["queue", "sync"])
async def test_relay_context_sets_the_relay_and_marks_the_app_started(
    settings: Settings, delivery: Delivery
) -> None:
    settings = replace(settings, delivery=delivery)
    # Into the spool, or straight through the Ortto client: what each mode's sink needs.
    needs = (upstream_ctx, spool_ctx) if delivery == "queue" else (upstream_ctx,)
    app = bare_app(settings)
    async with started(app, *needs, relay_ctx):
        assert isinstance(app[RELAY], Relay)
        assert app[LIFECYCLE].ready
    assert not in_use(settings.spool_path)
