"""Every `web.AppKey` of the gateway's apps, in one leaf module.

Nothing of the gateway is imported here when it runs, so the factory, its cleanup
contexts, the handlers, the middlewares, the console and the demo read the same keys
without importing one another (`tests/test_imports.py` holds both to that).

What handlers and the shell use of a value is typed by a small Protocol declared here
(`Readiness`, `Submits`, `Preflight`, `Drains`). The values that contexts hand on to
classes wanting the class itself (the spool and the Ortto client to delivery and the
sinks, the admission to `read_body`) and the large records (settings, metrics, the
console, the sandbox's state) are named under `TYPE_CHECKING`: read by mypy, never
imported at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from gateway.admission import Admission
    from gateway.config import Settings
    from gateway.console_state import Console
    from gateway.feed import Feed
    from gateway.metrics import Metrics
    from gateway.sandbox import SandboxState
    from gateway.spool import Spool
    from gateway.upstream import OrttoClient


class Readiness(Protocol):
    """The process's lifecycle as the health endpoints and the shell see it."""

    started: bool
    draining: bool

    @property
    def ready(self) -> bool: ...


class Reply(Protocol):
    """What the relay answers a request with: status, Ortto-shaped body, Retry-After."""

    @property
    def status(self) -> int: ...
    @property
    def body(self) -> dict[str, Any]: ...
    @property
    def retry_after(self) -> int | None: ...
    @property
    def log(self) -> dict[str, Any] | None: ...


class Submits(Protocol):
    """The relay, as the activities handler calls it."""

    async def submit(
        self,
        data: Any,
        client_ip: str | None,
        request_id: str,
        log_data: dict[str, Any] | None = None,
        *,
        test: bool = False,
    ) -> Reply: ...


class Preflight(Protocol):
    """The CORS policy, as the preflight handler asks it."""

    def lists(self, origin: str) -> bool: ...

    def preflight_headers(
        self, origin: str, request_method: str | None, request_headers: str | None
    ) -> Mapping[str, str] | None: ...


class Drains(Protocol):
    """Delivery, as the server drains it on the way out (its context stops it)."""

    async def drain(self, drain_timeout: float) -> None: ...


# Set by `create_app` before start-up.
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")  # wall time, injected by tests
LIFECYCLE: web.AppKey[Readiness] = web.AppKey("lifecycle")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")
FEED: web.AppKey[Feed] = web.AppKey("feed")
CORS: web.AppKey[Preflight] = web.AppKey("cors")
# Set by the cleanup contexts (`gateway.app`), each by the one that owns the resource.
CLIENT: web.AppKey[OrttoClient] = web.AppKey("ortto_client")
SPOOL: web.AppKey[Spool] = web.AppKey("spool")  # queue mode only
DELIVERY: web.AppKey[Drains] = web.AppKey("delivery")  # queue mode only
RELAY: web.AppKey[Submits] = web.AppKey("relay")
# The metrics listener's app, when the console is on (`gateway.console.mount_console`).
CONSOLE: web.AppKey[Console] = web.AppKey("console")
# The demo's `/demo` app: what the sandbox upstream received (`gateway.demo`).
DEMO_STATE: web.AppKey[SandboxState] = web.AppKey("demo_sandbox_state")
