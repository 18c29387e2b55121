"""`parse_retry_after`: Ortto's wait hints, from the header or the body, never a crash."""

from __future__ import annotations

import email.utils
import time

import pytest

from gateway.upstream import MAX_RETRY_AFTER, parse_retry_after

BODY_HINT = b'{"error": {"try-in-seconds": 7}}'


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("120", b"", 120.0),
        (" 3 ", b"", 3.0),
        (None, BODY_HINT, 7.0),
        ("", BODY_HINT, 7.0),
        ("99999999", b"", MAX_RETRY_AFTER),
        (None, b'{"error": {"try-in-seconds": true}}', None),
        (None, b"not json", None),
        ("soon", b"", None),
        # Header bytes are decoded as Latin-1: 0xB2 arrives as "²", which isdigit() takes.
        ("\u00b2", b"", None),
        ("\u00b2", BODY_HINT, 7.0),
    ],
)
def test_hints(header: str | None, body: bytes, expected: float | None) -> None:
    assert parse_retry_after(header, body) == expected


def test_an_http_date_counts_from_now() -> None:
    header = email.utils.formatdate(time.time() + 60, usegmt=True)
    hint = parse_retry_after(header, b"")
    assert hint is not None
    assert 55 <= hint <= 60


def test_a_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT", b"") == 0.0
