"""The operator console: `/console` on the private (metrics) listener, never the public one.

One page (plain HTML, JS and CSS, no build step) over a few JSON routes and a stream of
server-sent events read from the feed (`gateway.feed`): recent requests and why each was
refused, what Ortto received and answered for one activity, the delivery state (from the
metrics registry, so one process and `--workers` read the same numbers), dead letters
(list, inspect, replay, purge: `gateway.deadletters`, as the CLI), the effective settings
(masked) and the activity catalogue with a "send a test activity" button.

Security: every route is off (404) unless the console is on (`console_off_reason`);
with GATEWAY_CONSOLE_TOKEN every route needs it (a login form sets an HttpOnly cookie,
or `Authorization: Bearer`); every POST needs the per-session token the page carries
(derived from an HttpOnly SameSite=Strict session cookie), so another site cannot make
an operator's browser replay or purge. No response holds the API key or a full email
(unless GATEWAY_CONSOLE_PERSONAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway import deadletters
from gateway.config import ACTIVITIES_PATH, Settings, describe, without_secrets
from gateway.console_core import (
    SSE_HEARTBEAT,
    console_off_reason,
    delivery_state,
    derive,
    host_allowed,
    host_of,
    last_event_id,
    local_address,
    mask_emails,
    new_secret,
    same,
    sse_event,
    test_activity,
)
from gateway.console_state import Console
from gateway.errors import new_request_id
from gateway.feed import TEST_HEADER, Feed, FeedEvent, console_test_token
from gateway.keys import CONSOLE

log = logging.getLogger("gateway.console")

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "gw_console_session"
AUTH_COOKIE = "gw_console_auth"
CSRF_HEADER = "X-Console-Token"
# A comment this often keeps proxies and the browser from closing an idle stream.
HEARTBEAT_SECONDS = 15.0
# Events sent to a new stream before it follows; the page keeps about as many rows.
INITIAL_EVENTS = 500
# Events queued for one slow stream: past this the stream ends, and the page reconnects
# and resumes from its Last-Event-ID (nothing is skipped without the page knowing).
STREAM_BACKLOG = 1000
# Open streams at once; more get a 503 (each holds a task, a queue, maybe a Redis read).
MAX_STREAMS = 20
# Dead-letter ids one replay or purge may name, and their range (SQLite's INTEGER).
MAX_IDS = 1000
MAX_ID = 2**63 - 1
# Last Ortto answers shown in the delivery panel.
RECENT_DELIVERIES = 20
DEAD_LETTER_LIMIT = 200
# A login lasts this long (seconds); a restart of the gateway ends it sooner.
LOGIN_MAX_AGE = 12 * 3600
MAX_EMAIL_CHARS = 254
TEST_TIMEOUT = 10.0
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def warn_console_off(settings: Settings) -> None:
    """Say why the console is off, unless it was turned off on purpose."""
    reason = console_off_reason(settings)
    if reason is not None and settings.console:
        log.warning("operator console off", extra={"data": {"reason": reason}})


def mount_console(app: web.Application, console: Console) -> bool:
    """Add the console's routes to the metrics app; False (and a warning) when it is off."""
    if console_off_reason(console.settings) is not None:
        warn_console_off(console.settings)
        return False
    app[CONSOLE] = console
    app.cleanup_ctx.append(_client_ctx)
    app.on_shutdown.append(_close_streams)
    get, post = app.router.add_get, app.router.add_post
    get("/console", _guarded(_page), name="console")
    get("/console/", _guarded(_page))
    post("/console/login", _login, name="console-login")
    get("/console/console.js", _guarded(_asset("console.js", "application/javascript")))
    get("/console/console.css", _asset("console.css", "text/css"))  # the login page's too
    get("/console/events", _guarded(_events), name="console-events")
    get("/console/api/state", _guarded(_state))
    get("/console/api/forwarded/{key}", _guarded(_forwarded))
    get("/console/api/dead-letters", _guarded(_dead_letters))
    post("/console/api/dead-letters/replay", _guarded(_replay, post=True))
    post("/console/api/dead-letters/purge", _guarded(_purge, post=True))
    post("/console/api/test-activity", _guarded(_test_activity, post=True))
    return True


# -- access: the optional console token, the per-session token of POSTs


def _logged_in(request: web.Request) -> bool:
    console = request.app[CONSOLE]
    token = console.settings.console_token
    if not token or _bearer(request):
        return True
    return same(request.cookies.get(AUTH_COOKIE), derive(console.secret, "login", token))


def _session_token(request: web.Request, session: str) -> str:
    return derive(request.app[CONSOLE].secret, "csrf", session)


def _bearer(request: web.Request) -> bool:
    """Logged in by `Authorization: Bearer` (a script: a browser never adds it by itself)."""
    token = request.app[CONSOLE].settings.console_token
    auth = request.headers.get("Authorization", "")
    return token is not None and auth.startswith("Bearer ") and same(auth[7:].strip(), token)


def _host_refusal(request: web.Request) -> str | None:
    """Why the request's Host (and a POST's Origin) cannot be the console's, or None.

    Against DNS rebinding: a page of another site whose name now resolves to 127.0.0.1
    would otherwise be same-origin with a loopback console. Its requests carry that
    name as Host; an IP address, `localhost` or a GATEWAY_CONSOLE_HOSTS name cannot be
    another site's."""
    host = host_of(request.host)
    if not host_allowed(host, request.app[CONSOLE].settings.console_hosts):
        return f"console: Host {host[:64]!r} is not this console's (GATEWAY_CONSOLE_HOSTS)"
    origin = request.headers.get("Origin")
    if (
        request.method == "POST"
        and origin is not None
        and origin.partition("://")[2].lower() != request.host.lower()
    ):
        return "console: a POST from another origin"
    return None


def _guarded(handler: Handler, *, post: bool = False) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = _host_refusal(request)
        if refusal is not None:
            return _error(403, refusal)
        if not _logged_in(request):
            if request.path.rstrip("/") == "/console":
                return _login_page(status=401)
            return _error(401, "console: log in first (GATEWAY_CONSOLE_TOKEN)")
        if post and not _bearer(request):
            session = request.cookies.get(SESSION_COOKIE)
            given = request.headers.get(CSRF_HEADER)
            if session is None or not same(given, _session_token(request, session)):
                return _error(403, "console: missing or wrong session token; reload the page")
        try:
            response = await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("console: unexpected error", extra={"data": {"path": request.path}})
            return _error(500, "console: internal error (see the gateway's log)")
        response.headers.update(PAGE_HEADERS)
        return response

    return guarded


def _error(status: int, message: str) -> web.Response:
    """Ortto's error shape, as every refusal of the gateway."""
    body = {"request_id": new_request_id(), "code": status, "error": message}
    return web.json_response(body, status=status, headers=PAGE_HEADERS)


def _login_page(status: int = 200, message: str = "") -> web.Response:
    page = _static_text("console-login.html")
    page = page.replace("{{MESSAGE}}", message)
    return web.Response(
        text=page, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


async def _login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    refusal = _host_refusal(request)
    if refusal is not None:
        return _error(403, refusal)
    token = console.settings.console_token
    if not token:
        raise web.HTTPSeeOther("/console")
    try:
        form = await request.post()
    except ValueError:
        return _login_page(400, "The form could not be read.")
    given = form.get("token")
    if not isinstance(given, str) or not same(given, token):
        return _login_page(401, "Wrong token.")
    response = web.Response(status=303, headers={"Location": "/console"})
    response.set_cookie(
        AUTH_COOKIE,
        derive(console.secret, "login", token),
        path="/console",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        max_age=LOGIN_MAX_AGE,
    )
    response.headers.update(PAGE_HEADERS)
    return response


# -- the page and its files


async def _page(request: web.Request) -> web.StreamResponse:
    session = request.cookies.get(SESSION_COOKIE) or new_secret()
    page = _static_text("console.html")
    page = page.replace("{{SESSION_TOKEN}}", _session_token(request, session))
    response = web.Response(text=page, content_type="text/html", charset="utf-8")
    response.set_cookie(
        SESSION_COOKIE,
        session,
        path="/console",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


@functools.cache
def _static_text(name: str) -> str:
    """A page template, read once (not at every request)."""
    return (STATIC / name).read_text(encoding="utf-8")


def _asset(name: str, content_type: str) -> Handler:
    body = (STATIC / name).read_bytes()

    async def asset(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
        )

    return asset


# -- the stream


async def _events(request: web.Request) -> web.StreamResponse:
    """Recent events, then each new one (server-sent events); a comment as heartbeat."""
    console = request.app[CONSOLE]
    if len(console.streams) >= MAX_STREAMS:
        return _error(503, f"console: {MAX_STREAMS} streams are open already")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no", **PAGE_HEADERS}
    )
    await response.prepare(request)
    queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue()
    console.streams.add(queue)
    pump: asyncio.Task[None] | None = None
    try:
        after = last_event_id(request.headers.get("Last-Event-ID"))
        recent = await console.feed.recent(INITIAL_EVENTS)
        newest = max((e.get("seq", 0) for e in recent), default=0)
        if after is not None and after > newest:
            # An id from before a restart (the in-process feed counts from 1 again):
            # start over, or the page would wait for the count to pass it.
            after = None
        if after is None:
            for event in recent:
                await response.write(sse_event(_shown(console, dict(event))))
            after = newest
        pump = asyncio.create_task(_pump(console.feed, after, queue))
        while not console.closing.is_set():
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.write(SSE_HEARTBEAT)
                continue
            if item is None:
                break
            await response.write(sse_event(_shown(console, dict(item))))
    except ConnectionResetError:  # the page went away
        pass
    finally:
        console.streams.discard(queue)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def _pump(feed: Feed, after: int, queue: asyncio.Queue[FeedEvent | None]) -> None:
    """Copy the feed into one stream's queue; a failing feed ends the stream (the page
    reconnects with Last-Event-ID)."""
    try:
        async for event in feed.follow(after):
            if queue.qsize() >= STREAM_BACKLOG:
                break  # too slow a reader: end the stream, the page resumes from its id
            queue.put_nowait(event)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("console: the feed failed; ending the stream", exc_info=True)
    queue.put_nowait(None)


async def _close_streams(app: web.Application) -> None:
    """End every open stream, so the listener's shutdown does not wait on them."""
    console = app[CONSOLE]
    console.closing.set()
    for queue in list(console.streams):
        queue.put_nowait(None)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    console = app[CONSOLE]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TEST_TIMEOUT)) as session:
        console.session = session
        yield
        console.session = None


# -- panels


def _shown(console: Console, value: Any) -> Any:
    """A value as the console may show it: secrets masked, emails too unless personal."""
    value = without_secrets(value, console.settings.secrets)
    return value if console.settings.console_personal else mask_emails(value)


async def _state(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    settings = console.settings
    described = describe(settings)
    recent = await console.feed.recent()
    deliveries = [e for e in recent if e.get("kind") == "delivery"][-RECENT_DELIVERIES:]
    body = {
        "delivery": delivery_state(console.registry),
        "upstream_rate": settings.upstream_rate,
        "upstream_endpoint": settings.upstream_endpoint,
        "delivery_mode": settings.delivery,
        "deliveries": deliveries[::-1],
        "activities": described["activities"],
        "settings": described,
        "personal": settings.console_personal,
        "test_ready": console.public.port is not None,
    }
    return web.json_response(_shown(console, body))


async def _forwarded(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    found = await console.feed.forwarded(request.match_info["key"])
    if found is None:
        return _error(404, "console: nothing forwarded with this key is remembered")
    body = {
        "endpoint": console.settings.upstream_endpoint,
        "headers": {"Content-Type": "application/json", "X-Api-Key": "****"},
        **found,
    }
    return web.json_response(_shown(console, body))


async def _dead_letters(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    error = request.query.get("error") or None
    letters = await deadletters.list_letters(
        console.files(),
        limit=DEAD_LETTER_LIMIT,
        error_contains=error,
        secrets=console.settings.secrets,
    )
    rows = []
    for letter in letters:
        row = letter.row()
        try:
            payload: Any = json.loads(letter.letter.payload)
        except ValueError:
            payload = letter.letter.payload.decode("utf-8", "replace")
        rows.append({**row, "spool": letter.spool, "payload": payload})
    return web.json_response(_shown(console, {"dead_letters": rows}))


async def _replay(request: web.Request) -> web.StreamResponse:
    return await _act(request, deadletters.replay)


async def _purge(request: web.Request) -> web.StreamResponse:
    return await _act(request, deadletters.purge)


async def _act(
    request: web.Request, action: Callable[..., Awaitable[dict[str, int]]]
) -> web.Response:
    """Replay or purge: `{"spool", "ids"}` for chosen letters of one file, `{"all": true}`
    for every letter of every file (never implied by an empty choice)."""
    console = request.app[CONSOLE]
    body = await _json(request)
    if body is None:
        return _error(400, "console: expected a JSON object")
    files = console.files()
    if body.get("all") is True:
        done = await action(files)
    else:
        spool, ids = body.get("spool"), body.get("ids")
        if spool not in files:
            return _error(400, "console: `spool` must be one of the gateway's spool files")
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_IDS
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            or not all(0 < i <= MAX_ID for i in ids)
        ):
            return _error(400, f"console: `ids` must be a list of 1 to {MAX_IDS} dead-letter ids")
        done = await action([spool], ids=ids)
    log.info(
        "console: dead letters",
        extra={"data": {"action": request.path.rsplit("/", 1)[-1], "count": sum(done.values())}},
    )
    return web.json_response({"count": sum(done.values())})


async def _test_activity(request: web.Request) -> web.StreamResponse:
    """Send one activity through the public listener (the real path), marked as a test."""
    console = request.app[CONSOLE]
    body = await _json(request)
    if body is None:
        return _error(400, "console: expected a JSON object")
    activity_id, email = body.get("activity_id"), body.get("email")
    if not isinstance(activity_id, str) or activity_id not in console.settings.activities:
        return _error(400, "console: `activity_id` must be one of the configured activities")
    if not isinstance(email, str) or not 3 <= len(email) <= MAX_EMAIL_CHARS or "@" not in email:
        return _error(400, "console: `email` must be an email address")
    if console.public.port is None or console.session is None:
        return _error(503, "console: the public listener is not listening yet")
    url = f"http://{local_address(console.public.host)}:{console.public.port}{ACTIVITIES_PATH}"
    headers = {TEST_HEADER: console_test_token(console.settings)}
    if console.settings.allowed_origins:
        headers["Origin"] = console.settings.allowed_origins[0]
    try:
        async with console.session.post(
            url, json=test_activity(activity_id, email), headers=headers
        ) as resp:
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _error(502, f"console: the public listener did not answer ({type(exc).__name__})")
    try:
        answer: Any = json.loads(text)
    except ValueError:
        answer = text[:2000]
    return web.json_response(_shown(console, {"status": status, "answer": answer}))


async def _json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
