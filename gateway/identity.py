"""Who an activity is about: the limiter's person key and a short hash of it for logs.

The person key is the normalised identifier Ortto would merge on, so a browser
cannot dodge its per-person limit by changing case or adding spaces: the trimmed,
lower-cased email (`e:`), else the external id `str::ei` (`x:`), else
`person_id` (`p:`). The prefixes keep the three spaces apart (an external id
that happens to look like an email is another person). Nothing here proves the
browser is that person: anyone may type any email, which is why the per-IP
limit exists.

Signed identity (a later issue): a site that knows who is logged in will sign
the person key with a shared secret (e.g. an HMAC token sent beside the
activity). Its check belongs here, as `verify_identity(activity, token, ...)`
run after validation and before the limiter, comparing the token's subject with
`person_key(activity)` and raising `Unauthorized` (401) on a missing, expired or
mismatched token.
"""

from __future__ import annotations

import hashlib

from gateway.errors import BadRequest
from gateway.validation import NO_IDENTIFIER, Activity

EMAIL_PREFIX = "e:"
EXTERNAL_ID_PREFIX = "x:"
PERSON_ID_PREFIX = "p:"
# 12 hex characters (48 bits): collisions are negligible among the people in one
# log, and too short to stand in for the identifier itself.
PERSON_HASH_BYTES = 6


def person_key(activity: Activity) -> str:
    """The limiter's person key of a validated activity (see the module docstring)."""
    fields = activity.get("fields") or {}
    email = fields.get("str::email")
    if isinstance(email, str) and email.strip():
        return EMAIL_PREFIX + email.strip().lower()
    external_id = fields.get("str::ei")
    if isinstance(external_id, str) and external_id.strip():
        return EXTERNAL_ID_PREFIX + external_id.strip()
    person_id = activity.get("person_id")
    if isinstance(person_id, str) and person_id.strip():
        return PERSON_ID_PREFIX + person_id.strip()
    raise BadRequest(NO_IDENTIFIER, field="fields")


def person_hash(activity_or_key: Activity | str, *, secret: bytes = b"") -> str:
    """A short stable hash of a person key (or an activity's) for logs and dead letters.

    Never log an email: log this. Unkeyed, a known email can be checked against
    it, so it is pseudonymous, not anonymous; pass a stable `secret` (at most 64
    bytes, BLAKE2b's key) to make it useless without that secret.
    """
    key = activity_or_key if isinstance(activity_or_key, str) else person_key(activity_or_key)
    return hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=PERSON_HASH_BYTES, key=secret
    ).hexdigest()
