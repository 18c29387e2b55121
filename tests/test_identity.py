"""Identity: the person key is the normalised identifier; its hash is short and stable."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.config import ActivitySpec, Settings
from gateway.errors import BadRequest, GatewayError, Unauthorized
from gateway.identity import (
    PERSON_HASH_BYTES,
    person_hash,
    person_key,
    sign_identity,
    sign_person_id,
    verify_identity,
)
from gateway.validation import ActivityBody, parse_request

ACTIVITY = "act:cm:login"
SETTINGS = Settings(activities={ACTIVITY: ActivitySpec(ACTIVITY)})


def activity(fields: dict[str, Any] | None = None, person_id: str | None = None) -> ActivityBody:
    out: ActivityBody = {"activity_id": ACTIVITY, "location": {}}
    if fields is not None:
        out["fields"] = fields
    if person_id is not None:
        out["person_id"] = person_id
    return out


@pytest.mark.parametrize(
    ("given", "key"),
    [
        (activity({"str::email": "chris@example.com"}), "e:chris@example.com"),
        (activity({"str::email": "  Chris.Smith@Example.COM\n"}), "e:chris.smith@example.com"),
        (activity({"str::email": "a@b", "str::ei": "u-1"}, "006a"), "e:a@b"),
        (activity({"str::ei": "u-1"}, "006a"), "x:u-1"),
        (activity({"str::ei": " U-1 "}), "x:U-1"),  # external ids keep their case
        (activity({"str::email": "  ", "str::ei": "u-1"}), "x:u-1"),
        (activity({"str::first": "Chris"}, " 006a "), "p:006a"),
        (activity(None, "006a"), "p:006a"),
    ],
)
def test_person_key_normalisation(given: ActivityBody, key: str) -> None:
    assert person_key(given) == key


def test_prefixes_keep_identifier_kinds_apart() -> None:
    same_text = "someone@example.com"
    keys = {
        person_key(activity({"str::email": same_text})),
        person_key(activity({"str::ei": same_text})),
        person_key(activity(None, same_text)),
    }
    assert len(keys) == 3


def test_person_key_of_validated_activities_matches_whatever_case_and_spacing() -> None:
    bodies = [
        {"activity_id": ACTIVITY, "fields": {"str::email": "Chris@Example.com"}},
        {"activity_id": ACTIVITY, "attributes": {"str::email": " chris@example.COM "}},
    ]
    keys = set()
    for body in bodies:
        item = parse_request(body, SETTINGS).items[0]
        assert not isinstance(item, GatewayError)
        keys.add(person_key(item))
    assert keys == {"e:chris@example.com"}


def test_no_identifier_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        person_key(activity({"str::first": "Chris"}))


def test_hash_is_short_stable_and_hides_the_email() -> None:
    key = "e:chris@example.com"
    digest = person_hash(key)
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert len(digest) == 2 * PERSON_HASH_BYTES
    assert digest == person_hash(key)
    assert digest == "16b4e1545c8e"  # stable across processes and releases (dead letters)
    assert "chris" not in digest
    assert person_hash(activity({"str::email": " Chris@Example.com "})) == digest
    assert person_hash("e:alex@example.com") != digest


def test_hash_with_a_secret_differs_and_is_stable() -> None:
    key = "x:u-1"
    keyed = person_hash(key, secret=b"site secret")
    assert keyed == person_hash(key, secret=b"site secret")
    assert keyed != person_hash(key)
    assert keyed != person_hash(key, secret=b"other secret")


# -- signed identity tokens

SECRET = "s3cret-" + "x" * 40
OTHER = "rotated-" + "y" * 40
NOW = 1_800_000_000.0


def _activity(email: str) -> ActivityBody:
    return {"activity_id": "act:cm:login", "fields": {"str::email": email}}


def test_token_round_trip_normalises_email() -> None:

    token = sign_identity("  Chris@Example.COM ", SECRET, int(NOW) + 60)
    assert token.startswith("v1.")
    assert "chris" not in token.lower()
    verify_identity(token, _activity("chris@example.com"), [SECRET], NOW)


@pytest.mark.parametrize(
    ("make_token", "email", "needle"),
    [
        (lambda s: None, "chris@example.com", "required"),
        (lambda s: "", "chris@example.com", "required"),
        (lambda s: "not-a-token", "chris@example.com", "malformed"),
        (lambda s: "v2.1.abc", "chris@example.com", "malformed"),
        (lambda s: "v1.x.abc", "chris@example.com", "malformed"),
        (lambda s: "v1.\u00b2.abc", "chris@example.com", "malformed"),  # "²" passes isdigit
        (lambda s: "v1.\u0663\u0663.abc", "chris@example.com", "malformed"),  # Arabic-Indic
        (lambda s: "v1." + "9" * 300, "chris@example.com", "malformed"),
        (lambda s: s("chris@example.com", int(NOW) - 1), "chris@example.com", "expired"),
        (lambda s: s("alex@example.com", int(NOW) + 60), "chris@example.com", "does not match"),
        (
            lambda s: s("chris@example.com", int(NOW) + 60)[:-2] + "AA",
            "chris@example.com",
            "does not match",
        ),
    ],
    ids=[
        "missing",
        "empty",
        "garbage",
        "version",
        "expiry",
        "superscript",
        "other-digits",
        "long",
        "expired",
        "other-email",
        "forged",
    ],
)
def test_bad_tokens_are_refused(make_token, email: str, needle: str) -> None:  # type: ignore[no-untyped-def]

    def sign(e: str, exp: int) -> str:
        return sign_identity(e, SECRET, exp)

    with pytest.raises(Unauthorized, match=needle) as info:
        verify_identity(make_token(sign), _activity(email), [SECRET], NOW)
    assert info.value.status == 401


def test_forging_the_expiry_breaks_the_mac() -> None:

    token = sign_identity("chris@example.com", SECRET, int(NOW) - 10)
    _, _, mac = token.split(".")
    with pytest.raises(Unauthorized, match="does not match"):
        verify_identity(
            f"v1.{int(NOW) + 9999}.{mac}", _activity("chris@example.com"), [SECRET], NOW
        )


def test_rotation_accepts_old_and_new_secrets() -> None:

    old = sign_identity("chris@example.com", OTHER, int(NOW) + 60)
    new = sign_identity("chris@example.com", SECRET, int(NOW) + 60)
    verify_identity(old, _activity("chris@example.com"), [SECRET, OTHER], NOW)
    verify_identity(new, _activity("chris@example.com"), [SECRET, OTHER], NOW)
    with pytest.raises(Unauthorized):
        verify_identity(old, _activity("chris@example.com"), [SECRET], NOW)


def test_identity_needs_an_email() -> None:

    token = sign_identity("chris@example.com", SECRET, int(NOW) + 60)
    activity: ActivityBody = {"activity_id": "act:cm:login", "fields": {"str::ei": "u-1"}}
    with pytest.raises(Unauthorized, match="str::email"):
        verify_identity(token, activity, [SECRET], NOW)


def test_a_person_id_token_signs_the_id_and_no_email_stands_for_it() -> None:
    secret = "s" * 40
    by_id = activity({"str::email": "chris@example.com"}, person_id=" 006a0f ")
    token = sign_person_id("006a0f", secret, 2_000_000_000)
    verify_identity(token, by_id, [secret], 1_900_000_000)  # the id decides, email aside
    email_token = sign_identity("chris@example.com", secret, 2_000_000_000)
    with pytest.raises(Unauthorized, match="does not match the person_id"):
        verify_identity(email_token, by_id, [secret], 1_900_000_000)
    # An "email" spelled like the id's subject is no email: a space cannot occur in one.
    with pytest.raises(ValueError, match="whitespace"):
        sign_identity("person_id 006a0f", secret, 2_000_000_000)
    with pytest.raises(Unauthorized, match="does not match the email"):
        verify_identity(token, activity({"str::email": "chris@example.com"}), [secret], 0)
