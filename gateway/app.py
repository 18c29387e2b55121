"""The application factory: wires settings, resources, middlewares and routes."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway import handlers
from gateway.admission import Admission
from gateway.client_ip import TrustedProxies, parse_networks
from gateway.config import ACTIVITIES_PATH, Settings
from gateway.console import mount_console
from gateway.console_core import console_off_reason
from gateway.console_state import Console
from gateway.cors import CorsPolicy
from gateway.delivery import Delivery
from gateway.feed import Feed, MemoryFeed
from gateway.keys import (
    ADMISSION,
    CLIENT,
    CLOCK,
    CORS,
    DELIVERY,
    FEED,
    LIFECYCLE,
    METRICS,
    RELAY,
    SETTINGS,
    SPOOL,
)
from gateway.limits import FallbackStore, Limiter, LimitStore, MemoryStore
from gateway.metrics import Metrics
from gateway.middlewares import make_middlewares
from gateway.relay import Relay
from gateway.shim import ShimFile
from gateway.sinks import ForwardSink, Sink, SpoolSink
from gateway.spool import Spool
from gateway.state import Lifecycle
from gateway.upstream import OrttoClient
from gateway.upstream_rate import upstream_pacer

log = logging.getLogger(__name__)

# Keep-alive connections to Ortto: one per in-flight batch is plenty.
UPSTREAM_CONNECTIONS = 32


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    feed: Feed | None = None,
) -> web.Application:
    """The public application; resources open in `cleanup_ctx` in the order of the flow.

    `feed` is where the console's events go (`gateway.feed_open.open_feed`); by default an
    in-process ring, and none at all when the console is off (no event is then built)."""
    metrics = metrics or Metrics(registry, settings.activities)
    cors = CorsPolicy(settings.allowed_origins)
    trusted = TrustedProxies(parse_networks(settings.trusted_proxies))
    admission = Admission(
        settings.max_concurrent, settings.max_body_readers, on_readers=metrics.body_readers.set
    )
    app = web.Application(
        middlewares=make_middlewares(cors, trusted, metrics, admission),
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CLOCK] = clock
    app[LIFECYCLE] = Lifecycle()
    app[ADMISSION] = admission
    if feed is None and console_off_reason(settings) is None:
        feed = MemoryFeed()
    if feed is not None:  # else no console reads events: none are built
        app[FEED] = feed
    app[CORS] = cors

    app.cleanup_ctx.append(upstream_ctx)
    if settings.delivery == "queue":
        app.cleanup_ctx.append(spool_ctx)
        app.cleanup_ctx.append(delivery_ctx)
    app.cleanup_ctx.append(relay_ctx)
    app.on_shutdown.append(_start_draining)

    app.router.add_post(
        ACTIVITIES_PATH,
        handlers.create_activities,
        name="activities",
        expect_handler=handlers.expect_continue,
    )
    app.router.add_route(
        "OPTIONS", ACTIVITIES_PATH, handlers.preflight, name="activities-preflight"
    )
    shim = handlers.ShimAsset(ShimFile.load())
    app.router.add_get(handlers.SHIM_ROUTE, shim.handle, name="shim")
    app.router.add_get("/", handlers.index, name="index")
    app.router.add_get("/healthz", handlers.healthz, name="healthz")
    app.router.add_get("/readyz", handlers.readyz, name="readyz")
    return app


# The cleanup contexts, one per resource. Each reads what it needs from the app's keys
# (`gateway.keys`) and sets the key of what it owns, so each runs alone on an app that
# holds those keys (tests/test_app_contexts.py). `create_app` appends them in this order.


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one HTTP session to Ortto, and the client over it: `CLIENT`."""
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, raise_for_status=False) as session:
        app[CLIENT] = OrttoClient(
            session,
            settings.upstream_endpoint,
            settings.api_key,
            timeout=settings.upstream_timeout,
            secrets=settings.secrets,
        )
        yield


async def spool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The spool file, opened for this process alone and closed on the way out: `SPOOL`."""
    settings = app[SETTINGS]
    spool = Spool(
        settings.spool_path,
        max_rows=settings.spool_max_rows,
        max_bytes=settings.spool_max_bytes,
        commit_on=settings.spool_commit,
        exclusive=True,  # one gateway per spool file: a second one is refused
    )
    await spool.open()
    log.info("spool open", extra={"data": {"path": spool.path, "commit_on": spool.commit_on}})
    app[METRICS].spool_commit_mode.labels(spool.commit_on).set(1)
    app[SPOOL] = spool
    try:
        yield
    finally:
        await spool.close()


async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delivery from `SPOOL` through `CLIENT`, started, and stopped (drained for at most
    the drain timeout) on the way out: `DELIVERY`."""
    settings, metrics = app[SETTINGS], app[METRICS]
    pacer = upstream_pacer(settings, metrics)  # shared by every host with Redis
    delivery = Delivery(
        app[SPOOL],
        app[CLIENT],
        metrics,
        rate=settings.upstream_rate,
        concurrency=settings.upstream_concurrency,
        batch_max_wait=settings.batch_max_wait,
        clock=app[CLOCK],
        feed=app.get(FEED),
        personal=settings.console_personal,
        pacer=pacer,
    )
    app[DELIVERY] = delivery
    delivery.start()
    try:
        yield
    finally:
        try:
            await delivery.stop(settings.drain_timeout)
        finally:
            await pacer.close()


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """The limiter's store and the relay over it, into `SPOOL` (queue mode) or straight
    through `CLIENT`: `RELAY`. The last context: the app is started once it has run."""
    settings, metrics, clock = app[SETTINGS], app[METRICS], app[CLOCK]
    store = limiter_store(settings, metrics)
    if isinstance(store, FallbackStore):
        await store.warm_up()
    sink: Sink = (
        SpoolSink(app[SPOOL], metrics)
        if settings.delivery == "queue"
        else ForwardSink(app[CLIENT], metrics)
    )
    app[RELAY] = Relay(
        settings, Limiter(store, clock=clock), sink, metrics, clock=clock, feed=app.get(FEED)
    )
    app[LIFECYCLE].started = True
    try:
        yield
    finally:
        await store.close()


def limiter_store(settings: Settings, metrics: Metrics) -> LimitStore:
    """The in-process store, or Redis with the in-process store for its on-error policy."""
    local = MemoryStore(max_keys=settings.limiter_max_keys, on_evict=metrics.limiter_evictions.inc)
    if not settings.redis_url:
        return local
    from gateway.limits.redis import redis_store_from_url  # the optional `redis` extra

    shared = redis_store_from_url(
        settings.redis_url,
        prefix=settings.redis_prefix,
        timeout=settings.limiter_timeout,
        # Every replica shares the API key: a secret derived from it keys the hashes of
        # person keys and IPs, so a Redis dump cannot be checked against guessed emails.
        secret=hashlib.sha256(b"ortto-gw limiter\0" + settings.api_key.encode()).digest(),
    )
    return FallbackStore(
        shared, local, settings.limiter_on_error, on_error=metrics.limiter_errors.inc
    )


async def _start_draining(app: web.Application) -> None:
    app[LIFECYCLE].draining = True


def create_metrics_app(
    registry: CollectorRegistry, *, console: Console | None = None
) -> web.Application:
    """The metrics listener's app: `GET /metrics` and the operator console (when given and
    on, see `gateway.console`), never on the public listener."""
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    if console is not None:
        mount_console(app, console)
    return app
