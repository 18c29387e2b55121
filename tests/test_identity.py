"""Identity: the person key is the normalised identifier; its hash is short and stable."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.config import ActivitySpec, Settings
from gateway.errors import BadRequest, GatewayError
from gateway.identity import PERSON_HASH_BYTES, person_hash, person_key
from gateway.validation import parse_request

ACTIVITY = "act:cm:login"
SETTINGS = Settings(activities={ACTIVITY: ActivitySpec(ACTIVITY)})


def activity(fields: dict[str, Any] | None = None, person_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"activity_id": ACTIVITY, "location": {}}
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
def test_person_key_normalisation(given: dict[str, Any], key: str) -> None:
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
