"""The thin HTTP shell around the relay: request ids, errors, CORS, client IP, logs, metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.admission import BUSY_RETRY_AFTER, Admission
from gateway.client_ip import TrustedProxies, ip_text, parse_ip, resolve_client_ip
from gateway.cors import CorsPolicy
from gateway.enrich import anonymize_ip
from gateway.errors import (
    Forbidden,
    GatewayError,
    Unavailable,
    new_request_id,
    retry_after_header,
)
from gateway.feed import TEST_HEADER, FeedEvent, is_test
from gateway.keys import FEED, LIFECYCLE, SETTINGS
from gateway.logs import log_field, log_line
from gateway.metrics import Metrics
from gateway.reasons import Reason

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)
LOG_DATA = web.RequestKey[dict[str, Any]]("log_data")
# Whether the request carries the console's test marker (`gateway.feed.is_test`).
TEST = web.RequestKey("gateway_test", bool)
ROUTE_NAMES = {
    "activities": "activities",
    "activities-preflight": "preflight",
    "shim": "shim",
    "healthz": "health",
    "readyz": "ready",
    "demo": "demo",
    "index": "index",
}
PROBES = frozenset({"health", "ready"})
PROBE_LEVEL = logging.DEBUG
# Paths that answer while draining, so orchestrators can watch the shutdown.
ALWAYS_ANSWER = frozenset({"/healthz", "/readyz"})


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer encoded with orjson."""
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error_response(err: GatewayError, request_id: str) -> web.Response:
    """Ortto's error shape, with `Retry-After` when the error has one."""
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(retry_after_header(err.retry_after))
    return json_response(err.status, err.body(request_id), headers)


_HTTP_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}
# aiohttp's own refusals (routing, its body limit) by reason code; any other is malformed.
_HTTP_REASONS: dict[int, Reason] = {
    404: "no_route",
    405: "method_not_allowed",
    413: "body_too_large",
}


def make_middlewares(
    cors: CorsPolicy, trusted: TrustedProxies, metrics: Metrics, admission: Admission
) -> list[Callable[..., Any]]:
    """The middlewares, outermost first."""

    @web.middleware
    async def shell(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Request id, CORS, error rendering, one log line and metrics per request."""
        started = time.perf_counter()
        request_id = new_request_id()
        request[REQUEST_ID] = request_id
        request[LOG_DATA] = {}
        marker = request.headers.get(TEST_HEADER)
        request[TEST] = marker is not None and is_test(marker, request.app.get(SETTINGS))
        origin = request.headers.get("Origin")
        if origin is None and request.method == "POST":
            # Old browsers omit Origin on same-origin POSTs; their Referer says where from.
            origin = referer_origin(request.headers.get("Referer"))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peer_ip = parse_ip(peer[0]) if peer else None
        from_proxy = peer_ip is not None and peer_ip in trusted
        scheme = request.scheme
        if from_proxy:
            # TLS usually ends at the proxy: its X-Forwarded-Proto is the page's scheme.
            proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
            scheme = proto if proto in ("http", "https") else scheme
        check = cors.check(origin, request.host, scheme)

        def client() -> str:
            """The client's address for a refusal's event (resolved here if not yet)."""
            if CLIENT_IP in request:
                return request[CLIENT_IP]
            ip = resolve_client_ip(
                peer[0] if peer else None,
                request.headers.getall("X-Forwarded-For", ()),
                request.headers.getall("Forwarded", ()),
                trusted,
            )
            return ip_text(ip) if ip is not None else ""

        within_budget = admission.enter()
        try:
            if not within_budget and request.path not in ALWAYS_ANSWER:
                raise Unavailable(
                    "the gateway is busy; try again shortly",
                    retry_after=BUSY_RETRY_AFTER,
                    reason="busy",
                )
            if check == "refused":
                raise Forbidden(f"origin {origin[:200] if origin else ''!r} is not allowed")
            lifecycle = request.app[LIFECYCLE]
            if lifecycle.draining and request.path not in ALWAYS_ANSWER:
                raise Unavailable(
                    "the gateway is shutting down", retry_after=5.0, reason="shutting_down"
                )
            ip = resolve_client_ip(
                peer[0] if peer else None,
                request.headers.getall("X-Forwarded-For", ()),
                request.headers.getall("Forwarded", ()),
                trusted,
            )
            request[CLIENT_IP] = ip_text(ip) if ip is not None else ""
            response = await handler(request)
        except GatewayError as err:
            response = error_response(err, request_id)
            if isinstance(err, Forbidden):
                metrics.count_activity(None, "forbidden")
            _refused(request, metrics, err.reason, err.field, client, counted=err.counted)
        except web.HTTPException as exc:
            if exc.status >= 400:
                message = _HTTP_MESSAGES.get(exc.status, exc.reason.lower())
                reason = _HTTP_REASONS.get(exc.status, "malformed_body")
                response = json_response(
                    exc.status,
                    {
                        "request_id": request_id,
                        "code": exc.status,
                        "error": message,
                        "reason": reason,
                    },
                )
                if exc.status == 405:
                    response.headers["Allow"] = exc.headers.get("Allow", "")
                _refused(request, metrics, reason, None, client)
            else:
                raise
        except Exception:
            log.exception("unexpected error", extra={"data": {"request_id": request_id}})
            response = json_response(
                500,
                {
                    "request_id": request_id,
                    "code": 500,
                    "error": "internal error",
                    "reason": "internal_error",
                },
            )
            _refused(request, metrics, "internal_error", None, client)
        finally:
            admission.leave()
        if not request.content.is_eof():
            # Refused (or timed out) before its body had all come: close the connection
            # after the answer instead of reading the rest (the runner's lingering_time is
            # 0, see server.runner_options), and tell the client so.
            response.force_close()
        if check == "allowed" and origin is not None:
            response.headers.update(cors.response_headers(origin))
        elif check != "none":
            response.headers.setdefault("Vary", "Origin")
        response.headers["X-Request-Id"] = request_id
        response.headers["X-Content-Type-Options"] = "nosniff"
        elapsed = time.perf_counter() - started
        route = _route_name(request)
        metrics.observe_request(route, response.status, elapsed)
        # Probes come every few seconds: keep them out of the INFO log.
        level = PROBE_LEVEL if route in PROBES else logging.INFO
        if log.isEnabledFor(level):  # at WARNING, do not even build the line
            data: dict[str, Any] = {
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "status": response.status,
                "ms": round(elapsed * 1000, 3),
            }
            extra: dict[str, Any] = request[LOG_DATA]
            data.update(extra)
            log_line(log, level, "request", data)
        return response

    return [shell]


def _refused(
    request: web.Request,
    metrics: Metrics,
    reason: Reason,
    field: str | None,
    client: Callable[[], str],
    *,
    counted: bool = False,
) -> None:
    """A refused request's reason code (and field path, never a value) on its log line,
    and, unless the relay already counted (and published) its activities one by one,
    counted and published as a `request` event for the console."""
    data = request[LOG_DATA]
    data["reason"] = reason
    if field:
        data["field"] = log_field(field)
    if counted:
        return
    metrics.count_refusal(None, reason)
    feed = request.app.get(FEED)
    if feed is None:
        return
    address = client()
    settings = request.app.get(SETTINGS)
    if address and settings is not None and settings.ip_anonymize:
        address = anonymize_ip(address)
    event: FeedEvent = {
        "kind": "request",
        "time": time.time(),
        "outcome": "refused",
        "reason": reason,
        "field": log_field(field) if field else None,
        "request_id": request[REQUEST_ID],
        "client": address,
    }
    if request.get(TEST):
        event["test"] = True
    feed.publish(event)


def referer_origin(referer: str | None) -> str | None:
    """`scheme://host[:port]` of a Referer header, or None."""
    if not referer:
        return None
    scheme, sep, rest = referer.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme.lower()}://{host}" if host and "@" not in host else None


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    name = route.name if route is not None else None
    return ROUTE_NAMES.get(name or "", "other")
