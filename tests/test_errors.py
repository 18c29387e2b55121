"""Refusals: each has a reason code from the one fixed set, rendered in Ortto's shape."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from gateway.reasons import ALL_REASONS, REASONS, REFUSAL_REASONS, WARNING_REASONS, Reason
from gateway.sinks import UpstreamRateLimited, UpstreamRefused, UpstreamUnavailable


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (BadRequest, "invalid_field"),
        (Unauthorized, "identity_required"),
        (Forbidden, "origin_not_allowed"),
        (NotFound, "unknown_activity"),
        (RequestTimeout, "slow_body"),
        (PayloadTooLarge, "body_too_large"),
        (UnsupportedMediaType, "unsupported_body"),
        (RateLimited, "person_limit"),
        (Unavailable, "spool_full"),
        (UpstreamUnavailable, "upstream_unavailable"),
        (UpstreamRefused, "upstream_refused"),
        (UpstreamRateLimited, "upstream_rate_limited"),
    ],
)
def test_each_refusal_has_a_default_reason_whose_status_is_its_own(
    cls: type[GatewayError], reason: Reason
) -> None:
    err = cls("no")
    assert err.reason == reason
    assert REASONS[reason][0] == err.status
    assert not err.counted


def test_a_raise_site_chooses_its_own_reason() -> None:
    err = Unavailable("busy", reason="busy")
    assert err.reason == "busy"
    assert Unavailable("full").reason == "spool_full"  # the class default is untouched


def test_the_body_keeps_orttos_shape_and_adds_reason_and_field() -> None:
    err = BadRequest("attributes.int:cm:n must be a whole number", field="attributes.int:cm:n")
    assert err.body("rid") == {
        "request_id": "rid",
        "code": 400,
        "error": "attributes.int:cm:n must be a whole number",
        "reason": "invalid_field",
        "field": "attributes.int:cm:n",
    }
    assert err.entry() == {
        "status": "invalid",
        "error": "attributes.int:cm:n must be a whole number",
        "reason": "invalid_field",
        "field": "attributes.int:cm:n",
    }
    no_field = BadRequest("malformed JSON", reason="malformed_body")
    assert no_field.body("rid") == {
        "request_id": "rid",
        "code": 400,
        "error": "malformed JSON",
        "reason": "malformed_body",
    }
    assert "field" not in no_field.entry()


def test_the_reason_set_is_closed_and_each_code_has_a_meaning() -> None:
    assert set(REASONS) == set(get_args(Reason)) == set(ALL_REASONS)
    for code, (status, meaning) in REASONS.items():
        assert code.isidentifier() and code.islower()
        assert meaning and "\n" not in meaning
        assert status is None or 400 <= status < 600
    # Every code is a refusal, a warning, or both (strict mode refuses what would warn).
    assert set(REFUSAL_REASONS) | set(WARNING_REASONS) == set(ALL_REASONS)
    assert set(REFUSAL_REASONS) & set(WARNING_REASONS) == {"invalid_field", "unknown_key"}


def test_the_readme_documents_each_reason_with_its_status() -> None:
    readme = (Path(__file__).resolve().parents[1] / "docs" / "http-interface.md").read_text(
        encoding="utf-8"
    )
    for code, (status, _) in REASONS.items():
        shown = "warning" if status is None else str(status)
        assert f"| `{code}` | {shown} |" in readme, code
