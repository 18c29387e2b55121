"""The columns of an encoded activity read out of its JSON, for rows that lack them.

Spool files of schema 1 kept only the payload; delivery found the activity id, the
person and `created` in the bytes. Their rows get the columns once, when the file is
migrated (`schema.ensure_schema`), by this parse, the only one left.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

import orjson

from gateway.errors import GatewayError
from gateway.identity import person_hash, person_key
from gateway.spool.items import QueuedActivity
from gateway.validation import EnrichedActivity

__all__ = ["created_at", "describe"]


def created_at(created: object) -> float | None:
    """Unix time of an ISO 8601 `created` (as enrichment writes it), or None."""
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def describe(payload: bytes) -> QueuedActivity:
    """`payload` with its activity id, hashed person and `created` ("" or None if absent)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return QueuedActivity(payload, "", "", None)
    activity_id = data.get("activity_id")
    try:
        # What the relay spooled; a row that is not fails in person_key, caught here.
        who = person_hash(person_key(cast(EnrichedActivity, data)))
    except (GatewayError, KeyError, TypeError, ValueError, AttributeError):  # no person
        who = ""
    return QueuedActivity(
        payload,
        activity_id if isinstance(activity_id, str) else "",
        who,
        created_at(data.get("created")),
    )
