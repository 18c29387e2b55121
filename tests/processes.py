"""A gateway as a real process (`python -m gateway serve`), for process-level tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from gateway.server import free_port
from tests.conftest import ACTIVITIES, API_KEY


class GatewayProcess:
    """`python -m gateway serve` on free loopback ports."""

    def __init__(
        self,
        upstream: str,
        spool: Path,
        log: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = args
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            "GATEWAY_API_KEY": API_KEY,
            "GATEWAY_UPSTREAM_URL": upstream,
            "GATEWAY_ACTIVITIES": ACTIVITIES,
            "GATEWAY_SPOOL_PATH": str(spool),
            "GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "GATEWAY_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "GATEWAY_UPSTREAM_RATE": "50",
            "GATEWAY_BATCH_MAX_WAIT": "20ms",
            "GATEWAY_DRAIN_TIMEOUT": "5s",
            # Pinned: `auto` times this machine's fsync, so each gateway could differ.
            "GATEWAY_SPOOL_COMMIT": "loop",
            **(env or {}),
        }
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=log,
            )

        async def ready() -> bool:
            try:
                async with session.get(self.url + "/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await ready():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert loop.time() < deadline, "gateway did not become ready"
            await asyncio.sleep(0.05)

    def run_to_exit(self, timeout: float = 30) -> tuple[int, str, str]:
        """Run `serve` expecting it to stop by itself: exit code, stdout, stderr."""
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", *self.args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr

    def kill(self) -> None:
        """For teardown: make sure the process is gone, whatever the test did."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def stop(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    async def stop_async(self, sig: int = signal.SIGTERM) -> int:
        """`stop` without blocking the event loop: the in-process sandbox keeps answering
        while the gateway drains its spool into it."""
        return await asyncio.to_thread(self.stop, sig)
