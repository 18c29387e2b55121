"""Three hosts, one Ortto account: how much of the plan's rate the shared pacer uses.

Run in a fresh process against a Redis the benchmark started; prints one JSON line.

Three gateway processes (`python -m gateway serve`, each with its own durable spool,
every one with `GATEWAY_REDIS_URL` set to the same Redis) deliver to one sandbox that
refuses (429) more than `--plan` requests in any sliding second, as Ortto does for the
account. The gateways are told the plan less `--margin` (5%: docs/scaling-upstream.md).
The sandbox is a process of its own (this module with `--serve-sandbox PORT`, so the
load's work here does not delay its timestamps); it also answers `GET /_bench/requests`
with each request's arrival time, status and host, and every email received.

Traffic, for `--warmup` + `--duration` seconds: every `TICK` each host is posted its part
of `PER_TICK` activities, split 10:1:1, each activity a new person. The gateways batch
for at most `BATCH_MAX_WAIT` (not the default 0.25 s), so every host, the small ones
too, has a batch ready up to `1 / TICK` times a second: together they ask for about
three times the plan's requests with a light load (480 activities/s), and the figure is
how much of the account's rate the shared pacer gives them, not how fast the gateways
take activities in. `GATEWAY_UPSTREAM_RATE_FALLBACK` is a third of the rate told, as
docs/scaling-upstream.md advises; the rest of the settings are the gateway's defaults.

Reported, from the sandbox's own timestamps: upstream requests a second over the measured
seconds (after the warm-up), against the plan and against the rate the gateways were told;
each host's share; the most requests in any one second of the whole run (the drain
included), which must never exceed the plan; 429s; then, once every accepted activity has
been delivered, duplicates (activities received twice) and activities lost; and each
host's `ortto_gateway_upstream_rate_fallback_total` (requests paced without Redis: 0).

    python -m tests.bench.three_hosts --redis-url redis://127.0.0.1:PORT/0 [--plan 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.config import ORTTO_MAX_ACTIVITIES
from gateway.sandbox import SANDBOX_STATE, ReceivedRequest, SandboxState, create_sandbox_app
from gateway.server import free_port
from tests.bench.procs import Proc, Procs, child_env, http, wait_ready
from tests.bench.workload import ACTIVITY_ID, PATH

HOST = "127.0.0.1"
API_KEY = "bench-three-hosts-0123456789"
SPLIT = (10, 1, 1)  # each host's part of the traffic
TICK = 0.05  # seconds between two posts to each host (the load's pace, not a wait)
PER_TICK = 24  # activities posted per tick to the three hosts together
BATCH_MAX_WAIT = "20ms"  # GATEWAY_BATCH_MAX_WAIT: a batch for each tick, on every host
FALLBACK_METRIC = "ortto_gateway_upstream_rate_fallback_total"


def most_in_one_second(times: Sequence[float]) -> int:
    """The most requests in any half-open second (t - 1, t], as the sandbox counts them."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def email(tag: str, host: int) -> str:
    """A new person's email, naming the host it was posted to (`<tag>.<host>@...`)."""
    return f"{tag}.{host}@example.com"


def host_of(request: ReceivedRequest) -> int:
    """Which host sent a request: its activities' emails say so (see `email`)."""
    activities = orjson.loads(request.body)["activities"]
    hosts = {int(a["fields"]["str::email"].split("@")[0].rsplit(".", 1)[1]) for a in activities}
    if len(hosts) != 1:
        raise AssertionError(f"one request carried activities of hosts {sorted(hosts)}")
    return hosts.pop()


async def _bench_requests(request: web.Request) -> web.Response:
    """Every request as the sandbox recorded it, and every email it received."""
    state = request.app[SANDBOX_STATE]
    body = {
        "requests": [
            {
                "time": r.time,
                "status": r.status,
                "activities": r.n_activities,
                "host": host_of(r) if r.n_activities else None,
            }
            for r in state.requests
        ],
        "emails": [a.email for a in state.activities],
        "duplicates": state.duplicates,
    }
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


def serve_sandbox(port: int, plan: float) -> None:
    """The sandbox limited to the plan, until SIGTERM."""
    app = create_sandbox_app(SandboxState(api_key=API_KEY, rate_per_second=plan))
    app.router.add_get("/_bench/requests", _bench_requests)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


class Hosts:
    """The three gateways, the sandbox they deliver to, and the traffic they are sent."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.sandbox_port = free_port(HOST)
        self.told = args.plan * (1 - args.margin)
        self.ports = [free_port(HOST) for _ in SPLIT]
        self.metrics_ports = [free_port(HOST) for _ in SPLIT]
        self.gateways: list[Proc] = []
        self.accepted: set[str] = set()
        self.refused: Counter[str] = Counter()  # answers other than 202 to the load
        self.sent = 0
        self.traffic_s = 0.0  # seconds of traffic so far
        self.per_tick = [PER_TICK * part // sum(SPLIT) for part in SPLIT]

    def start_sandbox(self) -> None:
        argv = [sys.executable, "-m", "tests.bench.three_hosts", "--plan", f"{self.args.plan:g}"]
        argv += ["--redis-url", "", "--serve-sandbox", str(self.sandbox_port)]
        proc = self.procs.start("sandbox", argv, child_env({}))
        wait_ready(proc, f"http://{HOST}:{self.sandbox_port}/_sandbox/stats")

    def sandbox_stats(self) -> dict[str, Any]:
        status, body = http(f"http://{HOST}:{self.sandbox_port}/_sandbox/stats")
        if status != 200:
            raise RuntimeError(f"sandbox stats: {status}")
        data: dict[str, Any] = json.loads(body)
        return data

    def sandbox_records(self) -> dict[str, Any]:
        status, body = http(f"http://{HOST}:{self.sandbox_port}/_bench/requests", timeout=30)
        if status != 200:
            raise RuntimeError(f"sandbox records: {status}")
        data: dict[str, Any] = json.loads(body)
        return data

    def start_gateways(self) -> None:
        upstream = f"http://{HOST}:{self.sandbox_port}"
        for i, (port, metrics_port) in enumerate(zip(self.ports, self.metrics_ports, strict=True)):
            env = child_env(
                {
                    "GATEWAY_API_KEY": API_KEY,
                    "GATEWAY_UPSTREAM_URL": upstream,
                    "GATEWAY_ACTIVITIES": ACTIVITY_ID,
                    "GATEWAY_LISTEN": f"{HOST}:{port}",
                    "GATEWAY_METRICS_LISTEN": f"{HOST}:{metrics_port}",
                    "GATEWAY_SPOOL_PATH": str(self.workdir / f"spool{i}.sqlite3"),
                    "GATEWAY_REDIS_URL": self.args.redis_url,
                    "GATEWAY_UPSTREAM_RATE": f"{self.told:g}",
                    "GATEWAY_BATCH_MAX_WAIT": BATCH_MAX_WAIT,
                    # As docs/scaling-upstream.md advises for N hosts: if Redis fails, the
                    # hosts together still keep to the rate.
                    "GATEWAY_UPSTREAM_RATE_FALLBACK": f"{self.told / len(SPLIT):g}",
                    "GATEWAY_IP_LIMIT": "100000000/1h",  # all from 127.0.0.1
                    "GATEWAY_LOG_LEVEL": "WARNING",
                    "GATEWAY_SPOOL_COMMIT": self.args.spool_commit,
                }
            )
            argv = [sys.executable, "-m", "gateway", "serve"]
            self.gateways.append(self.procs.start(f"host{i}", argv, env))

    async def wait_ready(self) -> None:
        await asyncio.gather(
            *(
                asyncio.to_thread(wait_ready, proc, f"http://{HOST}:{port}/readyz")
                for proc, port in zip(self.gateways, self.ports, strict=True)
            )
        )

    async def post(self, session: aiohttp.ClientSession, host: int, count: int) -> None:
        """`count` new people to one host, in requests of at most 100 activities."""
        while count > 0:
            n = min(count, ORTTO_MAX_ACTIVITIES)
            first = self.sent
            self.sent += n
            count -= n
            emails = [email(f"p{first + k}", host) for k in range(n)]
            body = {
                "activities": [
                    {"activity_id": ACTIVITY_ID, "fields": {"str::email": e}} for e in emails
                ]
            }
            url = f"http://{HOST}:{self.ports[host]}{PATH}"
            try:
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 202:
                        self.accepted.update(emails)
                    else:
                        self.refused[str(resp.status)] += n
            except aiohttp.ClientError as exc:
                self.refused[type(exc).__name__] += n

    async def traffic(self, session: aiohttp.ClientSession, seconds: float) -> None:
        """Every `TICK`, each host its part, without waiting for the previous answers (a
        slow answer does not slow the load); then every answer."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        posts: list[asyncio.Task[None]] = []
        tick = 0
        while loop.time() < start + seconds:
            posts += [
                asyncio.create_task(self.post(session, i, n)) for i, n in enumerate(self.per_tick)
            ]
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * TICK - loop.time()))  # the load's pace
        await asyncio.gather(*posts)
        self.traffic_s += loop.time() - start

    async def drain(self) -> float:
        """Wait (with a deadline) until the sandbox holds as many activities as accepted."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < self.args.drain_timeout:
            stats = await asyncio.to_thread(self.sandbox_stats)
            if stats["activities"] + stats["duplicates"] >= len(self.accepted):
                break
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        return loop.time() - started

    def fallbacks(self) -> list[float | None]:
        out: list[float | None] = []
        for port in self.metrics_ports:
            status, body = http(f"http://{HOST}:{port}/metrics")
            found = [
                float(line.rpartition(" ")[2])
                for line in body.decode().splitlines()
                if status == 200 and line.startswith(FALLBACK_METRIC + " ")
            ]
            out.append(found[0] if found else None)
        return out


def measure(
    hosts: Hosts, started: float, window: tuple[float, float], drain_s: float
) -> dict[str, Any]:
    """The figures, from the sandbox's records (times on its clock: `time.time`)."""
    args = hosts.args
    records = hosts.sandbox_records()
    requests = records["requests"]
    start, end = window
    measured = [r for r in requests if start <= r["time"] < end]
    used = len(measured) / (end - start)
    by_host = Counter(r["host"] for r in measured if r["activities"])
    counts = Counter(records["emails"])
    statuses = Counter(str(r["status"]) for r in requests)
    return {
        "plan_per_s": args.plan,
        "told_per_s": round(hosts.told, 3),
        "margin": args.margin,
        "split": list(SPLIT),
        "offered_activities_per_s": round(sum(hosts.per_tick) / TICK),
        "sent_activities_per_s": round(hosts.sent / hosts.traffic_s),
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests_per_s": round(used, 2),
        "used_over_plan": round(used / args.plan, 3),
        "used_over_told": round(used / hosts.told, 3),
        "requests_per_s_by_host": [round(by_host[i] / (end - start), 2) for i in range(len(SPLIT))],
        "activities_per_request": round(sum(r["activities"] for r in measured) / len(measured), 1)
        if measured
        else None,
        "most_in_one_second": most_in_one_second([r["time"] for r in requests]),
        "upstream_requests": len(requests),
        "upstream_statuses": dict(sorted(statuses.items())),
        "upstream_429": statuses.get("429", 0),
        "accepted": len(hosts.accepted),
        "refused_by_gateways": dict(hosts.refused),
        "delivered": len(counts),
        "lost": len(hosts.accepted - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1) + records["duplicates"],
        "drain_s": round(drain_s, 2),
        "fallbacks": hosts.fallbacks(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    hosts = Hosts(args, workdir)
    try:
        hosts.start_sandbox()
        hosts.start_gateways()
        await hosts.wait_ready()
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:
            await hosts.traffic(session, args.warmup)
            window_start = time.time()  # the sandbox's clock
            await hosts.traffic(session, args.duration)
            window = (window_start, time.time())
        drain_s = await hosts.drain()
        result = measure(hosts, started, window, drain_s)
        gateways = hosts.gateways
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in gateways))
        result["exit_statuses"] = [p.popen.returncode for p in gateways]
        return result
    finally:
        await asyncio.to_thread(hosts.procs.stop_all)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True, help="the Redis every host shares")
    parser.add_argument("--plan", type=float, default=20.0, help="the plan: requests/s (20)")
    parser.add_argument("--margin", type=float, default=0.05, help="told the plan less this")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before (2)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--spool-commit", default="auto", choices=("auto", "loop", "thread"))
    parser.add_argument("--workdir", type=Path, help="where spools and logs go (a temp dir)")
    parser.add_argument("--serve-sandbox", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sandbox is not None:
        serve_sandbox(args.serve_sandbox, args.plan)
        return
    if args.duration <= 0 or args.plan <= 0 or not 0 <= args.margin < 1:
        parser.error("--duration and --plan must be > 0, --margin in [0, 1)")
    with tempfile.TemporaryDirectory(prefix="three-hosts-", dir=args.workdir) as workdir:
        print(json.dumps(asyncio.run(run(args, Path(workdir)))))


if __name__ == "__main__":
    main()
