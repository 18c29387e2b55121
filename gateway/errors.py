"""The gateway's refusals, each mapped to an HTTP status and Ortto's error shape."""

from __future__ import annotations

import math
from random import getrandbits
from typing import Any

from gateway.reasons import Reason


class GatewayError(Exception):
    """A refusal the browser should see: status, message and the field it concerns."""

    status = 400
    reason: Reason = "invalid_field"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
        reason: Reason | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        if reason is not None:
            self.reason = reason
        # Set once the relay has counted the refusal per activity (the shell counts the rest).
        self.counted = False

    def body(self, request_id: str) -> dict[str, Any]:
        """Ortto's error shape `{"request_id", "code", "error"}`, with the `reason` code
        and, when there is one, the `field` path."""
        body: dict[str, Any] = {
            "request_id": request_id,
            "code": self.status,
            "error": self.message,
            "reason": self.reason,
        }
        if self.field:
            body["field"] = self.field
        return body

    def entry(self) -> dict[str, Any]:
        """The refused activity's entry in a batch's answer."""
        entry: dict[str, Any] = {"status": "invalid", "error": self.message, "reason": self.reason}
        if self.field:
            entry["field"] = self.field
        return entry


class BadRequest(GatewayError):
    """Malformed body, wrong types, limits of Ortto's API exceeded."""

    status = 400


class Unauthorized(GatewayError):
    """A signed identity is missing, expired or for another person."""

    status = 401
    reason: Reason = "identity_required"


class Forbidden(GatewayError):
    """The origin is not allowed."""

    status = 403
    reason: Reason = "origin_not_allowed"


class NotFound(GatewayError):
    """The activity is unknown or not enabled for browsers (as Ortto's website path)."""

    status = 404
    reason: Reason = "unknown_activity"


class RequestTimeout(GatewayError):
    """The body did not arrive within the read timeout (a slow or stalled client)."""

    status = 408
    reason: Reason = "slow_body"


class PayloadTooLarge(GatewayError):
    """The body is over the configured limit."""

    status = 413
    reason: Reason = "body_too_large"


class UnsupportedMediaType(GatewayError):
    """The body is neither `application/json` nor `text/plain`."""

    status = 415
    reason: Reason = "unsupported_body"


class RateLimited(GatewayError):
    """Every activity of the request is over a limit."""

    status = 429
    reason: Reason = "person_limit"


class Unavailable(GatewayError):
    """The spool is full or the gateway is shutting down."""

    status = 503
    reason: Reason = "spool_full"


# Retry-After answers are whole seconds, at least one (RFC 9110 delay-seconds).
MIN_RETRY_AFTER = 1


def retry_after_header(seconds: float | None) -> int | None:
    """Seconds rounded up to a whole number for the `Retry-After` header."""
    if seconds is None:
        return None
    return max(MIN_RETRY_AFTER, math.ceil(seconds))


def new_request_id() -> str:
    """A fresh request id in the form Ortto uses (a version-4 UUID).

    From `random` rather than `os.urandom`: an id only has to be unique, not secret,
    and the system call cost more than the rest of a request's bookkeeping (profiled).
    """
    h = f"{getrandbits(128) & _UUID4_MASK | _UUID4_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID4_MASK = ~(0xF000 << 64) & ~(0xC000 << 48) & (1 << 128) - 1
_UUID4_BITS = (0x4000 << 64) | (0x8000 << 48)
