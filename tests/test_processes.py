"""The tests' process helper (tests/processes.py) and the `integration` split (conftest)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import Process, free_port, port_open

# A child that says it is ready, then ignores SIGTERM until it is killed.
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(1)\n"
)


@pytest.mark.integration
async def test_readiness_and_a_stop_that_has_to_kill(tmp_path: Path) -> None:
    process = Process([sys.executable, "-c", STUBBORN], tmp_path / "out.log")
    with process:
        await process.start_ready(lambda: "ready" in process.output())
        assert process.running
        assert process.stop(signal.SIGTERM, timeout=0.2) == -signal.SIGKILL
    assert not process.running


@pytest.mark.integration
async def test_a_process_that_exits_before_ready_says_so_with_its_output(tmp_path: Path) -> None:
    process = Process(
        [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"], tmp_path / "o"
    )
    with pytest.raises(AssertionError, match=r"exited with 3:\nbad config"):
        await process.start_ready(lambda: False)


@pytest.mark.integration
async def test_a_process_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    process = Process([sys.executable, "-c", STUBBORN], tmp_path / "out.log")
    with pytest.raises(TimeoutError, match=r"not listening within 0\.1 s"):
        await process.start_ready(lambda: port_open(free_port()), 0.1, what="listening")
    assert process.returncode == -signal.SIGKILL


def test_a_test_not_marked_integration_cannot_start_a_process() -> None:
    with pytest.raises(AssertionError, match="not marked `integration`"):
        subprocess.run(["true"], check=False)
