"""HTTP handlers of the public listener: thin, they read and render, the relay decides."""

from __future__ import annotations

import hashlib

from aiohttp import HttpVersion11, web

from gateway.body import CODINGS, BodyDecoder, read_body, too_large
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    UnsupportedMediaType,
)
from gateway.keys import ADMISSION, CORS, LIFECYCLE, METRICS, RELAY, SETTINGS, SPOOL
from gateway.middlewares import CLIENT_IP, LOG_DATA, REQUEST_ID, TEST, json_response
from gateway.shim import ShimFile
from gateway.validation import decode_body

# The shim's one route: `/ortto-relay.js`, or `/ortto-relay.<version>.js`.
SHIM_ROUTE = r"/ortto-relay{version:(\.[0-9a-f]{1,64})?}.js"
SHIM_CONTENT_TYPE = "application/javascript; charset=utf-8"
# Browsers revalidate the shim's plain URL hourly; the ETag makes that a cheap 304. The
# versioned URL never changes content, so it is cached for a year and never revalidated.
SHIM_MAX_AGE = 3600
IMMUTABLE = "public, max-age=31536000, immutable"


class StaticAsset:
    """A small file served from memory with an ETag and cache headers."""

    def __init__(
        self, body: bytes, content_type: str, cache_control: str, etag: str | None = None
    ) -> None:
        self.body = body
        self.etag = '"' + (etag or hashlib.sha256(body).hexdigest()[:20]) + '"'
        self.headers = {
            "Cache-Control": cache_control,
            "ETag": self.etag,
            "Content-Type": content_type,
            "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Resource-Policy": "cross-origin",
        }

    async def handle(self, request: web.Request) -> web.Response:
        """200 with the body, or 304 when the browser's copy is current."""
        if_none_match = request.headers.get("If-None-Match", "")
        if self.etag in (tag.strip() for tag in if_none_match.split(",")):
            return web.Response(status=304, headers=self.headers)
        return web.Response(body=self.body, headers=self.headers)


class ShimAsset:
    """The shim at its plain URL (revalidated) and at its versioned one (immutable).

    Another version's URL, as a page pinned before an upgrade asks for, is redirected to this
    version's: a page without SRI keeps working, and one with SRI refuses the new file, as it
    should, until its snippet is updated (`ortto-gateway shim`)."""

    def __init__(self, shim: ShimFile) -> None:
        self.file_name = shim.file_name
        self.version = "." + shim.version
        self.plain = StaticAsset(
            shim.body, SHIM_CONTENT_TYPE, f"public, max-age={SHIM_MAX_AGE}", shim.version
        )
        self.pinned = StaticAsset(shim.body, SHIM_CONTENT_TYPE, IMMUTABLE, shim.version)

    async def handle(self, request: web.Request) -> web.Response:
        version = request.match_info.get("version", "")
        if not version:
            return await self.plain.handle(request)
        if version == self.version:
            return await self.pinned.handle(request)
        # Relative, so behind a proxy's prefix (/ortto/) the browser stays under it.
        return web.Response(
            status=302, headers={"Location": self.file_name, "Cache-Control": "no-cache"}
        )


async def create_activities(request: web.Request) -> web.Response:
    """`POST /v1/activities/create`: Ortto's body (or one bare activity), without the key."""
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    refusal = _refusal_before_the_body(request)
    if refusal is not None:
        raise refusal
    decoder = BodyDecoder(_coding(request), limit)
    try:
        body = await read_body(
            request.content, decoder, request.app[ADMISSION], settings.read_timeout
        )
    except (web.RequestPayloadError, ConnectionResetError) as exc:  # a bad chunk, a hang-up
        # Client-made: an INFO request line with its 4xx, not an unexpected-error ERROR.
        raise BadRequest(
            f"the request body could not be read: {exc}", reason="malformed_body"
        ) from None
    finally:
        if decoder.inflated:
            request.app[METRICS].body_inflated_bytes.inc(decoder.inflated)
    data = decode_body(body, request.headers.get("Content-Type", ""), limit)
    result = await request.app[RELAY].submit(
        data, request[CLIENT_IP], request[REQUEST_ID], request[LOG_DATA], test=request[TEST]
    )
    if result.log:
        request[LOG_DATA].update(result.log)
    headers = {"Retry-After": str(result.retry_after)} if result.retry_after else None
    return json_response(result.status, result.body, headers)


def _coding(request: web.Request) -> str:
    return request.headers.get("Content-Encoding", "identity").strip().lower()


def _refusal_before_the_body(request: web.Request) -> GatewayError | None:
    """What the headers alone refuse: a declared length over the limit (413; it counts the
    bytes as sent, compressed or not), or a Content-Encoding the gateway does not decode
    (415)."""
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return too_large(limit)
    if _coding(request) not in CODINGS:
        coding = request.headers.get("Content-Encoding", "")
        return UnsupportedMediaType(
            f"Content-Encoding {coding[:40]!r} is not supported: send the body as is, "
            "or gzip or deflate"
        )
    return None


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue`: invite the body only when it may be read.

    aiohttp's default says "100 Continue" to any body, so a client would upload one over
    the limit before the handler refuses it; without the invitation the client gets the
    handler's 413 at once (RFC 9110 allows a final answer instead of 100). Other
    expectations are ignored (RFC 9110 allows that too), where aiohttp's default answers
    a plain-text 417 outside the gateway's error shape.
    """
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").strip().lower() != "100-continue":
        return
    # Nor when the answer is already known to be a refusal (this runs before the shell).
    if request.app[LIFECYCLE].draining or _refusal_before_the_body(request) is not None:
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own handler: the answer has not begun


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for the activities path."""
    origin = request.headers.get("Origin")
    if origin is None:
        return web.Response(status=204, headers={"Allow": "POST, OPTIONS"})
    cors = request.app[CORS]
    if not cors.lists(origin):  # the shell let it through as the page's own origin
        raise Forbidden(
            f"preflight refused: origin {origin[:200]!r} is not in the allowed origins "
            "(a same-origin request needs no preflight)"
        )
    headers = cors.preflight_headers(
        origin,
        request.headers.get("Access-Control-Request-Method"),
        request.headers.get("Access-Control-Request-Headers"),
    )
    if headers is None:
        raise Forbidden(
            "preflight refused: method or headers not allowed", reason="preflight_not_allowed"
        )
    return web.Response(status=204, headers=headers)


# What `/` answers: where to post and where the shim is. Nothing from the settings, so
# nothing secret (nor the upstream or allowed origins) can ever appear in it.
INDEX_TEXT = """ortto-gateway: relays Ortto custom activities from browsers, the key kept here.

  POST /v1/activities/create   the activities endpoint (Ortto's request shape)
  GET  /ortto-relay.js         the browser shim (ap3c.track and ap3c.activity)
  GET  /healthz, /readyz       health checks

See the README of ortto-gateway for settings and the shim's snippet.
"""


async def index(request: web.Request) -> web.Response:
    """A short text for whoever opens the gateway's root in a browser."""
    return web.Response(text=INDEX_TEXT, content_type="text/plain", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: started, spool writable, not draining."""
    lifecycle = request.app[LIFECYCLE]
    if not lifecycle.ready:
        reason = "draining" if lifecycle.draining else "starting"
        return json_response(503, {"status": reason}, {"Retry-After": "5"})
    spool = request.app.get(SPOOL)
    if spool is not None and spool.write_error is not None:  # e.g. a full disk
        body = {"status": "spool_unwritable", "error": f"spool not writable: {spool.write_error}"}
        return json_response(503, body, {"Retry-After": "5"})
    return json_response(200, {"status": "ready"})
