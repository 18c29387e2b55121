"""The spool file's schema: the columns beside the payload, and files of version 1."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from gateway.identity import person_hash
from gateway.spool import QueuedActivity, Spool
from gateway.spool.adopt import adopt_orphans
from gateway.spool.payload import describe

# Version 1 as it was created: the payload alone in the queue.
V1 = (
    """CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, payload BLOB NOT NULL,
        activity_id TEXT NOT NULL, person_hash TEXT NOT NULL, error TEXT NOT NULL,
        failed_at REAL NOT NULL, enqueued_at REAL NOT NULL)""",
    "CREATE INDEX dead_letters_failed_at ON dead_letters (failed_at)",
    "PRAGMA user_version=1",
)
LOGIN = (
    b'{"activity_id":"act:cm:login","fields":{"str::email":" P@Example.com"},'
    b'"created":"2024-05-01T12:00:00.250Z","key":"k1"}'
)
LOGIN_CREATED = 1714564800.25


def old_spool(path: Path, payloads: list[bytes], dead: tuple[bytes, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    for statement in V1:
        db.execute(statement)
    for payload in payloads:
        db.execute("INSERT INTO queue (payload, enqueued_at) VALUES (?, 1.0)", (payload,))
    for i, payload in enumerate(dead, 100):
        db.execute(
            "INSERT INTO dead_letters VALUES (?, ?, 'act:cm:login', 'h', 'refused', 2.0, 1.0)",
            (i, payload),
        )
    db.close()


@pytest.mark.parametrize(
    ("payload", "activity_id", "person", "created"),
    [
        (LOGIN, "act:cm:login", person_hash("e:p@example.com"), LOGIN_CREATED),
        (b'{"activity_id":"a\\"b","fields":{}}', 'a"b', "", None),  # escaped, no person
        (
            b'{"fields":{"str::ei":"x1"},"activity_id":"act:cm:x"}',
            "act:cm:x",
            person_hash("x:x1"),
            None,
        ),
        (b'{"activity_id":"act:cm:x","created":"not a date"}', "act:cm:x", "", None),
        (b"[1]", "", "", None),
        (b"{", "", "", None),
    ],
)
def test_describe_reads_the_columns_out_of_a_payload(
    payload: bytes, activity_id: str, person: str, created: float | None
) -> None:
    assert describe(payload) == QueuedActivity(payload, activity_id, person, created)


async def test_columns_round_trip_through_lease_dead_letters_and_replay(tmp_path: Path) -> None:
    item = QueuedActivity(b"{}", "act:cm:login", "a1b2c3d4e5f6", 1714564800.5)
    async with Spool(tmp_path / "spool.sqlite3") as spool:
        row, _ = await spool.put([item, QueuedActivity(b"[]", "act:cm:x", "", None)])
        leased = await spool.lease(10, 1000)
        assert [(i.payload, i.activity_id, i.person, i.created) for i in leased] == [
            (b"{}", "act:cm:login", "a1b2c3d4e5f6", 1714564800.5),
            (b"[]", "act:cm:x", "", None),
        ]
        await spool.dead_letter([(row, item.activity_id, item.person, "refused")])
        (letter,) = await spool.list_dead_letters()
        assert (letter.activity_id, letter.person_hash) == ("act:cm:login", "a1b2c3d4e5f6")
        assert await spool.replay_dead_letters() == 1
        await spool.release([leased[1].id])
        again = await spool.lease(10, 1000)
        assert [(i.activity_id, i.person, i.created) for i in again] == [
            ("act:cm:x", "", None),
            ("act:cm:login", "a1b2c3d4e5f6", 1714564800.5),
        ]


async def test_a_version_1_file_gets_its_columns_from_the_payloads(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    old_spool(path, [LOGIN, b"not json"], dead=(LOGIN,))
    async with Spool(path) as spool:
        items = await spool.lease(10, 10_000)
        assert [(i.activity_id, i.person, i.created) for i in items] == [
            ("act:cm:login", person_hash("e:p@example.com"), LOGIN_CREATED),
            ("", "", None),
        ]
        assert [i.payload for i in items] == [LOGIN, b"not json"]
        assert await spool.replay_dead_letters() == 1  # its created came along
        (replayed,) = await spool.lease(10, 10_000)
        assert replayed.created == LOGIN_CREATED
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


async def test_adoption_migrates_a_version_1_orphan(tmp_path: Path) -> None:
    orphan, target = tmp_path / "spool.w1", tmp_path / "spool.w0"
    old_spool(orphan, [LOGIN])
    async with Spool(target) as spool:
        await spool.put([describe(orjson.dumps({"activity_id": "act:cm:x"}))])
    (adopted,) = adopt_orphans([str(orphan), str(target)], [str(target)])
    assert adopted.rows == 1 and adopted.removed
    async with Spool(target) as spool:
        items = await spool.lease(10, 10_000)
    assert [(i.activity_id, i.created) for i in items] == [
        ("act:cm:x", None),
        ("act:cm:login", LOGIN_CREATED),
    ]


async def test_rows_an_older_gateway_added_after_the_upgrade_get_their_columns(
    tmp_path: Path,
) -> None:
    # A new command (export, dead-letters) upgraded the file while an older gateway kept
    # appending to it the old way: the next open fills those rows' columns.
    path = tmp_path / "spool.sqlite3"
    old_spool(path, [])
    async with Spool(path):
        pass  # upgraded to version 2
    db = sqlite3.connect(path)
    db.execute("INSERT INTO queue (payload, enqueued_at) VALUES (?, 1.0)", (LOGIN,))
    db.commit()
    db.close()
    async with Spool(path) as spool:
        (item,) = await spool.lease(10, 10_000)
    assert (item.activity_id, item.person, item.created) == (
        "act:cm:login",
        person_hash("e:p@example.com"),
        LOGIN_CREATED,
    )
