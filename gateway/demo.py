"""`ortto-gateway demo`: the gateway, the sandbox upstream and a demo page in one process."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config import HostPort, Settings, load_settings
from gateway.keys import DEMO_STATE
from gateway.sandbox import SandboxState, create_sandbox_app
from gateway.server import bound_port, serve

DEMO_ACTIVITIES = "act:cm:login,act:cm:plan-viewed"
DEMO_KEY = "demo-sandbox-key"
PAGE = Path(__file__).parent / "static" / "demo.html"
# How to move the demo off a port in use, said in the one-line error.
DEMO_LISTEN_FIX = "give --listen another port, e.g. make demo PORT=8090"


def demo_settings(where: HostPort, upstream: str, spool_dir: str) -> Settings:
    """Settings of the demo gateway: the sandbox as upstream, a throw-away spool."""
    return load_settings(
        {
            "GATEWAY_API_KEY": DEMO_KEY,
            "GATEWAY_UPSTREAM_URL": upstream,
            "GATEWAY_ACTIVITIES": DEMO_ACTIVITIES,
            "GATEWAY_LISTEN": f"{where.host}:{where.port}",
            "GATEWAY_METRICS_LISTEN": f"{where.host}:0",
            "GATEWAY_SPOOL_PATH": str(Path(spool_dir) / "spool.sqlite3"),
            "GATEWAY_BATCH_MAX_WAIT": "100ms",
            "GATEWAY_DRAIN_TIMEOUT": "3s",
        }
    )


def create_demo_app(state: SandboxState) -> web.Application:
    """The `/demo` pages: the page itself and what the sandbox received."""
    app = web.Application()
    app[DEMO_STATE] = state
    page = PAGE.read_bytes()

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def received(request: web.Request) -> web.Response:
        try:
            since = max(0, int(request.query.get("since", "0")))
        except ValueError:
            since = 0
        state = request.app[DEMO_STATE]
        items = [
            {
                "index": i,
                "activity_id": a.activity_id,
                "email": a.email,
                "source_ip": a.source_ip,
                "created": a.created,
                "key": a.key,
                "name": _name(a.activity),
                "attributes": a.activity.get("attributes") or {},
            }
            for i, a in enumerate(state.activities[since : since + 200], start=since)
        ]
        return web.json_response({"total": len(state.activities), "activities": items})

    app.router.add_get("/", index, name="demo")
    app.router.add_get("/received", received, name="demo-received")
    return app


def _name(activity: dict[str, Any]) -> str:
    """The person's first and last name as sent (`str::first`, `str::last`), or ""."""
    fields = activity.get("fields")
    if not isinstance(fields, dict):
        return ""
    parts = (fields.get("str::first"), fields.get("str::last"))
    return " ".join(p for p in parts if isinstance(p, str) and p)


async def run_demo(where: HostPort, *, stop: asyncio.Event | None = None) -> None:
    """Run until Ctrl-C: sandbox on a free loopback port, gateway on `where`."""
    state = SandboxState(api_key=DEMO_KEY)
    sandbox_runner = web.AppRunner(create_sandbox_app(state), access_log=None)
    await sandbox_runner.setup()
    await web.TCPSite(sandbox_runner, "127.0.0.1", 0).start()
    upstream = f"http://127.0.0.1:{bound_port(sandbox_runner)}"
    try:
        with tempfile.TemporaryDirectory(prefix="ortto-gateway-demo-") as spool_dir:
            settings = demo_settings(where, upstream, spool_dir)

            def ready(port: int, metrics_port: int) -> None:
                host = where.host if ":" not in where.host else f"[{where.host}]"
                print(
                    f"\n  ortto-gateway demo\n"
                    f"  demo page:  http://{host}:{port}/demo/\n"
                    f"  endpoint:   http://{host}:{port}/v1/activities/create\n"
                    f"  shim:       http://{host}:{port}/ortto-relay.js\n"
                    f"  metrics:    http://{host}:{metrics_port}/metrics\n"
                    f"  sandbox:    {upstream}/_sandbox/received\n"
                    f"  Ctrl-C stops.\n",
                    file=sys.stderr,
                    flush=True,
                )

            await serve(
                settings,
                stop=stop,
                on_ready=ready,
                extra_apps={"/demo": create_demo_app(state)},
                listen_setting="--listen",
                listen_fix=DEMO_LISTEN_FIX,
            )
    finally:
        await sandbox_runner.cleanup()
    print("  demo stopped.", file=sys.stderr, flush=True)
