"""Tests for the durable spool."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.sandbox import wait_for
from gateway.spool import (
    MEMORY,
    DeadLetter,
    Spool,
    SpoolClosed,
    SpoolError,
    SpoolFull,
    SpoolInUse,
    SpoolOpenError,
    SpoolStats,
    claim,
    commit,
    in_use,
    schema,
    writer,
)
from gateway.spool import queue as spool_queue
from gateway.spool.writer import Lease
from tests.disk_support import Disk
from tests.spool_support import to_queue

DEADLINE = 10.0  # seconds any single awaited condition may take before the test fails


@pytest.fixture(autouse=True, params=["loop", "thread"])
def commit_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with groups committed on the event loop and on the writer thread."""
    mode: str = request.param
    monkeypatch.setattr(commit, "choose_commit_mode", lambda path: mode)
    return mode


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "spool.sqlite3"


@pytest.fixture
async def spool(db_path: Path) -> AsyncIterator[Spool]:
    async with Spool(db_path) as s:
        yield s


async def put_each(spool: Spool, payloads: list[bytes]) -> list[int]:
    ids: list[int] = []
    for payload in payloads:
        ids += await spool.put(to_queue([payload]))
    return ids


async def drain(spool: Spool) -> list[tuple[int, bytes, int]]:
    items = await spool.lease(1_000_000, 1 << 40)
    return [(i.id, i.payload, i.attempts) for i in items]


# --- queue basics -------------------------------------------------------------------------


async def test_put_lease_ack_in_order(spool: Spool) -> None:
    ids = await put_each(spool, [b"a", b"b", b"c"])
    assert ids == sorted(ids) and len(set(ids)) == 3
    batch = await spool.put(to_queue([b"d", b"e"]))
    assert batch == [ids[-1] + 1, ids[-1] + 2]
    items = await spool.lease(10, 1000)
    assert [i.payload for i in items] == [b"a", b"b", b"c", b"d", b"e"]
    assert [i.id for i in items] == ids + batch
    assert all(i.attempts == 0 for i in items)
    await spool.ack([i.id for i in items[:2]])
    assert spool.depth == 3
    await spool.release([i.id for i in items[2:]], attempt=False)
    assert [i.payload for i in await spool.lease(10, 1000)] == [b"c", b"d", b"e"]


async def test_leased_items_are_not_leased_again(spool: Spool) -> None:
    await put_each(spool, [b"1", b"2", b"3"])
    first = await spool.lease(2, 1000)
    second = await spool.lease(10, 1000)
    assert [i.payload for i in first] == [b"1", b"2"]
    assert [i.payload for i in second] == [b"3"]
    assert await spool.lease(10, 1000) == []
    assert spool.leased == 3
    await spool.put(to_queue([b"4"]))
    assert [i.payload for i in await spool.lease(10, 1000)] == [b"4"]


async def test_release_counts_attempts_and_keeps_order(spool: Spool) -> None:
    await put_each(spool, [b"1", b"2", b"3", b"4"])
    items = await spool.lease(4, 1000)
    await spool.ack([items[1].id])
    await spool.release([items[2].id, items[0].id])
    await spool.release([items[3].id], attempt=False)
    again = await spool.lease(10, 1000)
    assert [(i.payload, i.attempts) for i in again] == [(b"1", 1), (b"3", 1), (b"4", 0)]
    await spool.release([again[0].id])
    assert [(i.payload, i.attempts) for i in await spool.lease(10, 1000)] == [(b"1", 2)]


async def test_lease_limits(spool: Spool) -> None:
    await put_each(spool, [b"x" * 10] * 5)
    assert len(await spool.lease(2, 1000)) == 2
    assert len(await spool.lease(10, 25)) == 2  # 10 + 10 fits, a third would be 30
    assert len(await spool.lease(10, 10)) == 1
    assert await spool.lease(10, 1000) == []


async def test_lease_returns_one_oversized_item(spool: Spool) -> None:
    await put_each(spool, [b"y" * 100, b"z"])
    items = await spool.lease(10, 50)
    assert [i.payload for i in items] == [b"y" * 100]
    assert [i.payload for i in await spool.lease(10, 50)] == [b"z"]


async def test_lease_prefers_released_items_in_id_order(spool: Spool) -> None:
    await put_each(spool, [b"1", b"2", b"3", b"4", b"5"])
    items = await spool.lease(3, 1000)
    await spool.release([items[2].id, items[0].id], attempt=False)
    assert [i.payload for i in await spool.lease(2, 1000)] == [b"1", b"3"]
    assert [i.payload for i in await spool.lease(5, 1000)] == [b"4", b"5"]


async def test_cancelled_lease_gives_items_back(spool: Spool) -> None:
    await spool.put(to_queue([b"1"]))
    task = asyncio.create_task(spool.lease(10, 1000))
    await asyncio.sleep(0)  # let the task submit its lease, then walk away from it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(DEADLINE):
        while not (items := await spool.lease(10, 1000)):
            await spool.wait_for_items(DEADLINE)
    assert [(i.payload, i.attempts) for i in items] == [(b"1", 0)]


async def test_empty_calls_and_bad_arguments(spool: Spool) -> None:
    assert await spool.put(to_queue([])) == []
    await spool.ack([])
    await spool.release([])
    await spool.dead_letter([])
    with pytest.raises(ValueError):
        await spool.lease(0, 1000)
    assert spool.commits == 0
    with pytest.raises(ValueError):
        Spool(":memory:", max_rows=0)


# --- group commit ---------------------------------------------------------------------------


async def test_concurrent_puts_share_commits(spool: Spool) -> None:
    results = await asyncio.gather(*(spool.put(to_queue([b"p%d" % n])) for n in range(200)))
    ids = [r[0] for r in results]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)  # submission order is commit order
    assert spool.depth == 200
    assert 1 <= spool.commits <= 20


async def test_max_group_caps_a_transaction(db_path: Path) -> None:
    async with Spool(db_path, max_group=10) as spool:
        await asyncio.gather(*(spool.put(to_queue([b"p"])) for _ in range(100)))
        assert spool.commits >= 10


async def test_commit_interval_lingers_for_more(db_path: Path) -> None:
    async with Spool(db_path, commit_interval=0.05) as spool:
        tasks = [asyncio.create_task(spool.put(to_queue([b"p"]))) for _ in range(20)]
        await asyncio.gather(*tasks)
        assert spool.commits == 1


async def test_one_failing_put_does_not_fail_its_group(db_path: Path) -> None:
    async with Spool(db_path, max_rows=3) as spool:
        raw = [[b"a"], [b"b", b"c", b"d"], [b"e"]]
        puts = [to_queue(p) for p in raw]
        results = await asyncio.gather(*map(spool.put, puts), return_exceptions=True)
        assert isinstance(results[1], SpoolFull)
        assert results[0] == [1] and results[2] == [2]
        assert [p for _, p, _ in await drain(spool)] == [b"a", b"e"]


# --- capacity -------------------------------------------------------------------------------


async def test_full_by_rows(db_path: Path) -> None:
    async with Spool(db_path, max_rows=3) as spool:
        await put_each(spool, [b"1", b"2", b"3"])
        with pytest.raises(SpoolFull) as full:
            await spool.put(to_queue([b"4"]))
        assert full.value.retry_after > 0
        assert spool.depth == 3
        items = await spool.lease(1, 1000)
        await spool.ack([items[0].id])
        with pytest.raises(SpoolFull) as full:
            await spool.put(to_queue([b"4", b"5"]))  # a request is all or nothing
        assert 1.0 <= full.value.retry_after <= 30.0
        await spool.put(to_queue([b"4"]))
        assert [p for _, p, _ in await drain(spool)] == [b"2", b"3", b"4"]


async def test_full_by_bytes(db_path: Path) -> None:
    async with Spool(db_path, max_bytes=100) as spool:
        await spool.put(to_queue([b"x" * 60]))
        with pytest.raises(SpoolFull) as full:
            await spool.put(to_queue([b"y" * 41]))
        assert full.value.retry_after > 0
        await spool.put(to_queue([b"y" * 40]))
        assert (await spool.stats()).bytes == 100
        items = await spool.lease(1, 1000)
        await spool.ack([items[0].id])
        await spool.put(to_queue([b"z" * 60]))
        assert (await spool.stats()).bytes == 100


async def test_concurrent_puts_cannot_overshoot(db_path: Path) -> None:
    async with Spool(db_path, max_rows=10) as spool:
        results = await asyncio.gather(
            *(spool.put(to_queue([b"p"])) for _ in range(50)), return_exceptions=True
        )
        accepted = [r for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, SpoolFull)]
        assert len(accepted) == 10 and len(refused) == 40
        assert spool.depth == 10


async def test_has_room_counts_committed_and_pending_puts(db_path: Path) -> None:
    async with Spool(db_path, max_rows=3, max_bytes=100) as spool:
        await spool.put(to_queue([b"x" * 10]))
        assert spool.has_room(2, 90)
        assert not spool.has_room(3, 1)
        assert not spool.has_room(1, 91)
        pending = asyncio.create_task(spool.put(to_queue([b"y" * 10])))
        await asyncio.sleep(0)  # submitted, not yet answered
        assert not spool.has_room(2, 1)
        assert spool.has_room(1, 80)
        await pending
        assert not spool.has_room(2, 1)
        assert spool.has_room(1, 80)
        items = await spool.lease(10, 1000)
        await spool.ack([items[0].id])
        assert spool.has_room(2, 90)


async def test_reserved_room_is_held_until_the_put_or_unreserve(db_path: Path) -> None:
    async with Spool(db_path, max_rows=3, max_bytes=100) as spool:
        assert spool.reserve(2, 60)
        assert not spool.reserve(2, 10)  # 4 rows
        assert not spool.has_room(1, 41)  # 101 bytes
        ids = await spool.put(to_queue([b"a" * 30, b"b" * 30]), reserved=True)
        assert len(ids) == 2
        assert spool.has_room(1, 40) and not spool.has_room(2, 1)
        assert spool.reserve(1, 40)
        spool.unreserve(1, 40)
        assert spool.has_room(1, 40)


async def test_a_reserved_put_to_a_closed_spool_gives_the_room_back(db_path: Path) -> None:
    spool = Spool(db_path, max_rows=3, max_bytes=100)
    await spool.open()
    assert spool.reserve(1, 10)
    await spool.close()
    with pytest.raises(SpoolClosed):
        await spool.put(to_queue([b"x" * 10]), reserved=True)
    assert spool.has_room(3, 100)


async def test_an_exclusive_spool_is_held_until_closed(db_path: Path) -> None:
    async with Spool(db_path, exclusive=True) as first:
        await first.put(to_queue([b"x"]))
        with pytest.raises(SpoolInUse, match="in use by another gateway"):
            await Spool(db_path, exclusive=True).open()
        # Tools that only read or replay (dead-letters) still open it.
        async with Spool(db_path) as tool:
            assert tool.depth == 1
        await first.put(to_queue([b"y"]))  # the tool's closing did not disturb the holder
    assert not in_use(str(db_path))
    async with Spool(db_path, exclusive=True) as again:
        assert again.depth == 2


async def test_a_new_exclusive_spool_is_created_as_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(commit, "fsync_dir", synced.append)
    old_umask = os.umask(0o022)
    try:
        for name, exclusive in (("plain.sqlite3", False), ("held.sqlite3", True)):
            async with Spool(tmp_path / name, exclusive=exclusive):
                pass
            # `claim` creates the file first: it must still count as new (directory
            # fsynced) and get SQLite's own mode.
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old_umask)
    assert synced == [tmp_path, tmp_path]


async def test_in_use_sees_another_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "held.sqlite3")
    assert not in_use(path)
    fd = claim(path)
    try:
        assert in_use(path)
        with pytest.raises(SpoolInUse):
            claim(path)
    finally:
        os.close(fd)
    assert not in_use(path)


async def test_available_excludes_leased(spool: Spool) -> None:
    await put_each(spool, [b"1", b"2", b"3"])
    assert (spool.depth, spool.available, spool.leased) == (3, 3, 0)
    items = await spool.lease(2, 1000)
    assert (spool.depth, spool.available, spool.leased) == (3, 1, 2)
    await spool.release([items[0].id])
    assert (spool.available, spool.leased) == (2, 1)
    await spool.ack([items[1].id])
    assert (spool.depth, spool.available, spool.leased) == (2, 2, 0)


async def test_payloads_that_can_never_fit(db_path: Path) -> None:
    async with Spool(db_path, max_rows=2, max_bytes=10) as spool:
        with pytest.raises(ValueError):
            await spool.put(to_queue([b"1", b"2", b"3"]))
        with pytest.raises(ValueError):
            await spool.put(to_queue([b"x" * 11]))


# --- persistence ------------------------------------------------------------------------------


async def test_reopen_keeps_unacked_items_in_order(db_path: Path) -> None:
    async with Spool(db_path) as spool:
        ids = await put_each(spool, [b"1", b"2", b"3", b"4"])
        items = await spool.lease(3, 1000)
        await spool.ack([items[1].id])
        await spool.release([items[0].id])
        # items[2] stays leased: leases die with the process
    async with Spool(db_path) as spool:
        assert spool.depth == 3
        stats = await spool.stats()
        assert stats.bytes == 3 and stats.oldest_enqueued_at is not None
        assert await drain(spool) == [(ids[0], b"1", 1), (ids[2], b"3", 0), (ids[3], b"4", 0)]
        more = await spool.put(to_queue([b"5"]))
        assert more[0] > ids[-1]


async def test_ids_are_never_reused(db_path: Path) -> None:
    async with Spool(db_path) as spool:
        first = await spool.put(to_queue([b"1"]))
        await spool.ack(first)
        assert spool.depth == 0
        second = await spool.put(to_queue([b"2"]))
        assert second[0] > first[0]
        assert [p for _, p, _ in await drain(spool)] == [b"2"]
    async with Spool(db_path) as spool:
        third = await spool.put(to_queue([b"3"]))
        assert third[0] > second[0]


async def test_file_is_wal(spool: Spool, db_path: Path) -> None:
    await spool.put(to_queue([b"1"]))
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[1] for r in other.execute("PRAGMA index_list(dead_letters)")}
        assert "dead_letters_failed_at" in indexes
    other.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.spool import Spool
    from tests.spool_support import to_queue

    async def writer(spool, w):
        n = 0
        while True:
            payloads = [b"%d-%d-%d" % (w, n, k) for k in range(3)]
            ids = await spool.put(to_queue(payloads))
            print(w, n, *ids, flush=True)
            n += 1

    async def main(path):
        async with Spool(path) as spool:
            print("ready", flush=True)
            await asyncio.gather(*(writer(spool, w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("kill_after", [1, 40, 400])
async def test_everything_acknowledged_survives_sigkill(db_path: Path, kill_after: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(db_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(DEADLINE * 3):
            assert await proc.stdout.readline() == b"ready\n", await proc.stderr.read()
            while len(lines) < kill_after:
                line = await proc.stdout.readline()
                assert line, await proc.stderr.read()
                lines.append(line)
    finally:
        proc.kill()  # SIGKILL, mid-stream: no cleanup runs in the child
        rest, _ = await proc.communicate()
    lines += rest.splitlines(keepends=True)
    assert proc.returncode == -9
    promised: dict[int, bytes] = {}
    for line in lines:
        if not line.endswith(b"\n"):
            continue  # cut off mid-print: this put's answer never fully left the process
        w, n, *ids = line.split()
        for k, row_id in enumerate(ids):
            promised[int(row_id)] = b"%s-%s-%d" % (w, n, k)
    assert len(promised) >= 3 * kill_after
    async with Spool(db_path) as spool:
        stored = {row_id: payload for row_id, payload, _ in await drain(spool)}
        assert spool.depth == len(stored)
    assert {i: stored.get(i) for i in promised} == promised
    # Every put is all or nothing, committed or not.
    groups: dict[bytes, int] = {}
    for payload in stored.values():
        key = payload.rsplit(b"-", 1)[0]
        groups[key] = groups.get(key, 0) + 1
    assert set(groups.values()) == {3}


# --- dead letters ---------------------------------------------------------------------------


async def test_dead_letter_move_list_replay_purge(spool: Spool) -> None:
    ids = await put_each(spool, [b"a", b"b", b"c", b"d"])
    items = await spool.lease(4, 1000)
    await spool.dead_letter(
        [
            (ids[0], "act:cm:a", "h1", "400 Created date is more than 90 days ago"),
            (ids[1], "act:cm:b", "h2", "400 unknown person field str::foo"),
            (ids[2], "act:cm:c", "h3", "400 Created date is more than 90 days ago"),
        ]
    )
    assert spool.depth == 1 and spool.leased == 1
    assert await spool.stats() == SpoolStats(1, 1, (await spool.stats()).oldest_enqueued_at, 3)
    listed = await spool.list_dead_letters()
    assert [d.id for d in listed] == [ids[2], ids[1], ids[0]]  # newest first
    first = next(d for d in listed if d.id == ids[0])
    assert isinstance(first, DeadLetter)
    assert (first.payload, first.activity_id, first.person_hash) == (b"a", "act:cm:a", "h1")
    assert first.enqueued_at == items[0].enqueued_at and first.failed_at >= first.enqueued_at
    assert [d.id for d in await spool.list_dead_letters(error_contains="CREATED DATE")] == [
        ids[2],
        ids[0],
    ]
    assert len(await spool.list_dead_letters(limit=1)) == 1

    assert await spool.replay_dead_letters(error_contains="created date") == 2
    assert (await spool.stats()).dead_letters == 1
    back = await spool.lease(10, 1000)
    assert [(i.payload, i.attempts) for i in back] == [(b"a", 0), (b"c", 0)]
    assert all(i.id > ids[-1] for i in back)
    assert spool.depth == 3

    assert await spool.purge_dead_letters(ids=[ids[1], 999]) == 1
    assert await spool.list_dead_letters() == []
    assert (await spool.stats()).dead_letters == 0


async def test_dead_letter_filters_combine(spool: Spool) -> None:
    ids = await put_each(spool, [b"a", b"b", b"c"])
    await spool.dead_letter([(i, "act", "h", f"error {i % 2}") for i in ids])
    assert await spool.replay_dead_letters(ids=[ids[0], ids[1]], error_contains="error 1") == 1
    assert await spool.purge_dead_letters(ids=[]) == 0
    assert await spool.purge_dead_letters(error_contains="nothing like it") == 0
    assert await spool.purge_dead_letters() == 2
    assert (await spool.stats()).dead_letters == 0


async def test_dead_letter_of_missing_row_is_ignored(spool: Spool) -> None:
    ids = await spool.put(to_queue([b"a"]))
    await spool.ack(ids)
    await spool.dead_letter([(ids[0], "act", "h", "late")])
    assert await spool.list_dead_letters() == []


async def test_replay_respects_capacity(db_path: Path) -> None:
    async with Spool(db_path, max_rows=2) as spool:
        ids = await put_each(spool, [b"a", b"b"])
        await spool.dead_letter([(i, "act", "h", "e") for i in ids])
        await spool.put(to_queue([b"c"]))
        with pytest.raises(SpoolFull):
            await spool.replay_dead_letters()
        assert (await spool.stats()).dead_letters == 2
        assert await spool.replay_dead_letters(ids=[ids[1]]) == 1
        assert spool.depth == 2


async def test_dead_letters_survive_reopen(db_path: Path) -> None:
    async with Spool(db_path) as spool:
        ids = await spool.put(to_queue([b"a"]))
        await spool.dead_letter([(ids[0], "act", "h", "e")])
    async with Spool(db_path) as spool:
        assert (await spool.stats()).dead_letters == 1
        assert spool.depth == 0
        assert [d.payload for d in await spool.list_dead_letters()] == [b"a"]


async def test_another_process_replaying_is_noticed(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "EXTERNAL_CHECK_INTERVAL", 0.02)
    monkeypatch.setattr(spool_queue, "EXTERNAL_CHECK_INTERVAL", 0.02)
    async with Spool(db_path) as server:
        ids = await put_each(server, [b"a", b"b"])
        await server.lease(10, 1000)
        await server.dead_letter([(ids[0], "act", "h", "e")])
        await server.ack([ids[1]])
        assert await server.wait_for_items(0) is False
        async with Spool(db_path) as cli:  # as `ortto-gateway dead-letters replay` does
            assert await cli.replay_dead_letters() == 1
        assert await server.wait_for_items(DEADLINE) is True
        assert (await server.stats()).dead_letters == 0
        assert server.depth == 1
        assert [i.payload for i in await server.lease(10, 1000)] == [b"a"]


# --- waiting, stats, lifecycle ----------------------------------------------------------------


async def test_wait_for_items_wakes_on_put(spool: Spool) -> None:
    assert await spool.wait_for_items(0.01) is False
    waiter = asyncio.create_task(spool.wait_for_items(DEADLINE))
    await asyncio.sleep(0)
    assert not waiter.done()
    await spool.put(to_queue([b"a"]))
    assert await asyncio.wait_for(waiter, DEADLINE) is True
    assert await spool.wait_for_items(0) is True


async def test_wait_for_items_waits_for_a_count(spool: Spool) -> None:
    await spool.put(to_queue([b"a", b"b"]))
    assert await spool.wait_for_items(0.01, count=3) is False
    waiter = asyncio.create_task(spool.wait_for_items(DEADLINE, count=3))
    await spool.put(to_queue([b"c"]))  # the put's commit publishes 3 available
    assert await asyncio.wait_for(waiter, DEADLINE) is True
    assert spool.available == 3
    assert spool._waiters == []  # nothing left behind


async def test_wait_for_items_ends_when_the_spool_closes(db_path: Path) -> None:
    spool = Spool(db_path)
    await spool.open()
    waiter = asyncio.create_task(spool.wait_for_items(None, count=5))
    await asyncio.sleep(0)
    await spool.close()
    with pytest.raises(SpoolClosed):
        await asyncio.wait_for(waiter, DEADLINE)


async def test_wait_for_items_ignores_leased_items(spool: Spool) -> None:
    await spool.put(to_queue([b"a"]))
    items = await spool.lease(10, 1000)
    assert await spool.wait_for_items(0.01) is False
    await spool.release([i.id for i in items])
    assert await spool.wait_for_items(DEADLINE) is True


async def test_close_wakes_waiters(db_path: Path) -> None:
    spool = Spool(db_path)
    await spool.open()
    waiter = asyncio.create_task(spool.wait_for_items(None))
    await asyncio.sleep(0)
    await spool.close()
    with pytest.raises(SpoolClosed):
        await asyncio.wait_for(waiter, DEADLINE)


async def test_stats(spool: Spool) -> None:
    assert await spool.stats() == SpoolStats(0, 0, None, 0)
    await spool.put(to_queue([b"abc", b"de"]))
    stats = await spool.stats()
    assert (stats.depth, stats.bytes, stats.dead_letters) == (2, 5, 0)
    assert stats.oldest_enqueued_at is not None
    items = await spool.lease(10, 1000)
    assert items[0].enqueued_at == stats.oldest_enqueued_at
    await spool.ack([i.id for i in items])
    assert await spool.stats() == SpoolStats(0, 0, None, 0)


async def test_closed_spool_refuses_work(db_path: Path) -> None:
    spool = Spool(db_path)
    with pytest.raises(SpoolClosed):
        await spool.put(to_queue([b"a"]))
    await spool.open()
    pending = [asyncio.create_task(spool.put(to_queue([b"%d" % n]))) for n in range(50)]
    await asyncio.sleep(0)  # submitted before close: close must flush them
    await spool.close()
    assert all(len(task.result()) == 1 for task in pending)
    with pytest.raises(SpoolClosed):
        await spool.put(to_queue([b"a"]))
    with pytest.raises(SpoolClosed):
        await spool.lease(1, 1)
    with pytest.raises(SpoolClosed):
        await spool.wait_for_items(0)
    await spool.close()  # idempotent
    with pytest.raises(RuntimeError):
        await spool.open()
    async with Spool(db_path) as again:
        assert again.depth == 50


async def test_open_failure_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    spool = Spool(blocker / "spool.sqlite3")  # parent is a file
    with pytest.raises(SpoolOpenError) as caught:
        await spool.open()
    path = blocker / "spool.sqlite3"
    assert str(caught.value) == f"cannot open the spool {path}: {blocker} is not a directory"
    with pytest.raises(SpoolClosed):
        await spool.put(to_queue([b"a"]))
    await spool.close()


async def test_open_rejects_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    spool = Spool(path)
    with pytest.raises(SpoolOpenError) as caught:
        await spool.open()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    assert str(caught.value).startswith(f"cannot open the spool {path}: ")
    await spool.close()


@pytest.mark.parametrize("fresh", [True, False], ids=["new-file", "existing-file"])
async def test_opening_on_a_full_disk_names_the_path_and_the_cause(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    # SQLite rolls the transaction back itself on SQLITE_FULL: the schema check's own
    # ROLLBACK then failed ("cannot rollback - no transaction is active") and hid the cause.
    disk = Disk().install(monkeypatch)
    if not fresh:
        async with Spool(db_path) as spool:
            await spool.put(to_queue([b"kept"]))
    disk.full = True
    spool = Spool(db_path, exclusive=True)
    with pytest.raises(SpoolOpenError) as caught:
        await spool.open()
    assert str(caught.value) == f"cannot open the spool {db_path}: database or disk is full"
    await spool.close()
    disk.full = False  # space again: the file is not held, nothing was lost
    async with Spool(db_path, exclusive=True) as spool:
        assert spool.depth == (0 if fresh else 1)


async def test_memory_variant(tmp_path: Path) -> None:
    async with Spool(MEMORY, max_rows=5) as spool:
        ids = await asyncio.gather(*(spool.put(to_queue([b"%d" % n])) for n in range(5)))
        assert spool.depth == 5
        with pytest.raises(SpoolFull):
            await spool.put(to_queue([b"x"]))
        items = await spool.lease(2, 1000)
        assert [i.id for i in items] == [ids[0][0], ids[1][0]]
        await spool.dead_letter([(items[0].id, "act", "h", "e")])
        assert await spool.replay_dead_letters() == 1
        assert spool.path == ":memory:"
    assert not any(tmp_path.iterdir())


async def test_auto_mode_is_the_one_chosen(db_path: Path, commit_on: str) -> None:
    async with Spool(db_path) as spool:
        assert spool.commit_on == commit_on
        assert await spool.put(to_queue([b"a"])) == [1]
    async with Spool(db_path, commit_on="thread") as spool:  # an explicit choice wins
        assert spool.commit_on == "thread"
        assert spool.depth == 1


def test_commit_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="commit_on"):
        Spool(MEMORY, commit_on="sometimes")


def test_choose_commit_mode_by_fsync_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real chooser, not the autouse stand-in
    assert commit.choose_commit_mode(MEMORY) == "loop"
    path = str(tmp_path / "new" / "spool.sqlite3")
    monkeypatch.setattr(commit, "FAST_FSYNC_SECONDS", 0.0)  # no disk is that fast
    assert commit.choose_commit_mode(path) == "thread"
    monkeypatch.setattr(commit, "FAST_FSYNC_SECONDS", 3600.0)
    assert commit.choose_commit_mode(path) == "loop"
    assert [p.name for p in (tmp_path / "new").iterdir()] == []  # the probe file is gone
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    assert commit.choose_commit_mode(str(blocker / "spool.sqlite3")) == "thread"


def test_auto_mode_goes_by_the_median_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected timing: one slow outlier does not make a fast disk "thread"."""
    monkeypatch.undo()  # the real chooser, not the autouse stand-in
    fast, slow = commit.FAST_FSYNC_SECONDS / 2, commit.FAST_FSYNC_SECONDS * 2
    path = str(tmp_path / "spool.sqlite3")
    for times, mode in [
        ([fast, fast, fast, fast, slow], "loop"),
        ([fast, fast, slow, slow, slow], "thread"),
        ([fast, slow, slow, slow, slow], "thread"),
    ]:
        monkeypatch.setattr(commit, "fsync_times", lambda d, n, t=times: sorted(t))
        assert commit.choose_commit_mode(path) == mode


async def test_a_write_lock_held_elsewhere_delays_puts_without_blocking(
    db_path: Path, commit_on: str
) -> None:
    """Another process mid-transaction (the dead-letters command): puts wait for it and
    then commit; in "loop" mode the event loop keeps running meanwhile."""
    async with Spool(db_path) as spool:
        await spool.put(to_queue([b"first"]))
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            put = asyncio.create_task(spool.put(to_queue([b"second"])))
            loop = asyncio.get_running_loop()
            longest = 0.0
            for _ in range(30):  # the loop turns while the lock is held
                before = loop.time()
                await asyncio.sleep(0.01)
                longest = max(longest, loop.time() - before)
            assert not put.done()
            # A put that waited on the loop would block it for the whole busy timeout
            # (5 s) in one turn; half of that is far above any scheduling delay.
            assert longest < schema.BUSY_TIMEOUT_MS / 2000
        finally:
            other.execute("COMMIT")
            other.close()
        assert await asyncio.wait_for(put, DEADLINE) == [2]
        assert spool.depth == 2


async def test_close_fails_puts_still_locked_out(
    db_path: Path, commit_on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if commit_on != "loop":
        pytest.skip("the writer thread waits for the lock on its own")
    spool = Spool(db_path)
    await spool.open()
    other = sqlite3.connect(db_path, isolation_level=None)
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 50)  # how long close waits
    try:
        other.execute("BEGIN IMMEDIATE")
        put = asyncio.create_task(spool.put(to_queue([b"x"])))
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not spool._busy_group:  # the put met the lock and waits for a retry
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        await spool.close()
        with pytest.raises(SpoolClosed):
            await put
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_a_lease_cancelled_after_its_answer_gives_the_items_back(spool: Spool) -> None:
    """The caller was cancelled between the answer and taking it (the delivery loop
    stopped at shutdown): the items must not stay leased to nobody until a restart."""
    await spool.put(to_queue([b"a", b"b"]))
    op = Lease(spool._future(), 10, 1 << 20)
    waiter = asyncio.ensure_future(spool._submit(op))
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not op.future.done():  # answered; the waiter has not resumed yet
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)
    assert not waiter.done() and spool.leased == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    while spool.leased:  # the release commits in a later group
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    assert spool.available == 2
    items = await spool.lease(10, 1 << 20)
    assert [(i.payload, i.attempts) for i in items] == [(b"a", 0), (b"b", 0)]


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    return Disk().install(monkeypatch)


async def test_a_release_that_cannot_be_written_still_gives_the_rows_back(
    disk: Disk, db_path: Path
) -> None:
    async with Spool(db_path) as spool:
        await spool.put(to_queue([b"1", b"2"]))
        items = await spool.lease(10, 1000)
        disk.full = True
        await spool.release([i.id for i in items])  # the attempt count cannot be written
        assert disk.refused >= 1
        assert spool.leased == 0
        again = await spool.lease(10, 1000)  # not stranded as leased until a restart
        assert [(i.payload, i.attempts) for i in again] == [(b"1", 0), (b"2", 0)]


async def test_an_ack_that_fails_leaves_the_rows_leased_for_a_retry(
    disk: Disk, db_path: Path
) -> None:
    async with Spool(db_path) as spool:
        await spool.put(to_queue([b"1", b"2"]))
        items = await spool.lease(10, 1000)
        disk.full = True
        with pytest.raises(SpoolError, match="database or disk is full"):
            await spool.ack([i.id for i in items])
        assert await spool.lease(10, 1000) == []  # still leased: not sent twice meanwhile
        disk.full = False
        await spool.ack([i.id for i in items])
        assert (spool.depth, spool.leased) == (0, 0)


async def test_a_spool_that_cannot_be_written_says_so_until_a_write_succeeds(
    disk: Disk, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.spool")
    async with Spool(db_path) as spool:
        await spool.put(to_queue([b"before"]))
        assert spool.write_error is None
        disk.full = True
        for _ in range(3):
            with pytest.raises(SpoolError) as caught:
                await spool.put(to_queue([b"refused"]))
            assert not isinstance(caught.value, SpoolFull)
        assert spool.write_error == "database or disk is full"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "spool cannot be written: activities are refused until it can"
        ]  # once, not per refused put
        # Space again, and nobody writes (puts are refused meanwhile): the spool notices.
        disk.full = False
        await wait_for(lambda: spool.write_error is None, timeout=DEADLINE)
        assert "spool writable again" in [r.getMessage() for r in caplog.records]
        await spool.put(to_queue([b"after"]))
        assert [p for _, p, _ in await drain(spool)] == [b"before", b"after"]
