"""HTTP handlers of the public listener: thin, they read and render, the relay decides."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import HttpVersion11, web

from gateway.body import CODINGS, BodyDecoder, read_body, too_large
from gateway.cors import CorsPolicy
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    UnsupportedMediaType,
)
from gateway.keys import ADMISSION, LIFECYCLE, METRICS, RELAY, SETTINGS, SPOOL
from gateway.middlewares import CLIENT_IP, LOG_DATA, REQUEST_ID, json_response
from gateway.validation import decode_body

CORS = web.AppKey("cors", CorsPolicy)
SHIM = Path(__file__).parent / "static" / "ortto-relay.js"
# Browsers revalidate the shim hourly; the ETag makes that a cheap 304.
SHIM_MAX_AGE = 3600


class StaticAsset:
    """A small file served from memory with an ETag and cache headers."""

    def __init__(self, path: Path, content_type: str, max_age: int) -> None:
        self.body = path.read_bytes()
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'
        self.headers = {
            "Cache-Control": f"public, max-age={max_age}",
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
        raise BadRequest(f"the request body could not be read: {exc}") from None
    finally:
        if decoder.inflated:
            request.app[METRICS].body_inflated_bytes.inc(decoder.inflated)
    data = decode_body(body, request.headers.get("Content-Type", ""), limit)
    result = await request.app[RELAY].submit(data, request[CLIENT_IP], request[REQUEST_ID])
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
        raise Forbidden("preflight refused: method or headers not allowed")
    return web.Response(status=204, headers=headers)


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
