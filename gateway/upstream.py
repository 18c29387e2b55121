"""The client for Ortto's activities endpoint: one shared session, allowlisted headers.

It knows nothing of browser requests: it posts an already encoded body and
reports what Ortto answered. Exceptions never carry the key: it is only ever put
in the outgoing header, and errors are re-raised with their type and a message
built here.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import io
import re
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway import __version__
from gateway.config import is_ascii_digits

# Longest wait any upstream hint may impose; beyond it we retry anyway.
MAX_RETRY_AFTER = 3600.0
# Longest excerpt of Ortto's text a log line, a dead letter or the CLI shows: a reason,
# not a page (an HTML error page runs to kilobytes).
EXCERPT_CHARS = 300
# A secret is masked wherever any run of this many of its characters appears, so a
# truncated or partly quoted echo is masked too.
SECRET_WINDOW = 8
# Shorter secrets are not searched for: they would mask ordinary words.
MIN_SECRET_CHARS = 4
MASKED = "****"
# The per-activity statuses that mean Ortto took the activity (design: both do).
DELIVERED_STATUSES = frozenset({"ingested", "queued"})
# An email-like run (Ortto's messages may quote a field's value): its local part is masked,
# its domain kept; quotes, brackets and separators around it stay.
_EMAIL = re.compile(r"([^\s@\"<>()\[\]{},;:]+)@([^\s@\"'`<>()\[\]{},;:]+)")


class UpstreamError(Exception):
    """No answer from Ortto: connection refused or reset, DNS, timeout."""


def redact(text: str | bytes, secrets: Iterable[str] = (), limit: int = EXCERPT_CHARS) -> str:
    """Text from Ortto (or anything it may have echoed) made safe to log, store and show.

    An upstream's text is not ours: a proxy may echo the request's headers, a buggy API
    its key. So every secret is masked (each whitespace-free run holding any
    `SECRET_WINDOW` characters of one becomes `****`), control and format characters
    become spaces (no forged log lines, no terminal escapes), an email-like word's local
    part is masked (`****@example.com`: logs never hold an email), whitespace is collapsed
    and the result is cut to `limit` characters. Masking comes before the cut, so a cut
    can never leave the start of a secret showing.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # Bound the work. What lies near 4x the limit still shows when whitespace collapses
    # before it, and this cut may split a word: a secret's first characters, too few to
    # be recognised. So the word it cut is dropped, unless too long for its end to show.
    bound = limit * 4 + 64
    cut = len(text) > bound
    text = text[:bound]
    needles = tuple(s for s in secrets if len(s) >= MIN_SECRET_CHARS)
    for secret in needles:
        text = text.replace(secret, MASKED)
    if not text.isprintable():  # C-level: false exactly when a C* or Z* but " " is there
        text = "".join(" " if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in text)
    if cut:
        head, _, tail = text.rpartition(" ")
        if len(tail) < limit + SECRET_WINDOW:
            text = head + " \u2026"
    text = mask_emails(text)
    if needles:
        windows = _windows(needles)
        if windows.search(text):  # a word holds a window only if the whole text does
            text = " ".join(MASKED if windows.search(word) else word for word in text.split(" "))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    return text


@functools.lru_cache(maxsize=8)
def _windows(secrets: tuple[str, ...]) -> re.Pattern[str]:
    """Any `SECRET_WINDOW` characters of any of `secrets` (the whole of a shorter one), as
    one pattern: built once per set of secrets, not once per text redacted."""
    windows = {
        secret[i : i + SECRET_WINDOW]
        for secret in secrets
        for i in range(max(1, len(secret) - SECRET_WINDOW + 1))
    }
    return re.compile("|".join(re.escape(w) for w in sorted(windows)))


def mask_emails(text: str) -> str:
    """Every email-like run's local part masked (`****@example.com`), as `redact` does.
    Only where there is an `@`: the pattern backtracks over every run of a text without."""
    return _EMAIL.sub(_mask_email, text) if "@" in text else text


def _mask_email(match: re.Match[str]) -> str:
    local = match[1]
    quotes = local[: len(local) - len(local.lstrip("'`"))]
    return f"{quotes}{MASKED}@{match[2]}"


@dataclass(frozen=True, slots=True)
class Entry:
    """Ortto's word on one activity: its status, and the reason when it refused it."""

    status: str
    error: str | None = None  # Ortto's raw text: `redact` it before showing it anywhere

    @property
    def delivered(self) -> bool:
        """Whether Ortto took the activity."""
        return self.error is None


def read_answer(data: Any, count: int) -> list[Entry] | None:
    """Ortto's per-activity entries when its answer accounts for each of `count`, else None.

    A 2xx proves nothing by itself (a proxy's page, a captive portal, a wrong URL all
    answer 200): only `{"activities": [...]}` with one object per activity, each either
    taken (`ingested`/`queued`, no `error`) or refused (`invalid` in any field, as
    `person_status`, or any `error`), does. An entry with another status is not proof
    either way, so the whole answer is not.
    """
    entries = data.get("activities") if isinstance(data, dict) else None
    if not isinstance(entries, list) or len(entries) != count:
        return None
    out: list[Entry] = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        status = entry.get("status")
        error = entry.get("error")
        if error is not None or "invalid" in (status, entry.get("person_status")):
            message = error if isinstance(error, str) and error.strip() else "invalid"
            out.append(Entry(str(status), message))
        elif isinstance(status, str) and status in DELIVERED_STATUSES:
            out.append(Entry(status))
        else:
            return None
    return out


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
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        api_key: str,
        *,
        timeout: float,
        secrets: Iterable[str] = (),
    ) -> None:
        self._session = session
        self.endpoint = endpoint
        # Every secret of the settings: what `redact` masks in the upstream's text.
        # Those `redact` masks (shorter ones would mask ordinary words): the key and the
        # other configured secrets, each once.
        self._secrets = tuple(
            dict.fromkeys(s for s in (api_key, *secrets) if len(s) >= MIN_SECRET_CHARS)
        )
        self._headers = {
            "X-Api-Key": api_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"ortto-gateway/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))

    def __repr__(self) -> str:
        return f"OrttoClient({self.endpoint!r})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """The key and the other configured secrets, as `redact` masks them."""
        return self._secrets

    def redact(self, text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
        """`redact` with the key and the other configured secrets."""
        return redact(text, self._secrets, limit)

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


def encode_batch(
    payloads: list[bytes], *, async_: bool = False, merge_by: Sequence[str] | None = None
) -> bytes:
    """Ortto's request body from already encoded activities, without re-encoding them."""
    flag = b"true" if async_ else b"false"
    tail = b',"merge_by":' + orjson.dumps(list(merge_by)) if merge_by else b""
    return b'{"activities":[' + b",".join(payloads) + b'],"async":' + flag + tail + b"}"


# Bytes `encode_batch` adds around the activities (a `merge_by` of both identifiers
# included), plus one comma per activity.
BATCH_OVERHEAD = len(encode_batch([], async_=False, merge_by=["str::email", "str::ei"]))
