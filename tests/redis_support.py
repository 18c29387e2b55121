"""Throw-away `redis-server`s on free loopback ports, with stop/pause/restart for failure tests."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.conftest import need_binary
from tests.processes import LOOPBACK, START_TIMEOUT, Process, free_port

STOP_TIMEOUT = 5.0


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
        self.process: Process | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start on `self.port` and wait (with a deadline) until it answers PING."""
        assert self.process is None, "already running"
        log = self.directory / "redis.log"
        process = Process(
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
            self.directory / "redis.out",
            name="redis-server",
        ).launch()  # fmt: skip
        try:
            answered = process.wait_ready_blocking(
                lambda: ping(self.port), START_TIMEOUT, what="answering PING"
            )
        except TimeoutError:
            process.kill()
            raise
        if not answered:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"redis-server exited at start:\n{tail}{process.output()}")
        self.process = process

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); clients see their connections close.
        A paused server is continued first, so it can act on SIGTERM."""
        process, self.process = self.process, None
        if process is not None:
            process.stop(timeout=STOP_TIMEOUT)

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
        assert server.process is not None
        with redis.Redis(host=LOOPBACK, port=server.port) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            # A fresh master declares the cluster usable only after about 2 s (Redis's
            # CLUSTER_WRITABLE_DELAY): poll for it with a deadline.
            usable = server.process.wait_ready_blocking(
                lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
                what="a usable one-node cluster",
            )
            assert usable, server.process.output()
        yield server
