"""Moving a retired host's backlog: `spool export` (--move) and an idempotent `spool import`."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.cli import main
from gateway.enrich import enrich
from gateway.runtime import EXIT_IN_USE, EXIT_SPOOL
from gateway.sandbox import Fault, SandboxState, wait_for
from gateway.spool import Spool, claim, transfer
from gateway.validation import ActivityBody
from tests.conftest import API_KEY
from tests.processes import GatewayProcess, run
from tests.spool_support import to_queue

QUEUE = "SELECT payload, enqueued_at, attempts, activity_id, person, created FROM queue ORDER BY id"
DEAD = (
    "SELECT payload, activity_id, person_hash, error, failed_at, enqueued_at, created"
    " FROM dead_letters ORDER BY id"
)
PATH = "/v1/activities/create"


def activity(i: int) -> bytes:
    body: ActivityBody = {"activity_id": "act:cm:login", "fields": {"str::email": f"m{i}@x.io"}}
    return orjson.dumps(enrich(body, "192.0.2.1", time.time()))


async def fill(path: Path, count: int, *, dead: int = 0, tried: int = 0, error: str = "") -> None:
    """A spool holding `count` activities; the first `dead` become dead letters, the next
    `tried` carry one failed attempt."""
    async with Spool(path) as spool:
        await spool.put(to_queue([activity(i) for i in range(count)]))
        items = await spool.lease(count, 1 << 30)
        letters = [(i.id, i.activity_id, i.person, error or "refused") for i in items[:dead]]
        await spool.dead_letter(letters)
        await spool.release([i.id for i in items[dead : dead + tried]])
        await spool.release([i.id for i in items[dead + tried :]], attempt=False)


def rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return [
            tuple(bytes(v) if isinstance(v, bytes) else v for v in r) for r in db.execute(query)
        ]
    finally:
        db.close()


def spool(*args: str) -> int:
    return main(["spool", *args], {"GATEWAY_API_KEY": API_KEY})


async def test_export_then_import_moves_everything_with_columns_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 6, dead=2, tried=1)
    queued, dead = rows(a, QUEUE), rows(a, DEAD)
    assert [r[2] for r in queued] == [1, 0, 0, 0] and len(dead) == 2

    assert spool("export", "--spool", str(a), "--dead-letters", "-o", str(out)) == 0
    assert "exported 4 activities and 2 dead letters" in capsys.readouterr().err
    assert (rows(a, QUEUE), rows(a, DEAD)) == (queued, dead)  # a copy: the source is kept
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["kind"] for line in lines] == ["queued"] * 4 + ["dead_letter"] * 2
    assert lines[0]["activity"] == orjson.loads(queued[0][0])  # with its key and created
    assert os.stat(out).st_mode & 0o777 == 0o600  # it holds what the spool holds

    assert spool("import", "--spool", str(b), str(out)) == 0
    assert "imported 4 activities and 2 dead letters" in capsys.readouterr().out
    assert (rows(b, QUEUE), rows(b, DEAD)) == (queued, dead)

    # Twice, or into a spool that has them: nothing is added.
    for target in (b, a):
        assert spool("import", "--spool", str(target), str(out)) == 0
        assert "imported 0 activities and 0 dead letters" in capsys.readouterr().out
    assert (rows(b, QUEUE), rows(b, DEAD)) == (queued, dead)
    assert (rows(a, QUEUE), rows(a, DEAD)) == (queued, dead)


async def test_an_imported_key_is_remembered_after_delivery(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 3)
    assert spool("export", "--spool", str(a), "-o", str(out)) == 0
    now = time.time()
    assert transfer.import_file(out, str(b), clock=lambda: now).queued == 3
    async with Spool(b) as target:  # delivered: acknowledged and gone from the queue
        await target.ack([i.id for i in await target.lease(3, 1 << 30)])
    again = transfer.import_file(out, str(b), clock=lambda: now + 60)
    assert again == transfer.Imported(queued=0, dead_letters=0, duplicates=3)
    # Keys are kept IMPORTED_KEYS_KEEP, not forever.
    later = now + transfer.IMPORTED_KEYS_KEEP + 1
    assert transfer.import_file(out, str(b), clock=lambda: later).queued == 3


async def test_export_move_empties_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 5, dead=1)
    queued, dead = rows(a, QUEUE), rows(a, DEAD)
    assert spool("export", "--spool", str(a), "--move", "--dead-letters", "-o", str(out)) == 0
    assert "moved 4 activities and 1 dead letters" in capsys.readouterr().err
    assert rows(a, QUEUE) == rows(a, DEAD) == []
    assert spool("import", "--spool", str(b), str(out)) == 0
    assert (rows(b, QUEUE), rows(b, DEAD)) == (queued, dead)


async def test_without_dead_letters_a_move_leaves_them(tmp_path: Path) -> None:
    a, out = tmp_path / "a.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 3, dead=1)
    dead = rows(a, DEAD)
    assert spool("export", "--spool", str(a), "--move", "-o", str(out)) == 0
    assert rows(a, QUEUE) == [] and rows(a, DEAD) == dead
    assert len(out.read_bytes().splitlines()) == 2


async def test_a_failed_move_leaves_the_source_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.sqlite3"
    await fill(a, 4, dead=1)
    before = (rows(a, QUEUE), rows(a, DEAD))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    # Cannot be written (tests run as root: a directory's mode would not stop them).
    assert spool("export", "--spool", str(a), "--move", "-o", str(not_a_dir / "x.jsonl")) == (
        EXIT_SPOOL
    )
    assert "cannot write" in capsys.readouterr().err
    # Never over an earlier export, which may not have been imported yet.
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_bytes(b"kept\n")
    assert spool("export", "--spool", str(a), "--move", "-o", str(earlier)) == EXIT_SPOOL
    assert "exists" in capsys.readouterr().err
    assert earlier.read_bytes() == b"kept\n"
    # Without -o there is no file to sync before deleting.
    assert spool("export", "--spool", str(a), "--move") == 2
    capsys.readouterr()
    assert (rows(a, QUEUE), rows(a, DEAD)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sqlite3", "earlier.jsonl", "file"]


async def test_a_move_refuses_a_spool_a_gateway_drains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, out = tmp_path / "a.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 2)
    held = claim(str(a))  # as a running gateway holds its spool: some rows may be in flight
    try:
        assert spool("export", "--spool", str(a), "--move", "-o", str(out)) == EXIT_IN_USE
        # A copy is fine meanwhile.
        assert spool("export", "--spool", str(a)) == 0
    finally:
        os.close(held)
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert len(rows(a, QUEUE)) == 2 and not out.exists()


async def test_exported_errors_are_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.sqlite3"
    await fill(a, 1, dead=1, error=f"401 key {API_KEY} refused")
    assert spool("export", "--spool", str(a), "--dead-letters") == 0
    out = capsys.readouterr().out
    assert API_KEY not in out
    assert "refused" in orjson.loads(out)["error"]


async def test_a_damaged_file_imports_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3", tmp_path / "a.jsonl"
    await fill(a, 3)
    assert spool("export", "--spool", str(a), "-o", str(out)) == 0
    with out.open("ab") as f:
        f.write(b'{"kind": "queued", "activity": {}}\n')
    assert spool("import", "--spool", str(b), str(out)) == EXIT_SPOOL
    assert "a.jsonl:4: not an exported row" in capsys.readouterr().err
    assert not b.exists() or rows(b, QUEUE) == []


def queue_depth(path: Path) -> int:
    return len(rows(path, "SELECT id FROM queue"))


@pytest.mark.slow
async def test_a_retired_host_s_backlog_arrives_once_through_another_host(
    sandbox: TestServer, sandbox_state: SandboxState, tmp_path: Path, reaper: list[Any]
) -> None:
    count = 20
    upstream = str(sandbox.make_url("")).rstrip("/")
    env = {"GATEWAY_IP_LIMIT": "1000/1h", "GATEWAY_DRAIN_TIMEOUT": "1s"}
    spool_a, spool_b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    a = GatewayProcess(upstream, spool_a, tmp_path / "a.log", env=env)
    b = GatewayProcess(upstream, spool_b, tmp_path / "b.log", env=env)
    reaper.extend([a, b])
    moved = tmp_path / "handoff" / "a.jsonl"
    moved.parent.mkdir()

    async def cli(*args: str) -> tuple[int, str, str]:
        argv = [sys.executable, "-m", "gateway", "spool", *args]
        # In a thread: the sandbox answers on this event loop meanwhile.
        done = await asyncio.to_thread(run, argv, env=b.env)
        return done.returncode, done.stdout, done.stderr

    sandbox_state.add_fault(Fault(status=503, count=1_000_000))  # Ortto down for good
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(a.start(session), b.start(session))
        emails = [f"r{i}@example.com" for i in range(count)]
        body = {
            "activities": [
                {"activity_id": "act:cm:login", "fields": {"str::email": e}} for e in emails
            ]
        }
        async with session.post(a.url + PATH, json=body) as resp:
            assert resp.status == 202, await resp.text()
        await wait_for(lambda: len(sandbox_state.requests) > 0, timeout=15)  # A tried
        # Host A is retired: it drains until its deadline, then stops with its backlog.
        assert await a.stop_async() == 0
        assert queue_depth(spool_a) == count

        status, _, err = await cli("export", "--spool", str(spool_a), "--move", "-o", str(moved))
        assert status == 0, err
        assert f"moved {count} activities" in err
        assert queue_depth(spool_a) == 0

        # Into B's spool while B serves; then Ortto comes back.
        status, out, err = await cli("import", "--spool", str(spool_b), str(moved))
        assert status == 0, err
        assert f"imported {count} activities" in out
        sandbox_state.clear_faults()
        await wait_for(lambda: len(sandbox_state.activities) >= count, timeout=60)
        assert sorted(x.email or "" for x in sandbox_state.activities) == sorted(emails)
        assert sandbox_state.duplicates == 0
        assert set(sandbox_state.keys_seen().values()) == {1}

        # The same file again: nothing is queued, so nothing more can be sent.
        status, out, err = await cli("import", "--spool", str(spool_b), str(moved))
        assert status == 0, err
        assert f"imported 0 activities and 0 dead letters into {spool_b}; skipped {count}" in out
        assert queue_depth(spool_b) == 0
        assert await b.stop_async() == 0
    assert len(sandbox_state.activities) == count and sandbox_state.duplicates == 0
