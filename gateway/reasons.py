"""Why the gateway refused something or warned about it: one fixed set of codes.

A leaf: it imports no gateway module, so errors, validation, metrics and logs can all
name the same codes. The set is closed so the metrics' `reason` label stays bounded.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Reason = Literal[
    # Refusals of a whole request, or of one activity in it.
    "malformed_body",
    "invalid_field",
    "unknown_key",
    "unknown_activity",
    "origin_not_allowed",
    "preflight_not_allowed",
    "body_too_large",
    "unsupported_body",
    "slow_body",
    "identity_required",
    "identity_invalid",
    "person_limit",
    "ip_limit",
    "in_flight",
    "spool_full",
    "spool_unwritable",
    "shutting_down",
    "limiter_unavailable",
    "busy",
    "upstream_unavailable",
    "upstream_refused",
    "upstream_rate_limited",
    "no_route",
    "method_not_allowed",
    "internal_error",
    # Warnings only: what validation normalised or left out.
    "set_by_gateway",
    "not_signed",
    "merge_by_not_allowed",
    "not_declared",
    "normalised",
    "more_warnings",
]

# Each code's HTTP status when it refuses (None: a warning only) and its meaning.
REASONS: Final[dict[Reason, tuple[int | None, str]]] = {
    "malformed_body": (400, "the body is empty, not JSON, nested too deep or badly compressed"),
    "invalid_field": (400, "a field (its path in `field`) has a wrong type, form or size"),
    "unknown_key": (400, "a key Ortto's API does not know (refused in strict mode)"),
    "unknown_activity": (404, "the activity id is unknown or not enabled for browsers"),
    "origin_not_allowed": (403, "the page's origin is not in the allowed origins"),
    "preflight_not_allowed": (403, "the preflight asks for a method or header not allowed"),
    "body_too_large": (413, "the body is over the limit, or can never fit the queue"),
    "unsupported_body": (415, "a content type, charset or encoding the gateway does not read"),
    "slow_body": (408, "the body did not arrive within the read timeout"),
    "identity_required": (401, "the activity needs a signed identity and has none"),
    "identity_invalid": (401, "the signed identity is malformed, expired or for another person"),
    "person_limit": (429, "the person's rate limit for the activity is reached"),
    "ip_limit": (429, "the client IP's rate limit for the activity is reached"),
    "in_flight": (503, "the same activity (its key) is being stored now"),
    "spool_full": (503, "the gateway's queue is full"),
    "spool_unwritable": (503, "the queue cannot be written (e.g. a full disk)"),
    "shutting_down": (503, "the gateway is shutting down"),
    "limiter_unavailable": (503, "rate limiting is unavailable (Redis down, fail closed)"),
    "busy": (503, "the gateway is over its budget of requests in progress"),
    "upstream_unavailable": (502, "sync mode: Ortto did not answer usefully"),
    "upstream_refused": (400, "sync mode: Ortto refused the activities"),
    "upstream_rate_limited": (429, "sync mode: Ortto's own rate limit"),
    "no_route": (404, "no such path"),
    "method_not_allowed": (405, "the path does not take this method"),
    "internal_error": (500, "an error of the gateway's own"),
    "set_by_gateway": (None, "a part the gateway sets itself (created, source_ip, ...)"),
    "not_signed": (None, "an identifier the signed identity does not cover, left out"),
    "merge_by_not_allowed": (None, "a merge_by that could choose another person's record"),
    "not_declared": (None, "an attribute not declared for the activity"),
    "normalised": (None, "a value rewritten in Ortto's form"),
    "more_warnings": (None, "stands for the warnings past the bound"),
}
ALL_REASONS: Final[tuple[Reason, ...]] = get_args(Reason)
REFUSAL_REASONS: Final[tuple[Reason, ...]] = tuple(
    code for code, (status, _) in REASONS.items() if status is not None
)
# What the `warnings` of an answer can carry: a dropped part's refusal code, or these.
WARNING_REASONS: Final[tuple[Reason, ...]] = (
    "invalid_field",
    "unknown_key",
    *(code for code, (status, _) in REASONS.items() if status is None),
)
