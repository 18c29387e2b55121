"""CPU per request of the real gateway app, in one process: for before/after figures.

`python -m tests.bench.cpu_profile [--requests N] [--activities K] [--profile]` serves
`create_app` (the real middlewares, handler, relay, limiter, metrics, feed and a durable
spool committing on the loop, by default on tmpfs) on a loopback port, and sends it N
requests over 32 keep-alive connections from the same process, each a new person with
K activities. The client only writes prepared bytes and reads each answer whole, so
almost all the CPU is the server's; what it costs is the same on both sides of an A/B.

It prints the process CPU time per request (`time.process_time`, best of `--repeat`
runs, so a busy machine inflates the figure less than wall-clock), and with
`--profile` the top functions of a cProfile run (cumulative and own time). Delivery is
not started (no upstream): only the path from the socket to the spool's commit.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import socket
import tempfile
import time
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import load_settings
from gateway.runtime import tune_gc
from gateway.server import runner_options
from tests.bench.workload import ACTIVITY_ID, PATH, batch_body, client_ip, one_body, per_ip

CONNECTIONS = 32


def _settings(spool: str, log_level: str) -> object:
    return load_settings(
        {
            "GATEWAY_API_KEY": "bench-key-0123456789abcdef",
            "GATEWAY_ACTIVITIES": ACTIVITY_ID,
            "GATEWAY_SPOOL_PATH": spool,
            "GATEWAY_SPOOL_COMMIT": "loop",
            "GATEWAY_LOG_LEVEL": log_level,
        }
    )


def _request(port: int, n: int, activities: int) -> bytes:
    local = f"p{n}"
    body = (one_body(local) if activities == 1 else batch_body(local, activities)).encode()
    ip = client_ip(0, n, per_ip(activities))
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Forwarded-For: {ip}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(port: int, requests: list[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = 0
    for raw in requests:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        accepted += head.startswith(b"HTTP/1.1 202")
    writer.close()
    return accepted


async def _run(args: argparse.Namespace, spool_dir: str) -> list[float]:
    import logging

    logging.getLogger("gateway").setLevel(args.log_level)
    settings = _settings(str(Path(spool_dir) / "spool.sqlite3"), args.log_level)
    app = create_app(settings)  # type: ignore[arg-type]
    # No upstream: the delivery worker is left out (an idle one costs little anyway).
    app.cleanup_ctx[:] = [c for c in app.cleanup_ctx if "delivery" not in c.__name__]
    runner = web.AppRunner(app, **runner_options(settings))  # type: ignore[arg-type]
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    await site.start()
    tune_gc()  # as `serve` does once listening
    per_run: list[float] = []
    try:
        serial = 0
        for run in range(args.repeat + 1):  # the first run warms up
            batches: list[list[bytes]] = [[] for _ in range(CONNECTIONS)]
            for i in range(args.requests):
                batches[i % CONNECTIONS].append(_request(port, serial, args.activities))
                serial += 1
            profiler = cProfile.Profile() if args.profile and run == args.repeat else None
            started = time.process_time()
            if profiler is not None:
                profiler.enable()
            counts = await asyncio.gather(*(_client(port, b) for b in batches))
            if profiler is not None:
                profiler.disable()
            spent = time.process_time() - started
            if sum(counts) != args.requests:
                raise RuntimeError(f"only {sum(counts)} of {args.requests} answered 202")
            if run:
                per_run.append(spent / args.requests)
            if profiler is not None:
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("cumulative").print_stats(45)
                stats.sort_stats("tottime").print_stats(40)
                print(out.getvalue())
    finally:
        await runner.cleanup()
    return per_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cpu_profile")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--activities", type=int, default=1, help="activities per request")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs (best is shown)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--spool-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--profile", action="store_true", help="cProfile the last run")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.spool_dir) as spool_dir:
        if args.no_uvloop:
            per_run = asyncio.run(_run(args, spool_dir))
        else:
            import uvloop

            per_run = uvloop.run(_run(args, spool_dir))
    runs = " ".join(f"{s * 1e6:.0f}" for s in per_run)
    print(
        f"CPU per request: best {min(per_run) * 1e6:.1f} us "
        f"(runs: {runs}); {args.activities} activities/request"
    )


if __name__ == "__main__":
    main()
