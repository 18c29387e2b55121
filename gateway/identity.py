"""Who an activity is about: the limiter's person key and a short hash of it for logs.

The person key is the normalised identifier Ortto would merge on, so a browser
cannot dodge its per-person limit by changing case or adding spaces: the trimmed,
lower-cased email (`e:`), else the external id `str::ei` (`x:`), else
`person_id` (`p:`). The prefixes keep the three spaces apart (an external id
that happens to look like an email is another person). Nothing here proves the
browser is that person: anyone may type any email, which is why the per-IP
limit exists.

Signed identity (`GATEWAY_IDENTITY_SECRET`): a site that knows who is logged in
signs the visitor's email on its backend and hands the token to the page; the
gateway then refuses an activity whose identity is unsigned, expired or for another
email. Token format, all ASCII:

    v1.<expires: unix seconds>.<base64url(HMAC-SHA256(secret, "v1.<expires>.<email>")), no padding>

where `<email>` is trimmed and lower-cased. The email itself is not in the token
(it travels in the activity); the MAC binds the two. Several secrets verify (the
first one signs), so a secret can be rotated without refusing live pages.
Comparison is constant-time.

A `person_id` is signed the same way, with `person_id <id>` in place of the email (a
space cannot occur in an email, so no email's token stands for a person id). An
activity that carries a `person_id` is verified against it, its email aside: the id
decides whose record Ortto changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from gateway.config import is_ascii_digits
from gateway.errors import BadRequest, Unauthorized
from gateway.validation import NO_IDENTIFIER, ActivityParts

EMAIL_PREFIX = "e:"
EXTERNAL_ID_PREFIX = "x:"
PERSON_ID_PREFIX = "p:"
# 12 hex characters (48 bits): collisions are negligible among the people in one
# log, and too short to stand in for the identifier itself.
PERSON_HASH_BYTES = 6


def person_key(activity: ActivityParts) -> str:
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


def person_hash(activity_or_key: ActivityParts | str, *, secret: bytes = b"") -> str:
    """A short stable hash of a person key (or an activity's) for logs and dead letters.

    Never log an email: log this. Unkeyed, a known email can be checked against
    it, so it is pseudonymous, not anonymous; pass a stable `secret` (at most 64
    bytes, BLAKE2b's key) to make it useless without that secret.
    """
    key = activity_or_key if isinstance(activity_or_key, str) else person_key(activity_or_key)
    return hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=PERSON_HASH_BYTES, key=secret
    ).hexdigest()


TOKEN_VERSION = "v1"  # noqa: S105 - the format version, not a secret
# A token is short; anything longer is not one of ours and is not worth hashing.
MAX_TOKEN_CHARS = 200


PERSON_ID_SUBJECT = "person_id "


def _mac(secret: str, expires: int, subject: str) -> str:
    message = f"{TOKEN_VERSION}.{expires}.{subject}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _email_subject(email: str) -> str:
    return email.strip().lower()


def sign_identity(email: str, secret: str, expires: int) -> str:
    """A token saying `email` is this visitor until `expires` (unix seconds)."""
    if any(c.isspace() for c in email.strip()):
        raise ValueError("an email has no whitespace inside")  # else it could sign an id
    return f"{TOKEN_VERSION}.{expires}.{_mac(secret, expires, _email_subject(email))}"


def sign_person_id(person_id: str, secret: str, expires: int) -> str:
    """A token saying Ortto's person `person_id` is this visitor until `expires`."""
    subject = PERSON_ID_SUBJECT + person_id.strip()
    return f"{TOKEN_VERSION}.{expires}.{_mac(secret, expires, subject)}"


def verify_identity(
    token: object, activity: ActivityParts, secrets: Sequence[str], now: float
) -> None:
    """Raise `Unauthorized` unless `token` signs this activity's person (its `person_id`
    when it has one, else its email) and has not expired."""
    if not isinstance(token, str) or not token:
        raise Unauthorized("a signed identity is required for this activity", field="identity")
    person_id = activity.get("person_id")
    if isinstance(person_id, str):
        subject = PERSON_ID_SUBJECT + person_id.strip()
        what = "the person_id"
    else:
        email = (activity.get("fields") or {}).get("str::email")
        if not isinstance(email, str):
            raise Unauthorized("a signed identity needs str::email", field="fields.str::email")
        subject = _email_subject(email)
        what = "the email"
    parts = token.split(".") if len(token) <= MAX_TOKEN_CHARS else []
    if len(parts) != 3 or parts[0] != TOKEN_VERSION or not is_ascii_digits(parts[1]):
        raise Unauthorized("malformed identity token", field="identity", reason="identity_invalid")
    expires = int(parts[1])
    matched = False
    for secret in secrets:
        # Every secret is tried, so the time taken does not tell which one matched.
        matched |= hmac.compare_digest(_mac(secret, expires, subject), parts[2])
    if not matched:
        raise Unauthorized(
            f"identity token does not match {what}", field="identity", reason="identity_invalid"
        )
    if expires <= now:
        raise Unauthorized(
            "identity token has expired", field="identity", reason="identity_invalid"
        )
