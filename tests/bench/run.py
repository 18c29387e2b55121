"""The benchmark run: every scenario in one process tree, one table, one JSON file.

Scenarios, in order (each server is its own subprocess on free loopback ports, and only
one of them is under load at a time):

1. baseline: `tests/bench/baseline.py`, a bare aiohttp app (same body, same 202 answer).
2. gateway, HTTP shell only: `tests/bench/shell_only.py`, the gateway with its relay
   stubbed (accepts without validating, limiting or spooling): the shell's own ceiling.
3. gateway, durable spool (SQLite file in a temp dir): max accepted/s; then, once the
   spool has drained into the sandbox, activities per upstream request; then latency at
   a fixed offered rate of half that maximum.
3b. gateway, durable spool, pure Python (`ORTTO_GATEWAY_NO_EXTENSIONS=1`): the compiled
   core's gain, when `make bench` could build it (the report says whether it runs).
4. gateway, in-memory spool (`GATEWAY_SPOOL_PATH=:memory:`): max accepted/s.
5. gateway, durable spool with `GATEWAY_LOG_LEVEL=INFO` (one JSON line per request).
5b. gateway, durable spool, 10 activities per request (each its own person): reported
   as activities per second, like every row (a request of one is one activity).
6. scale-out: the gateway, durable spool, limits in Redis (`GATEWAY_REDIS_URL`), run as
   `serve --workers 1` and as `serve --workers 2` (a supervisor and two workers sharing
   the port with SO_REUSEPORT, each with its own spool file in the temp dir); Redis is
   flushed before each. Ready when `/readyz` answers and every worker listens.
7. limiter memory per key at 1,000,000 keys (`limiter_mem.py`, a fresh process).
8. limiter stores (`limiter_stores.py`, a fresh process): `MemoryStore` vs `RedisStore`
   acquires/s (32 callers, 1 and 100 activities per call) and Redis memory per key.
9. three hosts, one account (`three_hosts.py`, a fresh process): three gateways with
   separate spools sharing the upstream rate through this run's Redis, delivering to a
   sandbox limited to `--plan-rate`, traffic 10:1:1 for `--warmup` + `--duration`:
   upstream requests/s used against the plan, the most in any one second, 429s,
   duplicates.

Redis is the run's own `redis-server` (free loopback port, `--save "" --appendonly no`,
in the temp dir), started after the sandbox and stopped at the end; without
redis-server (or `--no-redis`) rows 6, 8 and 9 are skipped and the report says so.

Rows 1-6 are measured `--rounds` times (default 2) in mirrored order (1 2 3 4 5 6, 6 5 4 3 2 1),
each time in a fresh process, so a drift in the machine's load weighs on every row alike.
Every max-rate measurement gets a warm-up first (not counted). Every response status is
counted; anything but 202 is reported next to the figure it would otherwise inflate.
CPU use per component is measured during each phase, so a busy machine shows itself.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from gateway import compiled
from gateway.server import free_port
from tests.bench import report
from tests.bench.load import LoadResult, closed_loop, open_loop, run_wrk, wrk_version
from tests.bench.procs import (
    Proc,
    Procs,
    child_env,
    descendants,
    http,
    pid_alive,
    status_kib,
    wait_listeners,
    wait_ready,
)
from tests.bench.redis_server import BenchRedis, find_binary, start_redis
from tests.bench.sysinfo import (
    CpuMeter,
    fsync_probe,
    loadavg,
    machine_info,
    redis_server_version,
)
from tests.bench.workload import ACTIVITY_ID, IP_BLOCK, PATH, RequestFactory

REPO = Path(__file__).resolve().parents[2]
API_KEY = "bench-key-0123456789abcdef"
HOST = "127.0.0.1"


@dataclass
class Options:
    duration: int
    warmup: int
    rounds: int
    latency_duration: int
    connections: int
    threads: int
    load_tool: str
    limiter_keys: int
    limiter_tracemalloc: bool
    redis_server: str | None  # None: no Redis rows
    no_redis_reason: str
    scale_out_threads: int
    scale_out_connections: int
    store_duration: float
    store_warmup: float
    store_callers: int
    redis_memory_keys: int
    upstream_rate: float
    plan_rate: float
    drain_timeout: float
    spool_dir: Path | None
    spool_commit: str
    json_path: Path
    quick: bool


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark the gateway against a bare aiohttp baseline (loopback only).",
    )
    parser.add_argument(
        "--duration", type=int, help="seconds measured per max-rate row (default 10; quick 4)"
    )
    parser.add_argument("--warmup", type=int, help="warm-up seconds per row (default 2; quick 1)")
    parser.add_argument(
        "--rounds", type=int, help="measurements of each row, mirrored order (default 2; quick 1)"
    )
    parser.add_argument(
        "--latency-duration", type=int, help="seconds of the fixed-rate phase (default: duration)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results/latest.json"))
    parser.add_argument("--quick", action="store_true", help="a ~55 s run with short phases")
    parser.add_argument("--connections", type=int, default=32, help="load connections (32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="wrk when installed (auto), or the built-in asyncio generator",
    )
    parser.add_argument("--limiter-keys", type=int, default=1_000_000)
    parser.add_argument(
        "--limiter-tracemalloc",
        action="store_true",
        help="also count Python allocations per limiter key (adds ~40 s)",
    )
    parser.add_argument(
        "--no-redis", action="store_true", help="skip the Redis rows (scale-out, limiter stores)"
    )
    parser.add_argument("--redis-server", help="the redis-server binary (default: on PATH)")
    parser.add_argument(
        "--scale-out-threads", type=int, help="wrk threads for the scale-out rows (--threads)"
    )
    parser.add_argument(
        "--scale-out-connections",
        type=int,
        help="load connections for the scale-out rows (--connections)",
    )
    parser.add_argument(
        "--store-duration",
        type=float,
        help="seconds per limiter-store throughput phase (default 3; quick 1)",
    )
    parser.add_argument("--store-callers", type=int, default=32, help="limiter-store callers (32)")
    parser.add_argument(
        "--redis-memory-keys",
        type=int,
        default=100_000,
        help="keys for Redis used_memory per key (100000)",
    )
    parser.add_argument(
        "--upstream-rate", type=float, default=30.0, help="GATEWAY_UPSTREAM_RATE (30: Business)"
    )
    parser.add_argument(
        "--plan-rate",
        type=float,
        default=20.0,
        help="the three-host row's plan: the sandbox's requests/s (20; gateways told 95%%)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="max seconds to wait for the spool to drain"
    )
    parser.add_argument(
        "--spool-dir", type=Path, help="where the durable spool's temp dir goes (default: TMPDIR)"
    )
    parser.add_argument(
        "--spool-commit",
        choices=("auto", "loop", "thread"),
        default="auto",
        help="GATEWAY_SPOOL_COMMIT of every gateway row (auto)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    duration = args.duration or (4 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    rounds = args.rounds or (1 if quick else 2)
    if min(duration, rounds, args.connections, args.threads) < 1 or warmup < 0:
        parser.error("--duration, --rounds, --connections, --threads must be >= 1")
    redis_server: str | None = None
    no_redis_reason = ""
    if args.no_redis:
        no_redis_reason = "--no-redis"
    elif importlib.util.find_spec("redis") is None:
        no_redis_reason = "the redis package is not installed (pip install '.[redis]')"
    else:
        redis_server = find_binary(args.redis_server)
        if redis_server is None:
            no_redis_reason = "redis-server not found (apt-get install redis-server)"
    scale_threads = args.scale_out_threads or args.threads
    scale_connections = args.scale_out_connections or args.connections
    if min(scale_threads, scale_connections, args.store_callers, args.redis_memory_keys) < 1:
        parser.error("--scale-out-*, --store-callers, --redis-memory-keys must be >= 1")
    return Options(
        duration=duration,
        warmup=warmup,
        rounds=rounds,
        latency_duration=args.latency_duration or duration,
        connections=args.connections,
        threads=args.threads,
        load_tool=args.load_tool,
        limiter_keys=args.limiter_keys,
        limiter_tracemalloc=args.limiter_tracemalloc,
        redis_server=redis_server,
        no_redis_reason=no_redis_reason,
        scale_out_threads=scale_threads,
        scale_out_connections=scale_connections,
        store_duration=args.store_duration or (1.0 if quick else 3.0),
        store_warmup=0.5 if quick else 1.0,
        store_callers=args.store_callers,
        redis_memory_keys=args.redis_memory_keys,
        upstream_rate=args.upstream_rate,
        plan_rate=args.plan_rate,
        drain_timeout=args.drain_timeout or (45.0 if quick else 120.0),
        spool_dir=args.spool_dir,
        spool_commit=args.spool_commit,
        json_path=args.json,
        quick=quick,
    )


@dataclass
class Target:
    """A server under test."""

    name: str
    proc: Proc
    port: int
    metrics_port: int | None = None
    workers: list[int] = field(default_factory=list)  # `--workers N > 1`: the workers' pids
    helpers: list[int] = field(default_factory=list)  # other descendants (resource tracker)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    @property
    def pids(self) -> list[int]:
        """Every process of the server (a supervisor, its workers and helpers)."""
        return [self.proc.pid, *self.workers, *self.helpers]

    def peak_rss_kib(self) -> int | None:
        """Peak RSS; for a supervisor and its workers, the sum of each one's peak."""
        peaks = [status_kib(pid, "VmHWM") for pid in self.pids]
        return sum(k for k in peaks if k is not None) if any(peaks) else None


@dataclass
class Row:
    """One max-rate scenario, measured once per round (each time in a fresh process)."""

    key: str
    label: str
    threads: int | None = None  # wrk threads and connections when not the run's
    connections: int | None = None
    activities: int = 1  # per request: the row's figures count activities, not requests
    results: list[LoadResult] = field(default_factory=list)
    warmups: list[LoadResult | None] = field(default_factory=list)
    cpus: list[dict[str, float]] = field(default_factory=list)
    peak_rss_kib: list[int | None] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted_per_s(self) -> float:
        """Accepted activities per second over every round's measured seconds."""
        seconds = sum(r.duration for r in self.results)
        accepted = sum(r.accepted for r in self.results) * self.activities
        return accepted / seconds if seconds > 0 else 0.0

    def add(self, result: LoadResult, warmup: LoadResult | None, cpu: dict[str, float]) -> None:
        self.results.append(result)
        self.warmups.append(warmup)
        self.cpus.append(cpu)

    @property
    def accepted_per_server_cpu_s(self) -> float | None:
        """Accepted activities per CPU-second the server used: steadier on a busy machine."""
        cpu_s = sum(
            c.get("server", 0.0) * r.duration for c, r in zip(self.cpus, self.results, strict=True)
        )
        accepted = sum(r.accepted for r in self.results) * self.activities
        return accepted / cpu_s if cpu_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        rates = [r.accepted_per_s * self.activities for r in self.results]
        per_cpu = self.accepted_per_server_cpu_s
        mean = self.accepted_per_s
        cpu_keys = sorted({k for c in self.cpus for k in c})
        rss = [k for k in self.peak_rss_kib if k is not None]
        return {
            "label": self.label,
            "activities_per_request": self.activities,
            "accepted_per_s": round(mean, 1),
            "accepted_per_server_cpu_s": round(per_cpu, 1) if per_cpu is not None else None,
            "rounds_accepted_per_s": [round(r, 1) for r in rates],
            "spread": round((max(rates) - min(rates)) / 2 / mean, 3) if mean > 0 else None,
            "non_202": sum(r.non_accepted for r in self.results),
            "errors": sum(r.error_count for r in self.results),
            "cpu_cores": {
                k: round(sum(c.get(k, 0.0) for c in self.cpus) / len(self.cpus), 2)
                for k in cpu_keys
            },
            "cpu_cores_rounds": self.cpus,
            "peak_rss_kib": max(rss) if rss else None,
            "rounds": [r.as_dict() for r in self.results],
            "warmups": [w.as_dict() if w else None for w in self.warmups],
            **self.extra,
        }


class Bench:
    def __init__(self, opts: Options, workdir: Path, procs: Procs) -> None:
        self.opts = opts
        self.workdir = workdir
        self.procs = procs
        self.phase = 0
        self.wrk = shutil.which("wrk") if opts.load_tool != "builtin" else None
        if opts.load_tool == "wrk" and self.wrk is None:
            raise RuntimeError("--load-tool wrk: wrk is not installed")
        self.sandbox: Target | None = None
        self.redis: BenchRedis | None = None

    # -- processes

    def start_sandbox(self) -> Target:
        key_file = self.workdir / "sandbox-key"
        key_file.write_text(API_KEY, encoding="utf-8")
        port = free_port(HOST)
        proc = self.procs.start(
            "sandbox",
            [
                sys.executable,
                "-m",
                "gateway",
                "sandbox",
                "--listen",
                f"{HOST}:{port}",
                "--api-key-file",
                str(key_file),
            ],
            child_env({}),
        )
        wait_ready(proc, f"http://{HOST}:{port}/_sandbox/stats")
        self.sandbox = Target("sandbox", proc, port)
        return self.sandbox

    def sandbox_call(self, path: str, method: str = "GET") -> dict[str, Any]:
        assert self.sandbox is not None
        status, body = http(f"http://{HOST}:{self.sandbox.port}{path}", method=method)
        if not 200 <= status < 300:
            raise RuntimeError(f"sandbox {method} {path}: {status} {body[:200]!r}")
        data: dict[str, Any] = json.loads(body) if body else {}
        return data

    def start_baseline(self) -> Target:
        port = free_port(HOST)
        proc = self.procs.start(
            "baseline",
            [sys.executable, "-m", "tests.bench.baseline", "--listen", f"{HOST}:{port}"],
            child_env({}),
        )
        wait_ready(proc, f"http://{HOST}:{port}/healthz")
        return Target("baseline", proc, port)

    def start_gateway(
        self,
        name: str,
        spool_path: str,
        *,
        log_level: str = "WARNING",
        drain_timeout: str = "10s",
        workers: int | None = None,
        module: str = "gateway",
        pure: bool = False,
    ) -> Target:
        """`serve` (or `serve --workers N` with this run's Redis: the scale-out rows;
        `module` tests.bench.shell_only: the relay stubbed; `pure`: the compiled modules
        left unused, as ORTTO_GATEWAY_NO_EXTENSIONS=1 does)."""
        assert self.sandbox is not None
        port, metrics_port = free_port(HOST), free_port(HOST)
        extra: dict[str, str] = {}
        argv = [sys.executable, "-m", module, "serve"]
        if workers is not None:
            assert self.redis is not None
            argv += ["--workers", str(workers)]
            # The supervisor's metrics directory (tempfile) goes to the run's temp dir too.
            extra = {"GATEWAY_REDIS_URL": self.redis.url, "TMPDIR": str(self.workdir)}
        if pure:
            extra[compiled.NO_EXTENSIONS] = "1"
        env = child_env(
            {
                **extra,
                "GATEWAY_API_KEY": API_KEY,
                "GATEWAY_UPSTREAM_URL": f"http://{HOST}:{self.sandbox.port}",
                "GATEWAY_ACTIVITIES": ACTIVITY_ID,
                "GATEWAY_LISTEN": f"{HOST}:{port}",
                "GATEWAY_METRICS_LISTEN": f"{HOST}:{metrics_port}",
                "GATEWAY_SPOOL_PATH": spool_path,
                "GATEWAY_UPSTREAM_RATE": f"{self.opts.upstream_rate:g}",
                "GATEWAY_LOG_LEVEL": log_level,
                "GATEWAY_DRAIN_TIMEOUT": drain_timeout,
                "GATEWAY_SPOOL_COMMIT": self.opts.spool_commit,
            }
        )
        proc = self.procs.start(name, argv, env)
        wait_ready(proc, f"http://{HOST}:{port}/readyz")
        target = Target(name, proc, port, metrics_port)
        if workers is not None and workers > 1:
            # One worker answering /readyz is not all of them: wait until each listens.
            target.workers = wait_listeners(proc, port, workers)
            target.helpers = [p for p in descendants(proc.pid) if p not in target.workers]
        return target

    def stop(self, target: Target) -> int:
        """SIGTERM (a supervisor forwards it to its workers); check that every process ended."""
        status = target.proc.stop()
        if status != 0:
            print(
                f"bench: warning: {target.name} exited with status {status}:\n{target.proc.tail()}",
                file=sys.stderr,
            )
        left = [pid for pid in target.pids if pid_alive(pid)]
        if target.proc.strays or left:
            print(
                f"bench: warning: {target.name}: {target.proc.strays} process(es) outlived it "
                f"and were killed; still running: {left}",
                file=sys.stderr,
            )
        return status

    # -- load

    def drive(self, target: Target, seconds: int, row: Row) -> LoadResult:
        """Max-rate load for `seconds`; every phase sends people and IPs never sent before."""
        self.phase += 1
        prefix, ip_base = f"r{self.phase}", self.phase * IP_BLOCK
        connections = row.connections or self.opts.connections
        if self.wrk is not None:
            result = run_wrk(
                self.wrk,
                target.url,
                connections=connections,
                threads=row.threads or self.opts.threads,
                duration=seconds,
                prefix=prefix,
                ip_base=ip_base,
                activities=row.activities,
            )
        else:
            factory = RequestFactory(HOST, target.port, prefix, ip_base, row.activities)
            result = asyncio.run(
                closed_loop(
                    HOST,
                    target.port,
                    connections=connections,
                    duration=seconds,
                    make_request=factory,
                )
            )
        self.check_alive(target)
        return result

    def max_rate(self, target: Target, row: Row) -> LoadResult:
        progress(
            f"{row.label} (round {len(row.results) + 1}): warm-up {self.opts.warmup} s, "
            f"then {self.opts.duration} s at max rate"
        )
        warm = self.drive(target, self.opts.warmup, row) if self.opts.warmup > 0 else None
        meter = self.meter(target)
        meter.start()
        result = self.drive(target, self.opts.duration, row)
        cpu = meter.stop(load_tool_is_child=self.wrk is not None)
        row.add(result, warm, cpu)
        progress(
            f"  {result.accepted_per_s * row.activities:,.0f} activities/s accepted, "
            f"{result.non_accepted} non-202, "
            f"{result.error_count} errors; CPU cores {fmt_cpu(cpu)}"
        )
        return result

    def fixed_rate(self, target: Target, rate: float) -> tuple[LoadResult, dict[str, float]]:
        self.phase += 1
        factory = RequestFactory(HOST, target.port, f"r{self.phase}", self.phase * IP_BLOCK)
        progress(f"latency: {rate:,.0f}/s offered for {self.opts.latency_duration} s")
        meter = self.meter(target)
        meter.start()
        result = asyncio.run(
            open_loop(
                HOST,
                target.port,
                rate=rate,
                duration=self.opts.latency_duration,
                make_request=factory,
            )
        )
        cpu = meter.stop(load_tool_is_child=False)
        self.check_alive(target)
        lat = result.latency_ms
        progress(
            f"  p50 {lat.get('p50', math.nan):.2f} ms, p99 {lat.get('p99', math.nan):.2f} ms, "
            f"{result.non_accepted} non-202, {result.error_count} errors"
        )
        return result, cpu

    def meter(self, target: Target) -> CpuMeter:
        pids: dict[str, list[int]] = {"server": target.pids}
        if self.sandbox is not None:
            pids["sandbox"] = [self.sandbox.proc.pid]
        if self.redis is not None:
            pids["redis"] = [self.redis.pid]
        return CpuMeter(pids)

    def check_alive(self, target: Target) -> None:
        if not target.proc.alive():
            raise RuntimeError(
                f"{target.name} died under load (status {target.proc.popen.returncode}):\n"
                f"{target.proc.tail()}"
            )
        dead = [pid for pid in target.workers if not pid_alive(pid)]
        if dead:  # the supervisor would restart it: the figure would not be two workers'
            raise RuntimeError(f"{target.name}: worker(s) {dead} died under load")

    # -- gateway state

    def metrics(self, target: Target) -> dict[str, float]:
        status, body = http(f"http://{HOST}:{target.metrics_port}/metrics")
        if status != 200:
            raise RuntimeError(f"{target.name} /metrics answered {status}")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("ortto_gateway_") and " " in line:
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    def wait_delivered(self, expected: int) -> dict[str, Any]:
        """Wait until the sandbox holds `expected` activities (or no progress / timeout)."""
        started = time.monotonic()
        deadline = started + self.opts.drain_timeout
        last_count, last_progress = -1, started
        while True:
            stats = self.sandbox_call("/_sandbox/stats")
            got = int(stats["activities"]) + int(stats["duplicates"])
            now = time.monotonic()
            if got != last_count:
                last_count, last_progress = got, now
            if got >= expected or now >= deadline or now - last_progress > 15.0:
                break
            time.sleep(0.1)
        return {
            "expected": expected,
            "delivered": got,
            "left": max(0, expected - got),
            "waited_s": round(time.monotonic() - started, 2),
            "sandbox": stats,
        }

    # -- the limiter

    def _json_child(self, name: str, argv: list[str]) -> dict[str, Any]:
        """Run a measuring subprocess and read the JSON object it prints last."""
        proc = self.procs.start(name, argv, child_env({}))
        try:
            status = proc.popen.wait(timeout=300)
        finally:
            proc.stop()
        if status != 0:
            raise RuntimeError(f"{name} measurement failed ({status}):\n{proc.tail()}")
        data: dict[str, Any] = json.loads(proc.log_path.read_text().strip().splitlines()[-1])
        return data

    def limiter_memory(self) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "tests.bench.limiter_mem",
            "--keys",
            str(self.opts.limiter_keys),
        ]
        if self.opts.limiter_tracemalloc:
            argv.append("--tracemalloc")
        progress(f"limiter: MemoryStore with {self.opts.limiter_keys:,} keys")
        data = self._json_child("limiter", argv)
        progress(f"  {data['rss_bytes_per_key']} B/key (RSS)")
        return data

    def limiter_stores(self) -> dict[str, Any]:
        """`MemoryStore` vs `RedisStore` throughput and Redis memory per key (fresh process)."""
        assert self.redis is not None
        opts = self.opts
        argv = [
            sys.executable,
            "-m",
            "tests.bench.limiter_stores",
            "--redis-url",
            self.redis.url,
            "--redis-pid",
            str(self.redis.pid),
            "--duration",
            f"{opts.store_duration:g}",
            "--warmup",
            f"{opts.store_warmup:g}",
            "--callers",
            str(opts.store_callers),
            "--memory-keys",
            str(opts.redis_memory_keys),
        ]
        progress(
            f"limiter stores: MemoryStore vs RedisStore, {opts.store_callers} callers, "
            f"{opts.store_warmup:g} s warm-up + {opts.store_duration:g} s per phase; Redis "
            f"memory over {opts.redis_memory_keys:,} keys"
        )
        data = self._json_child("limiter-stores", argv)
        for kind in ("memory", "redis"):
            for key, phase in data["throughput"][kind].items():
                progress(f"  {kind} {key}: {phase['acquires_per_s']:,.0f} acquires/s")
        mem = data["redis_memory"]
        progress(f"  Redis: {mem['used_memory_bytes_per_key']} B/key (used_memory)")
        return data

    def three_hosts(self) -> dict[str, Any]:
        """Three gateways, one account's rate shared through this run's Redis (fresh process)."""
        assert self.redis is not None
        opts = self.opts
        self.redis.flushall()
        argv = [
            sys.executable,
            "-m",
            "tests.bench.three_hosts",
            "--redis-url",
            self.redis.url,
            "--plan",
            f"{opts.plan_rate:g}",
            "--warmup",
            str(opts.warmup),
            "--duration",
            str(opts.duration),
            "--drain-timeout",
            f"{opts.drain_timeout:g}",
            "--spool-commit",
            opts.spool_commit,
            "--workdir",
            str(self.workdir),
        ]
        progress(
            f"three hosts, one account: plan {opts.plan_rate:g}/s, traffic 10:1:1, "
            f"{opts.warmup} s warm-up + {opts.duration} s measured"
        )
        data = self._json_child("three-hosts", argv)
        progress(
            f"  {data['requests_per_s']:.2f} upstream requests/s = {data['used_over_plan']:.3f} "
            f"of the plan; most in one second {data['most_in_one_second']}; "
            f"429s {data['upstream_429']}; duplicates {data['duplicates']}"
        )
        return data


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def fmt_cpu(cpu: dict[str, float]) -> str:
    keys = ("server", "load generator", "sandbox", "redis", "other")
    return " ".join(f"{k}={cpu[k]:.2f}" for k in keys if k in cpu)


def log_lines(proc: Proc) -> dict[str, Any]:
    """Lines and bytes a server wrote; its warnings and errors (the first few kept)."""
    try:
        data = proc.log_path.read_bytes()
    except OSError:
        return {}
    lines = data.splitlines()
    warnings = [ln for ln in lines if b'"level":"warning"' in ln]
    errors = [ln for ln in lines if b'"level":"error"' in ln or b'"level":"critical"' in ln]
    return {
        "bytes": len(data),
        "lines": len(lines),
        "warnings": len(warnings),
        "errors": len(errors),
        "first_problems": [ln.decode(errors="replace")[:500] for ln in (errors + warnings)[:5]],
    }


ROWS = {
    "baseline": "baseline: bare aiohttp app",
    "shell": "gateway shell, relay stubbed",
    "durable": "gateway, durable spool",
    "durable_pure": "gateway, durable, pure Python",
    "memory": "gateway, in-memory spool",
    "info_logs": "gateway, durable spool, INFO logs",
    "batch10": "gateway, durable, 10 per request",
    "redis_w1": "gateway, Redis limits, 1 worker",
    "redis_w2": "gateway, Redis limits, 2 workers",
}
# Rows whose requests carry several activities (their figures are activities per second).
BATCHES = {"batch10": 10}
# The scale-out rows: `serve --workers N` with the limits in this run's Redis.
SCALE_OUT = {"redis_w1": 1, "redis_w2": 2}


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric's samples over every label set (0 when absent)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def run_row(bench: Bench, row: Row, results: dict[str, Any], *, first_durable: bool) -> None:
    """Start the row's server, measure its max rate (and more for the first durable), stop it."""
    tag = f"{row.key}-{len(row.results) + 1}"
    if row.key == "baseline":
        target = bench.start_baseline()
        bench.max_rate(target, row)
        row.peak_rss_kib.append(target.proc.status_kib("VmHWM"))
        bench.stop(target)
        return
    bench.sandbox_call("/_sandbox/reset", "POST")
    spool = ":memory:" if row.key == "memory" else str(bench.workdir / f"spool-{tag}.sqlite3")
    workers = SCALE_OUT.get(row.key)
    if workers is not None:
        assert bench.redis is not None
        bench.redis.flushall()  # every scale-out row starts from an empty Redis
    target = bench.start_gateway(
        f"gateway-{tag}",
        spool,
        log_level="INFO" if row.key == "info_logs" else "WARNING",
        # Rows that do not wait for delivery leave a backlog: do not wait 10 s on exit.
        drain_timeout="10s" if first_durable else "1s",
        workers=workers,
        module="tests.bench.shell_only" if row.key == "shell" else "gateway",
        pure=row.key == "durable_pure",
    )
    if workers is not None:
        # Where the supervisor's metrics directory went (TMPDIR = the run's temp dir).
        row.extra.setdefault("metrics_dirs_in_workdir", []).append(
            len(list(bench.workdir.glob("ortto-gateway-metrics-*")))
        )
    result = bench.max_rate(target, row)
    at_end = bench.metrics(target)
    backlog = int(at_end.get("ortto_gateway_spool_depth", -1))
    row.extra.setdefault("backlog_at_end_of_load", []).append(backlog)
    row.extra.setdefault("spool_commit", []).append(spool_commit_modes(at_end))
    if workers is not None:
        assert bench.redis is not None
        warm = row.warmups[-1]
        row.extra["workers"] = workers
        row.extra.setdefault("worker_pids", []).append(target.workers or [target.proc.pid])
        # Each accepted activity is a new person: a key in Redis unless the limiter fell
        # back to its in-process store (counted by limiter_errors_total).
        row.extra.setdefault("accepted_incl_warmup", []).append(
            (warm.accepted if warm else 0) + result.accepted
        )
        row.extra.setdefault("redis_keys_at_end", []).append(bench.redis.dbsize())
        row.extra.setdefault("limiter_errors", []).append(
            int(metric_sum(at_end, "ortto_gateway_limiter_errors_total"))
        )
    if first_durable:
        warm = row.warmups[-1]
        accepted = (warm.accepted if warm else 0) + result.accepted
        progress(f"  backlog at end of load: {backlog:,}; waiting for delivery to drain it")
        drain = bench.wait_delivered(accepted)
        drain["backlog_at_end_of_load"] = backlog
        drain["upstream_requests"] = upstream_statuses(bench.metrics(target))
        row.extra["drain"] = drain
        progress(
            f"  delivered {drain['delivered']:,} (>= {drain['expected']:,} answered 202) in "
            f"{drain['sandbox']['requests']:,} upstream requests; waited {drain['waited_s']} s"
        )
        rate = result.accepted_per_s / 2
        latency, latency_cpu = bench.fixed_rate(target, rate)
        results["latency"] = {
            "target": row.label,
            "offered_rate": round(rate, 1),
            "result": latency.as_dict(),
            "cpu_cores": latency_cpu,
        }
        before = drain["delivered"]
        results["latency"]["drain"] = bench.wait_delivered(before + latency.accepted)
    row.peak_rss_kib.append(target.peak_rss_kib())
    bench.stop(target)
    row.extra.setdefault("logs", []).append(log_lines(target.proc))
    if workers is not None:
        row.extra.setdefault("processes_left_after_stop", []).append(
            target.proc.strays + sum(1 for pid in target.pids if pid_alive(pid))
        )
    if spool != ":memory:":
        # The spool and its WAL files; with --workers N, each worker's (spool-<tag>.w<i>.*).
        files = sorted(Path(spool).parent.glob(Path(spool).stem + ".*"))
        if workers is not None:
            row.extra.setdefault("spool_files", []).append([f.name for f in files])
        for path in files:
            path.unlink(missing_ok=True)


def run(opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ortto-bench-", dir=opts.spool_dir))
    procs = Procs(workdir)
    results: dict[str, Any] = {}
    try:
        bench = Bench(opts, workdir, procs)
        info = machine_info(REPO, workdir)
        info["fsync"] = fsync_probe(workdir)
        # Whether the gateway rows (all but durable_pure) run the compiled core: the same
        # tree and environment as this process (`make bench` builds it first).
        info["compiled"] = compiled.summary()
        info["load_tool"] = (
            f"{wrk_version(bench.wrk)} -t{opts.threads} -c{opts.connections}"
            if bench.wrk
            else f"built-in asyncio closed loop, {opts.connections} connections "
            + ("(--load-tool builtin)" if opts.load_tool == "builtin" else "(wrk not found)")
        )
        info["fixed_rate_tool"] = "built-in asyncio open loop, 64 connections (no wrk2)"
        results["machine"] = info
        results["options"] = {
            "scale_out_load": f"-t{opts.scale_out_threads} -c{opts.scale_out_connections}",
            "store_duration_s": opts.store_duration,
            "store_warmup_s": opts.store_warmup,
            "store_callers": opts.store_callers,
            "redis_memory_keys": opts.redis_memory_keys,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "rounds": opts.rounds,
            "latency_duration_s": opts.latency_duration,
            "connections": opts.connections,
            "threads": opts.threads,
            "upstream_rate": opts.upstream_rate,
            "plan_rate": opts.plan_rate,
            "quick": opts.quick,
            "limiter_keys": opts.limiter_keys,
            "spool_commit": opts.spool_commit,
        }
        progress(f"load tool: {info['load_tool']}; work dir {workdir}")
        bench.start_sandbox()
        if opts.redis_server is not None:
            bench.redis = start_redis(procs, workdir, opts.redis_server)
            results["redis"] = {
                "version": redis_server_version(opts.redis_server),
                "args": "--bind 127.0.0.1 --save '' --appendonly no (temp dir)",
            }
            progress(f"redis: {results['redis']['version']} on port {bench.redis.port}")
        else:
            results["redis"] = {"skipped": opts.no_redis_reason}
            progress(f"redis rows skipped: {opts.no_redis_reason}")
        keys = [k for k in ROWS if bench.redis is not None or k not in SCALE_OUT]
        rows = {key: Row(key, ROWS[key], activities=BATCHES.get(key, 1)) for key in keys}
        for key in SCALE_OUT:
            if key in rows:
                rows[key].threads = opts.scale_out_threads
                rows[key].connections = opts.scale_out_connections
        # Rounds run in mirrored order (A B C D, D C B A, ...) so a drift in the machine's
        # load weighs on every row alike.
        for round_no in range(opts.rounds):
            order = keys if round_no % 2 == 0 else list(reversed(keys))
            for key in order:
                first_durable = key == "durable" and round_no == 0
                run_row(bench, rows[key], results, first_durable=first_durable)
        bench.sandbox_call("/_sandbox/reset", "POST")
        if bench.redis is not None:
            results["three_hosts"] = bench.three_hosts()
        else:
            results["three_hosts"] = {"skipped": opts.no_redis_reason}
        results["limiter"] = bench.limiter_memory()
        if bench.redis is not None:
            results["limiter_stores"] = bench.limiter_stores()
            status = bench.redis.proc.stop()
            results["redis"]["exit_status"] = status
            if status != 0:
                progress(f"warning: redis-server exited with {status}:\n{bench.redis.proc.tail()}")
        results["rows"] = {k: r.as_dict() for k, r in rows.items()}
        results["derived"] = report.derive(results)
        results["machine"]["loadavg_at_end"] = loadavg()
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        return results
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def spool_commit_modes(metrics: dict[str, float]) -> list[str]:
    """Where the gateway's spool commits (`spool_commit_mode{mode}`), as GATEWAY_SPOOL_COMMIT
    =auto chose on this disk; one entry per mode in use (workers may differ)."""
    prefix = 'ortto_gateway_spool_commit_mode{mode="'
    return sorted(k[len(prefix) : -2] for k, v in metrics.items() if k.startswith(prefix) and v)


def upstream_statuses(metrics: dict[str, float]) -> dict[str, int]:
    """`ortto_gateway_upstream_requests_total` by status label."""
    out: dict[str, int] = {}
    prefix = 'ortto_gateway_upstream_requests_total{status="'
    for name, value in metrics.items():
        if name.startswith(prefix):
            out[name[len(prefix) :].rstrip('"}')] = int(value)
    return out


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = run(opts)
    except KeyboardInterrupt:
        progress("interrupted; every child process was stopped")
        return 130
    except Exception as exc:
        progress(f"FAILED: {exc}")
        return 1
    print(report.render(results))
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    progress(f"wrote {opts.json_path} ({results['elapsed_s']} s)")
    return 0
