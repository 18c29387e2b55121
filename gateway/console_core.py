"""The operator console's pure parts: when it is on, its tokens, SSE framing, what it shows.

No aiohttp here: `gateway.console` is the thin shell that serves these.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.feed import mask_strings

METRIC_PREFIX = "ortto_gateway_"
# The delivery panel's gauges and counters, as `/metrics` names them (summed or maxed
# over `--workers` by the multiprocess registry exactly as Prometheus sees them).
DELIVERY_SAMPLES = (
    "spool_depth",
    "spool_bytes",
    "spool_oldest_age_seconds",
    "spool_writable",
    "dead_letters",
    "delivery_paused",
    "delivery_batches_in_flight",
    "delivery_pauses_total",
    "upstream_requests_total",
    "upstream_retries_total",
)
_EMAIL = re.compile(r"[^\s@\"'<>,;:]+@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def is_loopback(host: str) -> bool:
    """Whether a listener address takes connections from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def console_off_reason(settings: Settings) -> str | None:
    """Why the console is off, or None when it is served.

    Off when disabled, and when the metrics listener takes connections from other
    machines without GATEWAY_CONSOLE_TOKEN: the console can replay and purge dead
    letters and send activities, so it is never open to a network unguarded.
    """
    if not settings.console:
        return "GATEWAY_CONSOLE is false"
    if not settings.console_token and not is_loopback(settings.metrics_listen.host):
        return (
            f"GATEWAY_METRICS_LISTEN {settings.metrics_listen} is not loopback and "
            "GATEWAY_CONSOLE_TOKEN is not set"
        )
    return None


def host_of(host_header: str | None) -> str:
    """The host name of a Host header, lower case, without port or brackets."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host: str, names: tuple[str, ...]) -> bool:
    """Whether a Host may be the console's: an IP address, `localhost`, or a listed name.

    A site that rebinds its own name to this machine's address sends that name as Host;
    no other site's page can have an IP address of this machine or `localhost` as its
    origin."""
    if host == "localhost" or host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def new_secret() -> str:
    """A fresh random token (a session id, the process's signing secret)."""
    return secrets.token_urlsafe(32)


def derive(secret: str, purpose: str, value: str) -> str:
    """An HMAC of `value` for one `purpose`: what a cookie or a page may carry instead of
    the secret it proves knowledge of."""
    mac = hmac.new(secret.encode(), f"{purpose}\0{value}".encode(), hashlib.sha256)
    return mac.hexdigest()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing value never matches."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def sse_event(event: dict[str, Any]) -> bytes:
    """One server-sent event: `id` is the feed's sequence number (for Last-Event-ID)."""
    data = json.dumps(event, separators=(",", ":"), default=str)
    head = f"id: {event['seq']}\n" if "seq" in event else ""
    return f"{head}data: {data}\n\n".encode()


SSE_HEARTBEAT = b": keep-alive\n\n"


def last_event_id(header: str | None) -> int | None:
    """The sequence number a reconnecting EventSource gives back, if it is one."""
    if header is None or not header.strip().isascii() or not header.strip().isdigit():
        return None
    return int(header.strip())


def mask_emails(value: Any) -> Any:
    """A JSON value with every email's local part masked (`****@example.com`)."""
    return mask_strings(
        value,
        lambda text: _EMAIL.sub(lambda m: "****@" + m.group(1), text) if "@" in text else text,
    )


def delivery_state(registry: CollectorRegistry) -> dict[str, Any]:
    """The delivery panel's numbers from the metrics registry: `{name: value}` for plain
    series, `{name: {label value: value}}` for labelled ones."""
    wanted = {METRIC_PREFIX + name: name for name in DELIVERY_SAMPLES}
    out: dict[str, Any] = {}
    for family in registry.collect():
        for sample in family.samples:
            name = wanted.get(sample.name)
            if name is None:
                continue
            if sample.labels:
                label = next(iter(sample.labels.values()))
                bucket = out.setdefault(name, {})
                bucket[label] = bucket.get(label, 0.0) + sample.value
            else:
                out[name] = sample.value
    return out


def test_activity(activity_id: str, email: str) -> dict[str, Any]:
    """The body the console's 'send a test activity' button posts to the public listener."""
    return {"activity_id": activity_id, "fields": {"str::email": email}, "attributes": {}}


def local_address(host: str) -> str:
    """Where this machine reaches a listener bound to `host` (a wildcard means loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
