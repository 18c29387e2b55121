"""Throw-away `redis-server`s on free loopback ports, with stop/pause/restart for failure tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.conftest import need_binary

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for a fresh redis-server to answer PING
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.2) -> bool:
    """Whether a Redis on the port answers PING now."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process without persistence, in its own directory."""

    def __init__(
        self, binary: str, directory: Path, *extra_args: str, config: Path | None = None
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.extra_args = extra_args
        self.config = config  # a config file to start from (Sentinel needs one it can rewrite)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start on `self.port` and wait (with a deadline) until it answers PING."""
        assert self.process is None, "already running"
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                *([str(self.config)] if self.config else []),
                "--port", str(self.port),
                "--bind", LOOPBACK,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(log),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.process.poll() is not None:
                self.process = None
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT} s")
            time.sleep(0.01)  # polling a condition with a deadline

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); clients see their connections close."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop if running and start again on the same port (empty: no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def redis_binary() -> str:
    """Debian's redis-server: skip when it is missing, fail instead with `CI=true`."""
    return need_binary("redis-server", "/usr/bin/redis-server")


@contextmanager
def running(directory: Path, *extra_args: str, config: Path | None = None) -> Iterator[RedisServer]:
    """A started server (skipped when redis-server is missing), stopped on exit."""
    server = RedisServer(redis_binary(), directory, *extra_args, config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_sentinel(directory: Path, master: RedisServer, service: str) -> Iterator[RedisServer]:
    """A Sentinel watching `master` as `service` (quorum 1), stopped on exit."""
    config = directory / "sentinel.conf"
    config.write_text(f"sentinel monitor {service} {LOOPBACK} {master.port} 1\n")
    with running(directory, "--sentinel", config=config) as sentinel:
        yield sentinel


@contextmanager
def running_cluster(directory: Path) -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning every slot (it still refuses cross-slot scripts)."""
    # The cluster bus gets a free port of its own (by default it is the port + 10000).
    cluster_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with running(directory, *cluster_args, "--cluster-port", str(free_port())) as server:
        with redis.Redis(host=LOOPBACK, port=server.port) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            # A fresh master declares the cluster usable only after about 2 s (Redis's
            # CLUSTER_WRITABLE_DELAY): poll for it with a deadline.
            deadline = time.monotonic() + START_TIMEOUT
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the one-node cluster did not become ready")
                time.sleep(0.02)
        yield server
