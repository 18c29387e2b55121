"""The request every load generator sends: one activity (or several), a new person each.

Every request carries a unique email (so the per-person limit never refuses one) and an
`X-Forwarded-For` address that changes every `PER_IP` activities (so the per-IP limit,
100/1h by default, never does either). The gateway believes `X-Forwarded-For` from
127.0.0.1 by default. The same template feeds the wrk Lua script and the Python
generators, so both tools send byte-identical shapes.
"""

from __future__ import annotations

from pathlib import Path

ACTIVITY_ID = "act:cm:logged-in"
PATH = "/v1/activities/create"
# Requests per client address: half the default per-IP limit of 100/1h.
PER_IP = 50
# Address blocks reserved per load phase, so phases against one gateway never share an IP.
IP_BLOCK = 100_000
LUA_SCRIPT = Path(__file__).with_name("activity.lua")

# Ortto's guide example (tests/ortto-examples/01-single.json) with `{local}` in the email.
BODY_TEMPLATE = (
    '{"activities":[{"activity_id":"' + ACTIVITY_ID + '",'
    '"fields":{"str::first":"Chris","str::last":"Smith","str::email":"{local}@example.com"},'
    '"attributes":{"str:cm:payment-plan":"$100 starter plan","bol:cm:account-owner":true,'
    '"str:cm:web-browser":"Google Chrome","int::v":1530}}]}'
)
# One activity of the template, for bodies of several (`body_template`).
ACTIVITY_TEMPLATE = BODY_TEMPLATE[len('{"activities":[') : -len("]}")]


def body_template(activities: int = 1) -> str:
    """The body of `activities` activities, each its own person: `{local}@example.com`
    for one, `{local}-0@example.com`, `{local}-1@example.com`, ... for several."""
    if activities == 1:
        return BODY_TEMPLATE
    return (
        '{"activities":['
        + ",".join(
            ACTIVITY_TEMPLATE.replace("{local}", f"{{local}}-{i}") for i in range(activities)
        )
        + "]}"
    )


def one_body(local: str) -> str:
    """The body of one activity for the person `{local}@example.com`."""
    return BODY_TEMPLATE.replace("{local}", local)


def batch_body(local: str, count: int) -> str:
    """A body of `count` activities, each for its own person (`{local}-{i}@example.com`)."""
    return body_template(count).replace("{local}", local)


def per_ip(activities: int = 1) -> int:
    """Requests per client address: `PER_IP` activities' worth (at least one request)."""
    return max(1, PER_IP // activities)


# What the gateway answers for one accepted activity (and what the baseline answers).
ACCEPTED_BODY = {"activities": [{"status": "queued", "person_status": "queued"}]}


def client_ip(ip_base: int, n: int, requests_per_ip: int = PER_IP) -> str:
    """The `X-Forwarded-For` address of request `n` of a phase (10.0.0.0/8)."""
    block = (ip_base + n // requests_per_ip) % (1 << 24)
    return f"10.{block >> 16}.{(block >> 8) & 255}.{block & 255}"


class RequestFactory:
    """Builds request `n` of a phase as raw HTTP/1.1 bytes (keep-alive)."""

    def __init__(
        self, host: str, port: int, prefix: str, ip_base: int, activities: int = 1
    ) -> None:
        self.prefix = prefix
        self.ip_base = ip_base
        self.template = body_template(activities)
        self.per_ip = per_ip(activities)
        self._head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        )

    def __call__(self, n: int) -> bytes:
        body = self.template.replace("{local}", f"{self.prefix}-{n}").encode()
        return (
            f"{self._head}X-Forwarded-For: {client_ip(self.ip_base, n, self.per_ip)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
