"""The benchmark's own `redis-server`: a free loopback port, no persistence, its temp dir.

Started through `Procs` (so it is stopped with every other child, whatever happens) as
`redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir <workdir>/redis`,
logging to `<workdir>/redis.log`. The few commands the run itself needs (PING, FLUSHALL,
DBSIZE) go over a plain socket, so the run does not need redis-py (the gateway does).
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from gateway.server import free_port
from tests.bench.procs import Proc, Procs, child_env

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
ARGS = ("--save", "", "--appendonly", "no")


def find_binary(explicit: str | None) -> str | None:
    """`--redis-server`, else `redis-server` on PATH, else Debian's path (None: not found)."""
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None


class BenchRedis:
    """A running redis-server of this run."""

    def __init__(self, proc: Proc, port: int, binary: str) -> None:
        self.proc = proc
        self.port = port
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, *args: str, timeout: float = 10.0) -> bytes:
        """One command with a one-line reply (`+OK`, `:42`); an error reply raises."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            sock.sendall(payload.encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"redis closed the connection after {reply!r}")
                reply += chunk
        if reply.startswith(b"-") or reply[:1] not in (b"+", b":"):
            raise RuntimeError(f"redis {args[0]}: {reply.strip()!r}")
        return reply[1:-2]

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == b"PONG"
        except (OSError, RuntimeError):
            return False

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def dbsize(self) -> int:
        return int(self.command("DBSIZE"))


def start_redis(procs: Procs, workdir: Path, binary: str) -> BenchRedis:
    """Start redis-server on a free loopback port and wait (with a deadline) for PING."""
    port = free_port(HOST)
    data_dir = workdir / "redis"
    data_dir.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", HOST, *ARGS, "--dir", str(data_dir)]
    argv += ["--logfile", ""]  # to stdout: <workdir>/redis.log
    proc = procs.start("redis", argv, child_env({}))
    server = BenchRedis(proc, port, binary)
    deadline = time.monotonic() + START_TIMEOUT
    while not server.ping():
        if not proc.alive():
            raise RuntimeError(f"redis-server exited at start:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT:g} s")
        time.sleep(0.02)
    return server
