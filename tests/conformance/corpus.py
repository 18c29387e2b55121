"""The conformance corpus: loading its cases and comparing answers with Ortto's.

A case is one request body, where it came from, how sure we are of what Ortto does with
it, Ortto's documented or recorded answer when there is one, and what the gateway should
forward. tests/conformance/README.md describes the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

CASES = Path(__file__).parent / "cases"
EVIDENCE = frozenset({"documented", "recorded", "client-sends", "none"})
EXPECT = frozenset({"forward", "normalise", "drop", "refuse"})
OUTCOMES = frozenset({"accepted", "invalid"})
# When no case says otherwise, the sandbox's clock reads the time of the recorded answers.
DEFAULT_NOW = "2025-11-05T23:15:23Z"
HEX24 = re.compile(r"^[0-9a-f]{24}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Ids Ortto makes up: an answer matches when it has one of the same shape.
MINTED = {"person_id": HEX24, "activity_id": HEX24, "request_id": UUID}
# What the gateway itself sets on every activity it forwards (design.md, What the upstream
# receives): left out before comparing with a case's `forwarded`.
GATEWAY_OWNED = ("created", "key")


@dataclass(frozen=True)
class Case:
    """One corpus case, as read from its file."""

    file: str
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def request(self) -> dict[str, Any]:
        request: dict[str, Any] = self.data["request"]
        return request

    @property
    def gateway(self) -> dict[str, Any]:
        gateway: dict[str, Any] = self.data["gateway"]
        return gateway

    @property
    def sandbox(self) -> dict[str, Any]:
        sandbox: dict[str, Any] = self.data.get("sandbox") or {}
        return sandbox

    @property
    def now(self) -> float:
        text = self.sandbox.get("now", DEFAULT_NOW)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()

    @property
    def browser_request(self) -> dict[str, Any]:
        """What the browser sends: the case's request unless the gateway part gives its own."""
        request: dict[str, Any] = self.gateway.get("request") or self.request
        return request

    @property
    def pending(self) -> bool:
        return bool(self.data.get("gateway_pending"))


def load_cases() -> list[Case]:
    """Every case of every file under cases/, checked for the format's required keys."""
    cases: list[Case] = []
    for path in sorted(CASES.glob("*.json")):
        for data in orjson.loads(path.read_bytes())["cases"]:
            case = Case(path.name, data)
            check_case(case)
            cases.append(case)
    names = [case.name for case in cases]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ValueError(f"case names used twice: {sorted(duplicates)}")
    return cases


def check_case(case: Case) -> None:
    """Raise ValueError when a case does not follow the format."""
    data = case.data
    where = f"{case.file}: {data.get('name')!r}"
    for key in ("name", "source", "evidence", "request", "ortto_answer", "outcome", "gateway"):
        if key not in data:
            raise ValueError(f"{where}: missing {key}")
    if data["evidence"] not in EVIDENCE:
        raise ValueError(f"{where}: evidence must be one of {sorted(EVIDENCE)}")
    if data["evidence"] in ("documented", "recorded") and not data["source"]:
        raise ValueError(f"{where}: documented or recorded evidence needs a source")
    if data["ortto_answer"] is not None and data["evidence"] not in ("documented", "recorded"):
        raise ValueError(f"{where}: an ortto_answer needs documented or recorded evidence")
    activities = case.request["activities"]
    outcome = data["outcome"]
    if len(outcome) != len(activities) or not set(outcome) <= OUTCOMES:
        raise ValueError(f"{where}: outcome needs accepted or invalid for each activity")
    gateway = case.gateway
    if gateway.get("expect") not in EXPECT or not gateway.get("why"):
        raise ValueError(f"{where}: gateway needs expect ({sorted(EXPECT)}) and why")
    if gateway["expect"] != "refuse":
        forwarded = gateway.get("forwarded")
        if not isinstance(forwarded, list) or len(forwarded) != len(
            case.browser_request["activities"]
        ):
            raise ValueError(f"{where}: gateway.forwarded needs one activity per activity")
    if data.get("gateway_pending") and not data.get("gateway_now"):
        raise ValueError(f"{where}: a pending case says what the gateway does now")


def assert_answer_matches(expected: Any, got: Any, path: str = "body") -> None:
    """Assert ``got`` has Ortto's answer ``expected``: the same keys and values, ids Ortto
    makes up (person_id, activity_id, request_id) only of the same shape unless equal."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{path}: expected an object, got {got!r}"
        assert set(got) == set(expected), f"{path}: keys {sorted(got)} != {sorted(expected)}"
        for key, value in expected.items():
            shape = MINTED.get(key)
            if shape is not None and isinstance(value, str) and got[key] != value:
                assert shape.match(got[key]), f"{path}.{key}: {got[key]!r} is not an id"
                continue
            assert_answer_matches(value, got[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{path}: {got!r}"
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            assert_answer_matches(want, have, f"{path}[{index}]")
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


def outcomes(status: int, body: Any) -> list[str]:
    """Per activity, accepted or invalid, from an answer of Ortto's shape."""
    if status == 200:
        return [
            "invalid" if entry.get("status") == "invalid" else "accepted"
            for entry in body["activities"]
        ]
    if status == 400 and isinstance(body.get("details"), list):
        return ["invalid" for _ in body["details"]]
    if status == 400:
        return ["invalid"]  # a whole-request refusal (the created rules)
    raise AssertionError(f"not an answer about the activities: {status} {body!r}")


def as_forwarded(activity: dict[str, Any]) -> dict[str, Any]:
    """A received activity without what the gateway sets itself (created, key, source_ip)."""
    out = {key: value for key, value in activity.items() if key not in GATEWAY_OWNED}
    location = out.get("location")
    if isinstance(location, dict):
        out["location"] = {k: v for k, v in location.items() if k != "source_ip"}
    return out


def warning_paths(answer: Any) -> list[str]:
    """What a gateway answer's ``warnings`` say: strings as they are, objects by their
    ``field`` (or ``path``); on the answer or on each activity's entry."""
    found: list[str] = []
    holders = [answer] if isinstance(answer, dict) else []
    if isinstance(answer, dict) and isinstance(answer.get("activities"), list):
        holders += [entry for entry in answer["activities"] if isinstance(entry, dict)]
    for holder in holders:
        warnings = holder.get("warnings")
        for item in warnings if isinstance(warnings, list) else []:
            if isinstance(item, str):
                found.append(item)
            elif isinstance(item, dict):
                found.append(str(item.get("field") or item.get("path")))
    return found


def warned(path: str, warnings: list[str]) -> bool:
    """Whether one of the warnings is about the field at ``path``."""
    return any(text == path or text.startswith((path + " ", path + ":")) for text in warnings)
