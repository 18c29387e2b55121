"""The spool sink while the spool cannot be written: refused requests, a bounded log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.sinks import REFUSAL_LOG_INTERVAL, SpoolSink
from gateway.spool import Spool
from tests.disk_support import Disk
from tests.spool_support import to_queue

ACTIVITY = b'{"activity_id":"act:cm:login","fields":{"str::email":"p@example.com"}}'


async def test_refusals_on_a_full_disk_warn_once_per_interval_with_their_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = Disk().install(monkeypatch)
    now = [1000.0]
    async with Spool(tmp_path / "spool.sqlite3") as spool:
        sink = SpoolSink(
            spool, Metrics(CollectorRegistry(), process_metrics=False), monotonic=lambda: now[0]
        )
        caplog.set_level(logging.INFO, logger="gateway")
        disk.full = True

        def warnings() -> list[tuple[str, int]]:
            return [
                (r.getMessage(), r.__dict__["data"]["refused"])
                for r in caplog.records
                if r.name == "gateway.sinks" and r.levelno == logging.WARNING
            ]

        # The write that finds the disk full: the spool's ERROR, and the first refusal.
        assert sink.reserve(1, len(ACTIVITY))
        with pytest.raises(Unavailable):
            await sink.submit(to_queue([ACTIVITY]), async_=False, merge_by=None)
        assert spool.write_error is not None
        assert warnings() == [("requests refused: spool write failed", 1)]
        # Every request is refused from now on, before any write: no line each.
        for _ in range(50):
            with pytest.raises(Unavailable):
                sink.reserve(1, len(ACTIVITY))
        now[0] += REFUSAL_LOG_INTERVAL - 0.5
        with pytest.raises(Unavailable):
            sink.reserve(1, len(ACTIVITY))
        assert len(warnings()) == 1
        # The interval over: one line for all refused since the last one.
        now[0] += 0.5
        with pytest.raises(Unavailable):
            sink.reserve(1, len(ACTIVITY))
        assert warnings()[1:] == [("requests refused: the spool cannot be written", 52)]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == ["spool cannot be written: activities are refused until it can"]
        disk.full = False
