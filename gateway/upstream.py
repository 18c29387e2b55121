"""The client for Ortto's activities endpoint: one shared session, allowlisted headers.

It knows nothing of browser requests: it posts an already encoded body and
reports what Ortto answered. Exceptions never carry the key: it is only ever put
in the outgoing header, and errors are re-raised with their type and a message
built here.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway import __version__
from gateway.config import is_ascii_digits

# Longest wait any upstream hint may impose; beyond it we retry anyway.
MAX_RETRY_AFTER = 3600.0


class UpstreamError(Exception):
    """No answer from Ortto: connection refused or reset, DNS, timeout."""


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """Ortto's answer: status, raw body, the retry hint it gave, and the time it took."""

    status: int
    body: bytes
    retry_after: float | None
    elapsed: float

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


def parse_retry_after(header: str | None, body: bytes) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or date) or Ortto's `try-in-seconds`."""
    hint: float | None = None
    if header:
        header = header.strip()
        if is_ascii_digits(header):
            hint = float(header)
        else:
            try:
                when = email.utils.parsedate_to_datetime(header)
                hint = max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError, IndexError):
                hint = None
    if hint is None and body[:1] == b"{":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            seconds = error.get("try-in-seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                hint = float(seconds)
    if hint is None:
        return None
    return min(max(hint, 0.0), MAX_RETRY_AFTER)


class OrttoClient:
    """Posts bodies to `{base}/v1/activities/create` with the private key."""

    def __init__(
        self, session: aiohttp.ClientSession, endpoint: str, api_key: str, *, timeout: float
    ) -> None:
        self._session = session
        self.endpoint = endpoint
        self._headers = {
            "X-Api-Key": api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"ortto-gateway/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))

    def __repr__(self) -> str:
        return f"OrttoClient({self.endpoint!r})"

    async def post(self, body: bytes) -> UpstreamResponse:
        """Send one request; raise `UpstreamError` when no answer came back."""
        started = time.perf_counter()
        try:
            async with self._session.post(
                self.endpoint,
                # A BytesIO payload: large raw bytes would be copied on the event loop.
                data=io.BytesIO(body),
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                content = await resp.read()
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), content)
                return UpstreamResponse(
                    resp.status, content, retry_after, time.perf_counter() - started
                )
        except TimeoutError:
            raise UpstreamError("timed out waiting for Ortto") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"no answer from Ortto: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            raise


def encode_batch(payloads: list[bytes], *, async_: bool = False) -> bytes:
    """Ortto's request body from already encoded activities, without re-encoding them."""
    flag = b"true" if async_ else b"false"
    return b'{"activities":[' + b",".join(payloads) + b'],"async":' + flag + b"}"


# Bytes `encode_batch` adds around the activities, plus one comma per activity.
BATCH_OVERHEAD = len(encode_batch([], async_=False))
