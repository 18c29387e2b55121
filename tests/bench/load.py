"""Load generators: `wrk` (closed loop, max throughput), and built-in asyncio ones.

The built-in generators speak HTTP/1.1 keep-alive over raw asyncio protocols (far less
CPU per request than an aiohttp client, which matters when the generator shares a
2-core machine with the server). Every response's status is counted: a run that
measured 429s or 503s says so instead of reporting them as throughput.

- `run_wrk`: `wrk` with `activity.lua`; the max-throughput tool when installed.
- `closed_loop`: N connections, each sending its next request when the last one is
  answered; the max-throughput fallback without `wrk`.
- `open_loop`: a fixed offered rate whatever the server does; latency is measured from
  each request's *scheduled* send time, so a stalled server cannot hide its stall by
  slowing the generator down (no coordinated omission). Used for p50/p99 at a fixed rate
  (wrk2 is not needed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench.workload import LUA_SCRIPT, body_template, per_ip

ACCEPTED = 202
REQUEST_TIMEOUT = 10.0  # seconds; a request slower than this is counted as a timeout


@dataclass
class LoadResult:
    """What one load phase measured."""

    tool: str
    duration: float  # seconds the load ran
    requests: int  # responses received within the duration
    statuses: dict[int, int]
    errors: dict[str, int] = field(default_factory=dict)  # no answer: connect/read/timeout
    latency_ms: dict[str, float] = field(default_factory=dict)
    offered_rate: float | None = None  # open loop only
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        """Responses with status 202."""
        return self.statuses.get(ACCEPTED, 0)

    @property
    def non_accepted(self) -> int:
        """Responses with any other status."""
        return self.requests - self.accepted

    @property
    def error_count(self) -> int:
        """Requests that got no answer (socket errors, timeouts)."""
        return sum(self.errors.values())

    @property
    def accepted_per_s(self) -> float:
        """Accepted activities per second (one activity per request)."""
        return self.accepted / self.duration if self.duration > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tool": self.tool,
            "duration_s": round(self.duration, 3),
            "requests": self.requests,
            "accepted": self.accepted,
            "accepted_per_s": round(self.accepted_per_s, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "non_202": self.non_accepted,
            "errors": self.errors,
            "latency_ms": self.latency_ms,
            "offered_rate": self.offered_rate,
            **self.extra,
        }


def percentiles(samples: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of `samples` (seconds) as milliseconds, keyed `p50` etc."""
    if not samples:
        return {}
    ordered = sorted(samples)
    out: dict[str, float] = {}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        label = f"p{p:g}".replace(".", "_")
        out[label] = round(ordered[rank - 1] * 1000, 3)
    out["max"] = round(ordered[-1] * 1000, 3)
    out["mean"] = round(sum(ordered) / len(ordered) * 1000, 3)
    return out


# -- wrk


def wrk_version(wrk: str) -> str:
    """`wrk -v`'s first line (wrk exits 1 after printing it)."""
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else "wrk (unknown version)"


def run_wrk(
    wrk: str,
    url: str,
    *,
    connections: int,
    threads: int,
    duration: int,
    prefix: str,
    ip_base: int,
    activities: int = 1,
) -> LoadResult:
    """Run wrk with `activity.lua` for `duration` seconds and parse its BENCH_RESULT line
    (`activities` per request)."""
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={int(REQUEST_TIMEOUT)}s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        prefix,
        str(ip_base),
        body_template(activities),
        str(per_ip(activities)),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next(
        (ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")),
        None,
    )
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    statuses = {int(k): int(v) for k, v in data["statuses"].items()}
    counted = sum(statuses.values())
    if counted != data["requests"]:
        raise RuntimeError(f"wrk counted {data['requests']} requests but {counted} statuses")
    errors = {k: int(v) for k, v in data["errors"].items() if k != "status" and v}
    lat = data["latency_us"]
    return LoadResult(
        tool=f"wrk -t{threads} -c{connections}",
        duration=data["duration_us"] / 1e6,
        requests=data["requests"],
        statuses=statuses,
        errors=errors,
        latency_ms={k: round(v / 1000, 3) for k, v in lat.items()},
        extra={"closed_loop_latency_includes_queueing": True},
    )


# -- a minimal HTTP/1.1 client


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time; responses need Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 ") or at < 0:
            waiter.set_exception(ValueError(f"unexpected response head: {head[:200]!r}"))
            self.close()
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self._buf) < total:
            return
        del self._buf[:total]
        if b"\r\nconnection: close" in head:
            self.close()
        waiter.set_result(int(head[9:12]))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, data: bytes) -> int:
        """Send one request and return the response's status."""
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self.transport.write(data)
        return await waiter


async def _connect(host: str, port: int) -> _Conn:
    _, conn = await asyncio.get_running_loop().create_connection(_Conn, host, port)
    return conn


class _Tally:
    def __init__(self) -> None:
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []


async def _exchange(
    conn: _Conn | None, host: str, port: int, data: bytes, tally: _Tally
) -> tuple[_Conn | None, int | None]:
    """One request on `conn` (connecting first if needed); errors are tallied, not raised."""
    stage = "connect"
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            if conn is None or conn.closed:
                conn = await _connect(host, port)
            stage = "read"
            status = await conn.send(data)
    except TimeoutError:
        tally.errors["timeout"] += 1
    except OSError:
        tally.errors[stage] += 1
    except ValueError:
        tally.errors["protocol"] += 1
    else:
        tally.statuses[status] += 1
        return conn, status
    if conn is not None:
        conn.close()
    return None, None


async def closed_loop(
    host: str,
    port: int,
    *,
    connections: int,
    duration: float,
    make_request: Callable[[int], bytes],
) -> LoadResult:
    """`connections` workers, each sending as soon as its last answer arrived."""
    loop = asyncio.get_running_loop()
    tally = _Tally()
    counter = iter(range(1 << 62))
    start = loop.time()
    end = start + duration

    async def worker() -> None:
        conn: _Conn | None = None
        while True:
            sent = loop.time()
            if sent >= end:
                break
            conn, status = await _exchange(conn, host, port, make_request(next(counter)), tally)
            done = loop.time()
            if status is not None and done <= end:
                tally.latencies.append(done - sent)
            elif status is not None:  # answered after the end: not part of the measurement
                tally.statuses[status] -= 1
        if conn is not None:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    statuses = {k: v for k, v in tally.statuses.items() if v}
    return LoadResult(
        tool=f"built-in closed loop -c{connections}",
        duration=duration,
        requests=sum(statuses.values()),
        statuses=statuses,
        errors=dict(tally.errors),
        latency_ms=percentiles(tally.latencies, (50, 90, 99)),
        extra={"closed_loop_latency_includes_queueing": True},
    )


async def open_loop(
    host: str,
    port: int,
    *,
    rate: float,
    duration: float,
    make_request: Callable[[int], bytes],
    connections: int = 64,
) -> LoadResult:
    """Offer `rate` requests/s for `duration` s; latency counts from the scheduled time.

    A dispatcher releases request i at `start + i / rate` (in bursts no coarser than the
    event loop's ~1 ms timer) onto a queue served by `connections` keep-alive
    connections; when all are busy, requests wait in the queue and that wait is part of
    their latency (`latency_ms`, from the scheduled time). The dispatcher's own lateness
    (`dispatch_lag_ms`, up to the ~1 ms timer granularity) is therefore included too;
    `service_latency_ms` counts from the actual write, without it.
    """
    loop = asyncio.get_running_loop()
    tally = _Tally()
    total = max(1, int(rate * duration))
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    lags: list[float] = []
    service: list[float] = []  # from the actual write: without generator or queue delay
    conns = await asyncio.gather(*(_connect(host, port) for _ in range(connections)))

    async def worker(conn: _Conn | None) -> None:
        while (job := await queue.get()) is not None:
            n, due = job
            data = make_request(n)
            sent = loop.time()
            conn, status = await _exchange(conn, host, port, data, tally)
            if status is not None:
                done = loop.time()
                tally.latencies.append(done - due)
                service.append(done - sent)
        if conn is not None:
            conn.close()

    workers = [asyncio.create_task(worker(conn)) for conn in conns]
    start = loop.time() + 0.01
    i = 0
    try:
        while i < total:
            now = loop.time()
            due = start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while i < total and (due := start + i / rate) <= now:
                queue.put_nowait((i, due))
                lags.append(now - due)
                i += 1
        sent_for = loop.time() - start
        for _ in workers:
            queue.put_nowait(None)
        _, pending = await asyncio.wait(workers, timeout=REQUEST_TIMEOUT + 5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    finally:
        for task in workers:
            task.cancel()
    finished = loop.time() - start
    answered = sum(tally.statuses.values())
    unanswered = total - answered - sum(tally.errors.values())
    if unanswered:
        tally.errors["unfinished"] += unanswered
    return LoadResult(
        tool=f"built-in open loop ({connections} connections)",
        duration=duration,
        requests=answered,
        statuses=dict(tally.statuses),
        errors=dict(tally.errors),
        latency_ms=percentiles(tally.latencies, (50, 90, 99, 99.9)),
        offered_rate=rate,
        extra={
            "scheduled": total,
            "achieved_send_rate": round(total / sent_for, 1) if sent_for > 0 else None,
            "completed_in_s": round(finished, 3),
            "dispatch_lag_ms": percentiles(lags, (50, 99)),
            "service_latency_ms": percentiles(service, (50, 90, 99, 99.9)),
        },
    )
