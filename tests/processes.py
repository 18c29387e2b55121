"""The one helper for every process the tests start, and the gateway as a process.

`Process` starts a command with its output in a log file, waits for a readiness
condition with a deadline (failing early if the process exits), and stops it in
teardown: a signal, then SIGKILL after a timeout, always reaped. The wrappers of the
real servers (redis_support.RedisServer, servers.run_nginx, ops_support.Prometheus,
GatewayProcess below) are built on it; Chromium is started by Playwright
(servers.run_chromium).

Ports are free loopback ports chosen at run time (`free_port`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import aiohttp

from tests.conftest import ACTIVITIES, API_KEY

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a server to become ready
STOP_TIMEOUT = 10.0  # seconds after the stop signal before SIGKILL
POLL_INTERVAL = 0.02  # between two looks at a readiness condition (not a synchronisation)
OUTPUT_TAIL = 4000  # characters of a process's output in a failure message

Ready = Callable[[], bool | Awaitable[bool]]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on the port now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        async with session.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


class Process:
    """One child process: its output (stdout and stderr) goes to `log`.

    `launch` starts it; `wait_ready` (async) or `wait_ready_blocking` poll a condition
    until it holds, the process exits (False) or the deadline passes (TimeoutError);
    `stop` signals it, SIGKILLs it after `timeout` and reaps it. A context manager and a
    `kill()` for teardown lists (conftest's `reaper`) make sure none outlives its test.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.popen: subprocess.Popen[bytes] | None = None

    # -- running

    def launch(self) -> Process:
        """Launch the command (its output appended to the log); returns self."""
        assert not self.running, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited, else None."""
        return None if self.popen is None else self.popen.poll()

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def send_signal(self, sig: int) -> None:
        """Send `sig` if it is still running."""
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def output(self, tail: int = OUTPUT_TAIL) -> str:
        """The last `tail` characters of its output, for failure messages."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def _exited_message(self) -> str:
        return f"{self.name} exited with {self.returncode}:\n{self.output()}"

    # -- readiness, with a deadline

    async def wait_ready(
        self, ready: Ready, timeout: float = START_TIMEOUT, *, what: str = "ready"
    ) -> bool:
        """Poll `ready()` (sync or async) until it is true: True; False if the process
        exits first; TimeoutError (with its output) at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self.running:
                return False
            answer = ready()
            if inspect.isawaitable(answer):
                answer = await answer
            if answer:
                return True
            if loop.time() >= deadline:
                raise TimeoutError(f"{self.name} not {what} within {timeout:g} s\n{self.output()}")
            await asyncio.sleep(POLL_INTERVAL)  # polling a condition with a deadline

    def wait_ready_blocking(
        self, ready: Callable[[], bool], timeout: float = START_TIMEOUT, *, what: str = "ready"
    ) -> bool:
        """`wait_ready` for sync callers (sync fixtures)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                return False
            if ready():
                return True
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} not {what} within {timeout:g} s\n{self.output()}")
            time.sleep(POLL_INTERVAL)  # polling a condition with a deadline

    async def start_ready(
        self, ready: Ready, timeout: float = START_TIMEOUT, *, what: str = "ready"
    ) -> Process:
        """`launch`, then `wait_ready`; a process that exits first is an AssertionError
        with its output, and one that times out is stopped before the error goes up."""
        self.launch()
        try:
            started = await self.wait_ready(ready, timeout, what=what)
        except BaseException:
            self.kill()
            raise
        assert started, self._exited_message()
        return self

    # -- stopping

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for it to exit by itself; its status (TimeoutExpired after `timeout`)."""
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig`, then SIGKILL after `timeout` seconds; its exit status, always reaped.
        A stopped (SIGSTOP) process is continued first, so it can act on `sig`."""
        assert self.popen is not None, f"{self.name} was never started"
        if self.popen.poll() is None:
            if sig != signal.SIGKILL:
                self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    async def stop_async(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """`stop` without blocking the event loop (an in-process server keeps answering)."""
        return await asyncio.to_thread(self.stop, sig, timeout)

    def kill(self) -> None:
        """For teardown: make sure it is gone (SIGKILL), whatever the test did."""
        if self.popen is not None:
            self.stop(signal.SIGKILL)

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.popen is not None:
            self.stop()


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """A command that is expected to stop by itself: its status and text output."""
    return subprocess.run(
        [str(a) for a in argv],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- the gateway as a process


def gateway_env(upstream: str, spool: Path, **settings: str) -> dict[str, str]:
    """This environment without any inherited GATEWAY_* setting, and the tests' own."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_API_KEY": API_KEY,
        "GATEWAY_UPSTREAM_URL": upstream,
        "GATEWAY_ACTIVITIES": ACTIVITIES,
        "GATEWAY_SPOOL_PATH": str(spool),
        "GATEWAY_UPSTREAM_RATE": "50",
        "GATEWAY_BATCH_MAX_WAIT": "20ms",
        "GATEWAY_DRAIN_TIMEOUT": "5s",
        # Pinned: `auto` times this machine's fsync, so each gateway could differ.
        "GATEWAY_SPOOL_COMMIT": "loop",
        # Generous: on a busy machine a Redis call can take longer than the 0.5 s default,
        # and the limiter would fall back to its local store (limits no longer exact).
        "GATEWAY_LIMITER_TIMEOUT": "5s",
        **settings,
    }


class GatewayProcess(Process):
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
        self.url = f"http://{LOOPBACK}:{self.port}"
        listen = {
            "GATEWAY_LISTEN": f"{LOOPBACK}:{self.port}",
            "GATEWAY_METRICS_LISTEN": f"{LOOPBACK}:{self.metrics_port}",
        }
        environment = gateway_env(upstream, spool, **{**listen, **(env or {})})
        argv = [sys.executable, "-m", "gateway", "serve", *args]
        super().__init__(argv, log, env=environment, name="gateway")

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The running `Popen` (kept for the tests that signal it directly)."""
        return self.popen

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Start and wait (with a deadline) until `/readyz` answers 200."""
        await self.start_ready(lambda: http_ok(session, self.url + "/readyz"))

    async def metric(self, session: aiohttp.ClientSession, sample: str) -> float:
        """One sample's value on its `/metrics`: `sample` is the name with its labels, as
        exposed (`python_gc_collections_total{generation="0"}`)."""
        async with session.get(f"http://{LOOPBACK}:{self.metrics_port}/metrics") as resp:
            text = await resp.text()
        prefix = sample + " "
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        raise AssertionError(f"no {sample} on /metrics")

    def run_to_exit(self, timeout: float = 30) -> tuple[int, str, str]:
        """Run `serve` expecting it to stop by itself: exit code, stdout, stderr."""
        done = run(self.argv, env=self.env, timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 20) -> int:
        """Stop it (by default SIGKILL: a crash); its exit status."""
        return super().stop(sig, timeout)

    async def stop_async(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """`stop` without blocking the event loop: the in-process sandbox keeps answering
        while the gateway drains its spool into it."""
        return await super().stop_async(sig, timeout)
