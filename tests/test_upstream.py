"""The upstream client's pure parts: wait hints, what an answer proves, safe excerpts."""

from __future__ import annotations

import email.utils
import random
import time
import unicodedata

import orjson
import pytest

from gateway.upstream import (
    _EMAIL,
    EXCERPT_CHARS,
    MAX_RETRY_AFTER,
    MIN_SECRET_CHARS,
    SECRET_WINDOW,
    Entry,
    OrttoClient,
    _mask_email,
    parse_retry_after,
    read_answer,
    redact,
)
from tests.conftest import EXAMPLES

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


KEY = "pk-test-5f1e0c7a9b8d4e3f2a1b0c9d8e7f6a5b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"Service Unavailable", "Service Unavailable"),
        (f"invalid key {KEY}".encode(), "invalid key ****"),
        (f'{{"error":"key \'{KEY}\' refused"}}', '{"error":"key \'****\' refused"}'),
        # A partial echo (a proxy cutting the header value) is masked too.
        (f"got X-Api-Key: {KEY[:20]}... ", "got X-Api-Key: ****"),
        (f"url encoded {KEY[5:30]}%0A", "url encoded ****"),
        ("line one\nline two\r\n\tforged: yes", "line one line two forged: yes"),
        ("\x1b[31mred\x1b[0m \u2028 \u200b", "[31mred [0m"),
        (b"\xff\xfe bytes", "\ufffd\ufffd bytes"),
        ("", ""),
    ],
)
def test_redact_masks_secrets_and_control_characters(text: str | bytes, expected: str) -> None:
    assert redact(text, [KEY, "", "abc"]) == expected


def _redact_as_first_written(text: str, secrets: list[str]) -> str:
    """`redact` before it was made cheaper (a category lookup per character, the windows
    built per call): the behaviour the faster one must keep."""
    bound = EXCERPT_CHARS * 4 + 64
    cut = len(text) > bound
    text = text[:bound]
    needles = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]
    for secret in needles:
        text = text.replace(secret, "****")
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in text)
    if cut:
        head, _, tail = text.rpartition(" ")
        if len(tail) < EXCERPT_CHARS + SECRET_WINDOW:
            text = head + " \u2026"
    text = _EMAIL.sub(_mask_email, text)
    if needles:
        windows = {
            secret[i : i + SECRET_WINDOW]
            for secret in needles
            for i in range(max(1, len(secret) - SECRET_WINDOW + 1))
        }
        text = " ".join(
            "****" if any(w in word for w in windows) else word for word in text.split(" ")
        )
    text = " ".join(text.split())
    if len(text) > EXCERPT_CHARS:
        text = text[: EXCERPT_CHARS - 1].rstrip() + "\u2026"
    return text


def test_redact_answers_as_the_first_version_did() -> None:
    """Random texts built of the parts redact reacts to: pieces of the secrets (one with
    regex metacharacters), emails, every kind of space, control and format characters."""
    odd = "a.b*c+d(e)[f]?g|h\\i"
    # Sets of secrets taken in turn: each must get its own windows, not a cached other's.
    sets: tuple[list[str], ...] = ([KEY, odd, "abc", ""], [odd], [KEY[:12]], [])
    parts = [
        KEY,
        KEY[3:14],
        KEY[:8],
        "a.b*c+d(e)",
        "c+d(e)[f]?g",
        "x@example.com",
        "'q'@d.io",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\x00",
        "\x1b[0m",
        "\u00a0",
        "\u2028",
        "\u200b",
        "\u3000",
        "\ufeff",
        "\U0001f600",
        "é",
        "word",
        "x" * 400,
        ",",
        '"',
        "{}",
        "@",
    ]
    rng = random.Random(21)
    for n in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        secrets = sets[n % len(sets)]
        assert redact(text, secrets) == _redact_as_first_written(text, secrets), repr(text)


def test_redact_is_bounded_and_never_cuts_a_secret_open() -> None:
    page = "<html>" + "x " * 5000 + "</html>"
    shown = redact(page, [KEY])
    assert len(shown) == EXCERPT_CHARS
    assert shown.endswith("\u2026")
    # The key straddles the cut: no prefix of it survives.
    text = "a" * (EXCERPT_CHARS - 10) + " " + KEY + " tail"
    shown = redact(text, [KEY])
    assert KEY[:8] not in shown
    assert len(shown) <= EXCERPT_CHARS
    assert KEY[:8] not in redact(KEY * 100, [KEY])


def test_whitespace_never_brings_a_cut_secret_into_view() -> None:
    # The work bound cuts the text before whitespace is collapsed: a secret it splits
    # leaves its first characters, too few to be recognised, and the collapse would bring
    # them into the excerpt.
    assert "pk" not in redact("x" + " " * 1256 + KEY, [KEY])
    for gap in range(EXCERPT_CHARS * 4, EXCERPT_CHARS * 4 + 80):
        shown = redact("x" + " " * gap + KEY + " tail", [KEY])
        assert not any(KEY[:n] in shown for n in range(2, len(KEY))), gap
        assert shown.startswith("x")
        assert len(shown) <= EXCERPT_CHARS


def test_a_word_too_long_to_show_its_end_keeps_its_start() -> None:
    shown = redact("x" * 5000, [KEY])
    assert shown == "x" * (EXCERPT_CHARS - 1) + "\u2026"
    assert redact("ok " + "x" * 5000, [KEY]).startswith("ok xxx")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("person jane.doe+1@example.com not found", "person ****@example.com not found"),
        (
            '{"error":"email \'jane@example.com\' taken"}',
            '{"error":"email \'****@example.com\' taken"}',
        ),
        ("<j_o'brien@mail.example.org>, a@b.c", "<****@mail.example.org>, ****@b.c"),
        ('"str::email":"x@y.io"', '"str::email":"****@y.io"'),
        ("@handle and user@ and @", "@handle and user@ and @"),
    ],
)
def test_redact_masks_emails_but_keeps_their_domain(text: str, expected: str) -> None:
    assert redact(text, [KEY]) == expected
    assert redact(text.encode()) == expected


def test_a_client_redacts_with_its_key_and_the_other_secrets() -> None:
    client = OrttoClient(
        None,  # type: ignore[arg-type]  # never posts
        "http://127.0.0.1:9/v1/activities/create",
        KEY,
        timeout=1.0,
        secrets=["redis-password-1", "i" * 40],
    )
    text = f"{KEY} redis-password-1 {'i' * 40} fine"
    assert client.redact(text) == "**** **** **** fine"
    assert KEY not in repr(client)


INGESTED = {"person_id": "0060", "person_status": "created", "status": "ingested"}
QUEUED = {"status": "queued", "person_status": "queued"}


@pytest.mark.parametrize(
    ("data", "count", "expected"),
    [
        ({"activities": [INGESTED, QUEUED]}, 2, [Entry("ingested"), Entry("queued")]),
        (
            {"activities": [{"status": "invalid", "error": "bad field"}, INGESTED]},
            2,
            [Entry("invalid", "bad field"), Entry("ingested")],
        ),
        ({"activities": [{"status": "invalid"}]}, 1, [Entry("invalid", "invalid")]),
        # Any `error` is a refusal, whatever the status says.
        ({"activities": [{**INGESTED, "error": "no"}]}, 1, [Entry("ingested", "no")]),
        ({"activities": [{"status": "ingested", "error": ""}]}, 1, [Entry("ingested", "invalid")]),
        # So is `invalid` in any field (the sandbox's entries say it in person_status too).
        (
            {"activities": [{"status": "queued", "person_status": "invalid"}]},
            1,
            [Entry("queued", "invalid")],
        ),
        # Not proof: each of these acknowledges nothing.
        (None, 1, None),  # not JSON (an HTML page, an empty 204)
        ({"error": "Invalid API key", "code": 401}, 1, None),
        ({"activities": []}, 1, None),
        ({"activities": [INGESTED]}, 2, None),
        ({"activities": [INGESTED, INGESTED]}, 1, None),
        ({"activities": [INGESTED, "ingested"]}, 2, None),
        ({"activities": [{"status": "pending"}]}, 1, None),
        ({"activities": [{}]}, 1, None),
        ({"activities": {"0": INGESTED}}, 1, None),
        ([INGESTED], 1, None),
    ],
)
def test_read_answer_accepts_only_one_entry_per_activity(
    data: object, count: int, expected: list[Entry] | None
) -> None:
    assert read_answer(data, count) == expected


def test_read_answer_takes_the_documented_answers() -> None:
    documented = orjson.loads((EXAMPLES / "responses.json").read_bytes())
    for name, count in (("created", 1), ("two_at_once", 2), ("async_queued", 1)):
        entries = read_answer(documented[name]["body"], count)
        assert entries is not None and all(e.delivered for e in entries), name
    assert read_answer(documented["batch_invalid_field"]["body"], 1) is None
