"""Spool files no worker drains: their queued activities move to one that does."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.enrich import enrich
from gateway.sandbox import SandboxState, wait_for
from gateway.spool import Spool, schema
from gateway.spool.adopt import adopt_orphans
from gateway.spool.files import drained_spool_files, spool_files, worker_spool_path
from gateway.validation import ActivityBody
from tests.processes import GatewayProcess
from tests.spool_support import to_queue


async def fill(path: Path, payloads: list[bytes], *, dead: int = 0, tried: int = 0) -> None:
    """A spool holding `payloads`; the first `dead` become dead letters, the next `tried`
    carry one failed attempt."""
    async with Spool(path) as spool:
        await spool.put(to_queue(payloads))
        items = await spool.lease(len(payloads), 1 << 30)
        if dead:
            await spool.dead_letter([(i.id, "act:cm:login", "h", "refused") for i in items[:dead]])
        await spool.release([i.id for i in items[dead : dead + tried]])
        await spool.release([i.id for i in items[dead + tried :]], attempt=False)


def queued(path: Path) -> list[tuple[bytes, int]]:
    db = sqlite3.connect(path)
    try:
        return [
            (bytes(p), a) for p, a in db.execute("SELECT payload, attempts FROM queue ORDER BY id")
        ]
    finally:
        db.close()


async def test_orphan_rows_go_to_the_end_of_the_drained_spool(tmp_path: Path) -> None:
    main = tmp_path / "spool.sqlite3"
    orphan = Path(worker_spool_path(str(main), 1))
    await fill(main, [b"m1", b"m2"])
    await fill(orphan, [b"o1", b"o2", b"o3"], tried=1)

    done = adopt_orphans(spool_files(str(main)), drained_spool_files(str(main), 1))

    assert [(d.path, d.rows, d.removed) for d in done] == [(str(orphan), 3, True)]
    # In order, after what was there, with their attempts.
    assert queued(main) == [(b"m1", 0), (b"m2", 0), (b"o1", 1), (b"o2", 0), (b"o3", 0)]
    assert not orphan.exists()
    assert not Path(f"{orphan}-wal").exists()
    async with Spool(main) as spool:  # the counters see them; delivery will lease them
        assert spool.depth == 5


async def test_workers_fewer_than_before_send_everything_to_worker_zero(tmp_path: Path) -> None:
    main = tmp_path / "spool.sqlite3"
    for i in range(3):
        await fill(Path(worker_spool_path(str(main), i)), [b"w%d" % i])
    await fill(main, [b"single"])  # from a run without --workers

    owned = drained_spool_files(str(main), 2)
    done = adopt_orphans(spool_files(str(main)), owned)

    assert sorted(d.path for d in done) == sorted([str(main), worker_spool_path(str(main), 2)])
    assert sorted(p for p, _ in queued(Path(owned[0]))) == [b"single", b"w0", b"w2"]
    assert queued(Path(owned[1])) == [(b"w1", 0)]
    assert spool_files(str(main)) == owned


async def test_dead_letters_stay_in_their_file(tmp_path: Path) -> None:
    main = tmp_path / "spool.sqlite3"
    orphan = Path(worker_spool_path(str(main), 1))
    await fill(orphan, [b"bad", b"ok"], dead=1)

    done = adopt_orphans(spool_files(str(main)), [str(main)])

    assert [(d.rows, d.dead_letters_left, d.removed) for d in done] == [(1, 1, False)]
    assert queued(main) == [(b"ok", 0)]
    async with Spool(orphan) as spool:  # `dead-letters` still finds it there
        assert spool.depth == 0
        assert [d.payload for d in await spool.list_dead_letters()] == [b"bad"]


async def test_a_file_that_cannot_be_adopted_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)
    main = tmp_path / "spool.sqlite3"
    locked = Path(worker_spool_path(str(main), 1))
    stranger = Path(worker_spool_path(str(main), 2))
    newer = Path(worker_spool_path(str(main), 3))
    await fill(locked, [b"l1"])
    await fill(newer, [b"n1"])
    sqlite3.connect(newer, isolation_level=None).execute(
        "PRAGMA user_version=99"
    ).connection.close()
    sqlite3.connect(stranger).close()  # an empty SQLite file, not a spool
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing it
    try:
        assert adopt_orphans(spool_files(str(main)), [str(main)]) == []
    finally:
        holder.close()
    assert queued(locked) == [(b"l1", 0)]
    assert queued(newer) == [(b"n1", 0)]
    assert stranger.exists()
    assert sum("cannot adopt" in r.getMessage() for r in caplog.records) == 3
    assert not main.exists() or queued(main) == []


async def test_a_file_a_running_gateway_holds_is_not_an_orphan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main = tmp_path / "spool.sqlite3"
    live = Path(worker_spool_path(str(main), 1))
    # The worker of another gateway (its supervisor killed) still drains and writes it.
    async with Spool(live, exclusive=True) as worker:
        await worker.put(to_queue([b"w1"]))
        assert adopt_orphans(spool_files(str(main)), [str(main)]) == []
        await worker.put(to_queue([b"w2"]))
    assert queued(live) == [(b"w1", 0), (b"w2", 0)]
    assert any("in use by another gateway" in str(r.__dict__.get("data")) for r in caplog.records)
    # Once it has let go, the file is an orphan like any other.
    assert [a.rows for a in adopt_orphans(spool_files(str(main)), [str(main)])] == [2]
    assert not live.exists()


def test_spool_files_without_a_suffix_skip_sqlite_side_files(tmp_path: Path) -> None:
    main = tmp_path / "queue"
    for name in ("queue", "queue.w0", "queue.w0-wal", "queue.w0-shm", "queue.w1", "queue.wx"):
        (tmp_path / name).touch()
    assert spool_files(str(main)) == [
        str(main),
        str(tmp_path / "queue.w0"),
        str(tmp_path / "queue.w1"),
    ]


async def test_in_memory_spool_adopts_nothing(tmp_path: Path) -> None:
    orphan = tmp_path / "x.w0.sqlite3"
    await fill(orphan, [b"a"])
    assert adopt_orphans([str(orphan)], [":memory:"]) == []
    assert queued(orphan) == [(b"a", 0)]


def activity(i: int) -> bytes:
    body: ActivityBody = {"activity_id": "act:cm:login", "fields": {"str::email": f"o{i}@x.io"}}
    return orjson.dumps(enrich(body, "192.0.2.1", time.time()))


@pytest.mark.slow
async def test_serve_delivers_what_a_former_worker_left(
    sandbox: TestServer, sandbox_state: SandboxState, tmp_path: Path, reaper: list[Any]
) -> None:
    main = tmp_path / "spool.sqlite3"
    await fill(Path(worker_spool_path(str(main), 1)), [activity(i) for i in range(7)])
    upstream = str(sandbox.make_url("")).rstrip("/")
    gateway = GatewayProcess(upstream, main, tmp_path / "gw.log")
    reaper.append(gateway)
    async with aiohttp.ClientSession() as session:
        await gateway.start(session)
        await wait_for(lambda: len(sandbox_state.activities) == 7, timeout=15)
        assert await gateway.stop_async() == 0
    assert spool_files(str(main)) == [str(main)]
    assert b"adopted a spool file no worker drains" in gateway.log_path.read_bytes()
