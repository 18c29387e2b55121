"""Running the gateway: the public and metrics listeners, signals and a graceful drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import compiled
from gateway.app import create_app, create_metrics_app
from gateway.config import ConfigError, HostPort, Settings
from gateway.console import warn_console_off
from gateway.console_core import console_off_reason
from gateway.console_state import Console, PublicAddress
from gateway.feed_open import open_feed
from gateway.keys import DELIVERY, LIFECYCLE
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


# Why a listener cannot bind, and what to do: the usual causes a newcomer meets.
_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there",
    errno.EACCES: "ports below 1024 need privileges",
    errno.EADDRNOTAVAIL: "this machine has no such address",
}


def listen_error(setting: str, where: HostPort, exc: OSError, fix: str = "") -> ConfigError:
    """One line naming the setting (or flag), the address, the cause and how to change it.

    `fix` says how to change the setting; by default, "set SETTING to another port".
    """
    # asyncio's strerror is a sentence quoting the address; the errno's text is enough.
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    hint = _BIND_HINTS.get(exc.errno or 0)
    advice = fix or f"set {setting} to another port"
    detail = f"{hint}; {advice}" if hint else advice
    return ConfigError(f"{setting} {where}: {reason} ({detail})")


async def start_site(
    runner: web.AppRunner,
    where: HostPort,
    *,
    setting: str,
    fix: str = "",
    reuse_port: bool = False,
) -> web.TCPSite:
    """Bind one listener; a port in use (or any bind error) is a ConfigError naming `setting`."""
    site = web.TCPSite(
        runner,
        where.host,
        where.port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )
    try:
        await site.start()
    except OSError as exc:
        raise listen_error(setting, where, exc, fix) from None
    return site


def bind_socket(where: HostPort, setting: str, fix: str = "") -> socket.socket:
    """A socket bound to `where` (its first address) for `web.run_app(sock=...)`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            where.host, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise listen_error(setting, where, exc, fix) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise listen_error(setting, where, exc, fix) from None
    return sock


def check_bindable(
    where: HostPort, setting: str, fix: str = "", *, reuse_port: bool = False
) -> None:
    """Bind `where` (without listening) and let go: a port in use is one clear error
    before anything starts. Not listening: no connection is ever routed to this socket.
    """
    try:
        infos = socket.getaddrinfo(
            where.host, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:  # as `--workers` bind: they share the port
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        raise listen_error(setting, where, exc, fix) from None


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
    listen_setting: str = "GATEWAY_LISTEN",
    listen_fix: str = "",
) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain and exit.

    A listener that cannot bind raises ConfigError naming its setting (`listen_setting`
    and `listen_fix` for the public one: the demo's is a flag).

    As one of `--workers N` (`worker` set), the public port is shared with SO_REUSEPORT
    and the metrics listener is left to the supervisor, which reads every worker's
    metrics from the multiprocess directory.
    """
    # Checked before the app opens its spool and logs: a port in use is then the only line.
    check_bindable(settings.listen, listen_setting, listen_fix, reuse_port=worker is not None)
    if worker is None:
        check_bindable(settings.metrics_listen, "GATEWAY_METRICS_LISTEN")
    registry = CollectorRegistry()
    metrics = Metrics(registry, settings.activities, process_metrics=worker is None)
    # No console, no events: the relay and delivery then build none.
    feed = open_feed(settings, worker=worker) if console_off_reason(settings) is None else None
    app = create_app(settings, metrics=metrics, feed=feed)
    for prefix, sub in (extra_apps or {}).items():
        # Before the sub-app: its resource would take the bare prefix too, and 404 it.
        app.router.add_get(prefix, _redirect_to(prefix + "/"))
        app.add_subapp(prefix, sub)
    runner = web.AppRunner(app, handle_signals=False, **runner_options(settings))
    # The console's test button posts to the public listener: its port is known once bound.
    public = PublicAddress(settings.listen.host)
    console = None
    if worker is None and feed is not None:
        console = Console(settings, feed, registry, public)
    elif worker is None:
        warn_console_off(settings)
    metrics_runner = web.AppRunner(create_metrics_app(registry, console=console), access_log=None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        await metrics_runner.setup()
        await start_site(
            runner,
            settings.listen,
            setting=listen_setting,
            fix=listen_fix,
            reuse_port=worker is not None,
        )
        metrics_port = 0
        if worker is None:
            await start_site(
                metrics_runner, settings.metrics_listen, setting="GATEWAY_METRICS_LISTEN"
            )
            metrics_port = bound_port(metrics_runner)
        public_port = public.port = bound_port(runner)
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
                    "compiled": compiled.summary(),
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
        metrics.tally.flush()  # the last turn's counts (a worker's file outlives it)
        if feed is not None:
            await feed.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped")


def _redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(location)

    return redirect


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host` (for tests and the demo)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
