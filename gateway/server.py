"""Running the gateway: the public and metrics listeners, signals and a graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import DELIVERY, create_app, create_metrics_app
from gateway.config import HostPort, Settings
from gateway.keys import LIFECYCLE
from gateway.metrics import Metrics

log = logging.getLogger("gateway.server")


def runner_options(settings: Settings) -> dict[str, Any]:
    """Options of the public listener's runner; tests' servers use them too (conftest)."""
    return {
        "access_log": None,
        "shutdown_timeout": settings.drain_timeout,
        # aiohttp closes a connection whose request headers have not all arrived when
        # this runs out (it starts when the connection opens or the last answer went),
        # so it is also the header read timeout that cuts slowloris clients off; the
        # body has its own deadline in the handler.
        "keepalive_timeout": settings.read_timeout,
        # The handler reads bodies as sent and inflates gzip and deflate itself, bounded
        # (gateway/body.py): aiohttp's parser would inflate them eagerly, unbounded, on
        # the event loop, even after the answer and on paths that never read the body.
        "auto_decompress": False,
        # A request answered before its body had all come gets `Connection: close`, and
        # the connection is closed after the answer: aiohttp would otherwise read (and
        # discard) the rest for up to 10 s.
        "lingering_time": 0,
    }


async def start_site(
    runner: web.AppRunner, where: HostPort, *, reuse_port: bool = False
) -> web.TCPSite:
    """Bind one listener."""
    site = web.TCPSite(
        runner,
        where.host,
        where.port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )
    await site.start()
    return site


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's first site listens on (useful with port 0)."""
    for server in runner.sites:
        srv = getattr(server, "_server", None)
        if srv is not None and srv.sockets:
            port: int = srv.sockets[0].getsockname()[1]
            return port
    raise RuntimeError("runner has no bound site")


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int], Awaitable[None] | None] | None = None,
    extra_apps: dict[str, web.Application] | None = None,
    worker: int | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain and exit.

    As one of `--workers N` (`worker` set), the public port is shared with SO_REUSEPORT
    and the metrics listener is left to the supervisor, which reads every worker's
    metrics from the multiprocess directory.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry, settings.activities, process_metrics=worker is None)
    app = create_app(settings, metrics=metrics)
    for prefix, sub in (extra_apps or {}).items():
        app.add_subapp(prefix, sub)
        app.router.add_get(prefix, _redirect_to(prefix + "/"))
    runner = web.AppRunner(app, handle_signals=False, **runner_options(settings))
    metrics_runner = web.AppRunner(create_metrics_app(registry), access_log=None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        await metrics_runner.setup()
        await start_site(runner, settings.listen, reuse_port=worker is not None)
        metrics_port = 0
        if worker is None:
            await start_site(metrics_runner, settings.metrics_listen)
            metrics_port = bound_port(metrics_runner)
        public_port = bound_port(runner)
        log.info(
            "listening",
            extra={
                "data": {
                    "public": f"{settings.listen.host}:{public_port}",
                    "metrics": f"{settings.metrics_listen.host}:{metrics_port}"
                    if metrics_port
                    else None,
                    "upstream": settings.upstream_base,
                    "delivery": settings.delivery,
                    "worker": worker,
                }
            },
        )
        if on_ready is not None:
            result = on_ready(public_port, metrics_port)
            if result is not None:
                await result
        await stop.wait()
        log.info("shutting down: draining", extra={"data": {"timeout": settings.drain_timeout}})
        # The listeners stay open while the spool drains: new requests and /readyz get a
        # 503 with Retry-After (a load balancer or the shim tries again elsewhere or
        # later) rather than a refused connection, which nginx would answer with a 502.
        app[LIFECYCLE].draining = True
        delivery = app.get(DELIVERY)
        if delivery is not None:
            await delivery.drain(settings.drain_timeout)
    finally:
        await runner.cleanup()
        await metrics_runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped")


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location)

    return redirect


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host` (for tests and the demo)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
