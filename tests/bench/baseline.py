"""The baseline: a bare aiohttp app doing the least the gateway must do per request.

It reads the same body, parses it with the same JSON library (orjson), and answers the
same 202 body, on the same event loop as `ortto-gateway serve` (uvloop when installed,
else asyncio's default) with the same runner options (no access log).
Everything the gateway does on top (validation, limits, enrichment, the spool, metrics,
logs, delivery) shows up as the distance from this app's throughput.

    python -m tests.bench.baseline --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web

from tests.bench.workload import PATH

QUEUED = {"status": "queued", "person_status": "queued"}


async def create_activities(request: web.Request) -> web.Response:
    """Parse the body and answer one `queued` entry per activity, as the gateway does."""
    data = orjson.loads(await request.read())
    activities = data.get("activities") if isinstance(data, dict) else None
    count = len(activities) if isinstance(activities, list) else 1
    return web.Response(
        status=202,
        body=orjson.dumps({"activities": [QUEUED] * count}),
        content_type="application/json",
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post(PATH, create_activities)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int) -> None:
    # Connections under load are never idle, so keep-alive timeouts play no part.
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def run(coro: Coroutine[Any, Any, None]) -> None:
    """The same loop choice as `gateway.cli`: uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    run(serve(host, int(port)))


if __name__ == "__main__":
    main()
