"""Subprocesses of a benchmark run: start, wait until ready, measure, stop (always)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

# Loopback only: never let an http_proxy variable route these polls elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, *, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    """A loopback HTTP request: (status, body); error statuses are returned, not raised."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the benchmark only talks to loopback, not {url}")
    data = b"" if method == "POST" else None
    req = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - checked above
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any inherited `GATEWAY_*` setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.strays = 0  # processes of its group still running after it exited (then killed)
        self._group_reaped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def status_kib(self, field: str) -> int | None:
        """A `kB` field of /proc/<pid>/status (`VmHWM` = peak RSS), or None."""
        return status_kib(self.pid, field)

    def tail(self, lines: int = 15) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit status.

        The child leads a process group of its own (`start_new_session`): whatever it
        started and left behind (e.g. `serve --workers N`'s workers) gets 2 s to exit,
        then SIGKILL, so nothing outlives the benchmark.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if not self._group_reaped:  # once: the id is free for reuse after that
            self._group_reaped = True
            self.strays = reap_group(self.pid)
        return int(self.popen.returncode)


class Procs:
    """Every child of the run, so that all of them are stopped whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[Proc] = []
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start `argv` in its own session, output to `<workdir>/<name>.log`."""
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop them in order
        )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every child still running (newest first) and close the log files."""
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout=15.0)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {proc.name} ({proc.pid}): {exc}", file=sys.stderr)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


def wait_ready(proc: Proc, url: str, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail loudly if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} before it was ready:\n"
                f"{proc.tail()}"
            )
        try:
            status, body = http(url, timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} not ready within {timeout:g} s at {url} ({last}):\n{proc.tail()}"
    )


# -- process trees (`serve --workers N`: a supervisor and its workers)


def status_kib(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (`VmHWM` = peak RSS), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` is running (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{parent}/task/{tid}/children").read_text(encoding="ascii")
            except OSError:
                continue
            for child in (int(x) for x in text.split()):
                if child not in found and pid_alive(child):
                    found.append(child)
                    todo.append(child)
    return found


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp*."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listeners(pids: list[int], port: int) -> list[int]:
    """Those of `pids` holding a socket that listens on `port` (SO_REUSEPORT workers)."""
    listening = _listening_inodes(port)
    return [pid for pid in pids if _socket_inodes(pid) & listening]


def wait_listeners(proc: Proc, port: int, count: int, timeout: float = 30.0) -> list[int]:
    """Wait until `count` descendants of `proc` listen on `port`; their pids."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}"
            )
        found = listeners(descendants(proc.pid), port)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name}: {len(found)} of {count} workers listening on {port} after "
        f"{timeout:g} s:\n{proc.tail()}"
    )


def reap_group(pgid: int, grace: float = 2.0) -> int:
    """After a group leader we started exited: wait `grace` s for the rest of its process
    group, then SIGKILL what is left (only that group: the id of a process we started).
    Returns how many were still running after the grace period (0 when all exited)."""
    deadline = time.monotonic() + grace
    while True:
        left = [pid for pid in _group_members(pgid) if pid_alive(pid)]
        if not left:
            return 0
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return len(left)
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
