"""Enrichment: the real client address, the accept time and a unique key."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import secrets
import time
from typing import cast

from gateway.validation import ActivityBody, EnrichedActivity


@functools.lru_cache(maxsize=4)
def _iso_seconds(seconds: int) -> str:
    # Requests in the same second share the formatted date (strftime showed in profiles).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso_millis(ts: float) -> str:
    """A unix time as ISO 8601 UTC with milliseconds, as Ortto's examples write it."""
    seconds = int(ts)
    millis = int((ts - seconds) * 1000)
    return f"{_iso_seconds(seconds)}.{millis:03d}Z"


# Random once per process, then a counter: unique across processes and restarts (96
# random bits), with no system call per activity (`os.urandom` showed in the profile).
_KEY_PREFIX = secrets.token_hex(12)
_key_counter = itertools.count()


def new_key() -> str:
    """A unique activity key: with `created` it makes retries merge instead of duplicating."""
    return f"{_KEY_PREFIX}{next(_key_counter):08x}"


def enrich(activity: ActivityBody, client_ip: str | None, now: float) -> EnrichedActivity:
    """Set `location.source_ip` (unless a custom or address location was given), `created`, `key`.

    The browser's own `source_ip`, `created` and `key` were dropped by validation:
    the address comes from the connection (through trusted proxies only), and the
    time and key from the gateway, so a page cannot back-date or collide activities.
    In place: the same dict is returned, now holding what an `EnrichedActivity` does.
    """
    enriched = cast(EnrichedActivity, activity)
    location = activity.get("location")
    if not location or not (location.get("custom") or location.get("address")):
        enriched["location"] = {"source_ip": client_ip} if client_ip else {}
    enriched["created"] = iso_millis(now)
    enriched["key"] = new_key()
    return enriched


# Truncation used by GATEWAY_IP_ANONYMIZE: what Google Analytics' IP anonymisation keeps.
ANONYMOUS_V4_PREFIX = 24
ANONYMOUS_V6_PREFIX = 48


def anonymize_ip(ip: str) -> str:
    """The address with its host part zeroed: IPv4 to /24, IPv6 to /48."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = ANONYMOUS_V4_PREFIX if address.version == 4 else ANONYMOUS_V6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
