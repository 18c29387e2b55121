"""`make bench` (tests/bench) end to end, shortened: it runs, counts honestly, reports.

Speed is never asserted here (the figures are the benchmark's job); what is checked is
that the tool measures what it says: every row ran against a live server, every answer
was a 202, the delivered activities match the accepted ones with no duplicate, and the
report prints the table, the ratios and the commit mode from the same JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import compiled
from tests import redis_support
from tests.bench.report import derive, three_hosts_lines
from tests.bench.run import ROWS, SCALE_OUT
from tests.bench.soak import Received, verdict

REPO = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository, its output kept; at most 5 min."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_a_short_bench_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_tool(
        "tests.bench",
        "--quick",
        "--no-redis",
        "--load-tool",
        "builtin",  # the same run with or without wrk installed
        "--duration",
        "1",
        "--warmup",
        "0",
        "--latency-duration",
        "1",
        "--limiter-keys",
        "20000",
        "--spool-commit",
        "loop",  # `auto` times this disk's fsync: pinned, the report is exact
        "--spool-dir",
        str(tmp_path),
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())

    rows = results["rows"]
    assert list(rows) == [key for key in ROWS if key not in SCALE_OUT]  # all but Redis's
    assert "durable_pure" in rows
    assert rows["batch10"]["activities_per_request"] == 10
    for row in rows.values():
        assert row["accepted_per_s"] > 0
        assert row["non_202"] == 0 and row["errors"] == 0
    derived = results["derived"]
    assert derived["vs_baseline"]["baseline"] == 1.0
    assert 0 < derived["vs_baseline"]["durable"] < 2
    upstream = derived["upstream"]
    assert upstream["duplicates"] == 0 and upstream["left_after_drain"] == 0
    assert upstream["activities"] >= rows["durable"]["rounds"][0]["accepted"]
    assert 1 <= upstream["activities_per_request"] <= 100
    latency = results["latency"]["result"]
    assert latency["non_202"] == 0 and latency["latency_ms"]["p99"] > 0
    assert results["limiter"]["keys"] == 20000 and results["limiter"]["rss_bytes_per_key"] > 0
    modes = {m for per_round in rows["durable"]["spool_commit"] for m in per_round}
    assert modes == {"loop"}

    report = proc.stdout
    assert "baseline: bare aiohttp app" in report
    assert "gateway, durable spool" in report
    assert "10 activities per request: " in report
    # `make test` runs this pure (ORTTO_GATEWAY_NO_EXTENSIONS=1): the report says so.
    assert results["machine"]["compiled"] == compiled.summary()
    assert "compiled core (make compiled: " in report
    assert "HTTP shell alone (relay stubbed)" in report
    assert "spool commits (GATEWAY_SPOOL_COMMIT=loop): loop in every gateway row" in report
    assert "redis: rows skipped (--no-redis)" in report
    # The three-host row needs Redis (its own test below runs it).
    assert results["three_hosts"] == {"skipped": "--no-redis"}
    assert "three hosts, one account: skipped (--no-redis)" in report


@pytest.mark.redis
def test_a_short_three_host_run_counts_every_request_and_activity(tmp_path: Path) -> None:
    """The three-host row for a second: it runs, delivers everything once, and reports."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with redis_support.running(directory) as server:
        proc = run_tool(
            "tests.bench.three_hosts",
            "--redis-url",
            server.url,
            "--duration",
            "1",
            "--warmup",
            "0",
            "--spool-commit",
            "loop",
            "--workdir",
            str(tmp_path),
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["split"] == [10, 1, 1] and data["plan_per_s"] == 20
    assert data["accepted"] > 0 and data["refused_by_gateways"] == {}
    assert data["delivered"] == data["accepted"]
    assert data["lost"] == 0 and data["duplicates"] == 0
    assert data["requests_per_s"] > 0 and data["upstream_requests"] > 0
    assert sum(data["upstream_statuses"].values()) == data["upstream_requests"]
    assert len(data["fallbacks"]) == 3 and data["exit_statuses"] == [0, 0, 0]
    lines = three_hosts_lines({"three_hosts": data})
    assert lines[0].startswith("three hosts, one account") and "429s:" in lines[2]


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_leaks_no_descriptor(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_tool(
        "tests.bench.soak",
        "--duration",
        "6",
        "--connections",
        "8",
        "--rss-slack",
        "4",  # a few seconds set no plateau: memory is the long run's verdict
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["accepted"] > 0 and result["lost"] == 0
    assert result["received_twice"] == 0 and result["received_twice_examples"] == []
    kinds = set(result["answers"])
    assert kinds == {"valid", "gzip", "invalid", "bomb", "truncated_deflate", "slow"}
    assert set(result["answers"]["bomb"]) == {"413"}
    assert result["idle_after"]["fds"] <= result["idle_before"]["fds"] + 8
    assert "verdict: pass" in proc.stdout


def test_the_soak_fails_on_an_activity_received_twice_under_two_keys() -> None:
    received = Received()
    received.add(
        {
            "total": 3,
            "duplicates": 2,  # same-key resends, merged: not listed, and fine
            "activities": [
                {"email": "soak-1@example.com", "key": "k1"},
                {"email": "soak-2@example.com", "key": "k2"},
                {"email": "soak-1@example.com", "key": "k3"},
            ],
        }
    )
    received.add({"total": 4, "duplicates": 2, "activities": [{"email": None, "key": "k4"}]})
    assert received.twice() == ["soak-1@example.com"]
    assert (received.index, received.duplicates) == (4, 2)
    idle = {"fds": 10, "rss_kib": 1000}
    result = {
        "answers": {"valid": {"202": 2}},
        "accepted": 2,
        "lost": 0,
        "received_twice": 1,
        "received_twice_examples": received.twice(),
        "idle_before": idle,
        "idle_after": idle,
        "plateau_rss_kib": 1000,
    }
    assert verdict(result) == [
        "1 activities reached Ortto twice under two keys (e.g. soak-1@example.com)"
    ]
    assert verdict({**result, "received_twice": 0, "received_twice_examples": []}) == []


def test_the_scale_out_ceiling_is_the_cpus_the_other_processes_left() -> None:
    """2 CPUs, 0.4 cores to wrk, the sandbox and Redis in the 2-worker row, one worker
    using 0.8 cores: two could reach at most (2 - 0.4) / 0.8 = 2.0x; with 0.6 cores
    taken, 1.75x."""

    def row(rate: float, server: float, others: float) -> dict[str, Any]:
        cores = {"server": server, "load generator": others / 2, "redis": others / 2}
        return {
            "accepted_per_s": rate,
            "accepted_per_server_cpu_s": rate / server,
            "cpu_cores": {**cores, "total_busy": server + others},
            "cpu_cores_rounds": [cores],
            "redis_keys_at_end": [10],
            "accepted_incl_warmup": [10],
            "limiter_errors": [0],
            "processes_left_after_stop": [0],
        }

    for others, ceiling in ((0.4, 2.0), (0.6, 1.75)):
        results: dict[str, Any] = {
            "machine": {"nproc": 2, "cpus_usable": 2},
            "options": {"scale_out_load": "-t1 -c32"},
            "rows": {"redis_w1": row(1000, 0.8, 0.2), "redis_w2": row(1500, 1.4, others)},
        }
        scale_out = derive(results)["scale_out"]
        assert scale_out["ceiling_here"] == ceiling
        assert scale_out["workers_2_over_1"] == 1.5
