"""Machine facts for the report, and CPU accounting per process during a phase."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.spool import fsync_times

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_mib() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def loadavg() -> list[float]:
    return [float(x) for x in _read("/proc/loadavg").split()[:3]] or [0.0, 0.0, 0.0]


def mount_of(path: Path) -> dict[str, str]:
    """The filesystem a path is on (longest mount-point prefix in /proc/mounts)."""
    target = str(path.resolve())
    best = {"mount_point": "?", "fstype": "?", "device": "?"}
    best_len = -1
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, point, fstype = parts[0], parts[1], parts[2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best_len:
            best = {"mount_point": point, "fstype": fstype, "device": device}
            best_len = len(point)
    return best


def git_commit(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit or "unknown",
        "dirty": bool(changed),
        "modified_files": len(changed.splitlines()) if changed else 0,
    }


def event_loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio (default selector loop; uvloop not installed)"
    return f"uvloop {getattr(uvloop, '__version__', '(unknown version)')}"


def machine_info(repo: Path, spool_dir: Path) -> dict[str, Any]:
    """What the figures were taken on."""
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_mib": mem_total_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "orjson": orjson.__version__,
        "sqlite": sqlite3.sqlite_version,
        "event_loop": event_loop_name(),
        "git": git_commit(repo),
        "spool_filesystem": mount_of(spool_dir),
        "loadavg_at_start": loadavg(),
        "executable": sys.executable,
    }


def fsync_probe(directory: Path, count: int = 100) -> dict[str, float]:
    """Milliseconds per small write + fsync in `directory` (what one group commit waits for)."""
    times = fsync_times(directory, count)
    return {
        "count": count,
        "p50_ms": round(times[len(times) // 2] * 1000, 3),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 3),
    }


# -- CPU accounting


def _busy_and_steal() -> tuple[int, int]:
    """All CPUs' busy and steal jiffies from /proc/stat."""
    fields = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), seconds."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def group_cpu_seconds(pids: Sequence[int]) -> float | None:
    """utime + stime summed over live processes (None when one of them is gone)."""
    total = 0.0
    for pid in pids:
        seconds = process_cpu_seconds(pid)
        if seconds is None:
            return None
        total += seconds
    return total


def redis_server_version(binary: str) -> str:
    """`redis-server --version`, shortened: `Redis server v=7.0.15 ... malloc=jemalloc-5.3.0`."""
    proc = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    words = proc.stdout.split()
    keep = [w for w in words if w.startswith(("v=", "malloc="))]
    return "redis-server " + " ".join(k.split("=", 1)[1] for k in keep) if keep else "redis-server"


def _own_and_reaped_children() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@dataclass
class _Snap:
    wall: float
    busy: int
    steal: int
    procs: dict[str, float | None]
    own: float
    reaped: float


class CpuMeter:
    """Cores used per component during a phase, and by everything else on the machine.

    `pids` are long-lived children (gateway, sandbox, redis), one pid or several per
    component (a supervisor and its workers: their sum); the load generator is either this
    process (built-in) or a child reaped at the end of the phase (wrk), counted through
    getrusage. "other" is what the rest of the machine used: if it is not near zero,
    the figures were taken on a busy machine and say so.
    """

    def __init__(self, pids: Mapping[str, int | Sequence[int]]) -> None:
        self._pids = {k: (v,) if isinstance(v, int) else tuple(v) for k, v in pids.items()}
        self._start: _Snap | None = None

    def _snap(self) -> _Snap:
        busy, steal = _busy_and_steal()
        own, reaped = _own_and_reaped_children()
        procs = {name: group_cpu_seconds(pids) for name, pids in self._pids.items()}
        return _Snap(time.monotonic(), busy, steal, procs, own, reaped)

    def start(self) -> None:
        self._start = self._snap()

    def stop(self, load_tool_is_child: bool) -> dict[str, float]:
        if self._start is None:
            raise RuntimeError("CpuMeter.stop before start")
        a, b = self._start, self._snap()
        wall = b.wall - a.wall
        if wall <= 0:
            return {}
        out: dict[str, float] = {}
        known = 0.0
        for name in self._pids:
            before, after = a.procs[name], b.procs[name]
            if before is not None and after is not None:
                out[name] = (after - before) / wall
                known += after - before
        reaped = b.reaped - a.reaped
        own = b.own - a.own
        out["load generator"] = (reaped if load_tool_is_child else own) / wall
        out["bench"] = (own if load_tool_is_child else 0.0) / wall
        known += reaped + own
        busy = (b.busy - a.busy) / CLK_TCK
        out["other"] = max(0.0, busy - known) / wall
        out["steal"] = (b.steal - a.steal) / CLK_TCK / wall
        out["total_busy"] = busy / wall
        return {k: round(v, 2) for k, v in out.items()}
