"""`python -m tests.bench.soak [--duration S] [--json PATH]` (what `make soak` runs).

Minutes of mixed traffic against a real `serve` process, with the sandbox as Ortto
throwing faults at it, then the two questions an operator asks after an incident:

- was every activity the gateway answered 202 for delivered (nothing lost), and once
  only (nothing received twice under two keys)?
- are the gateway's memory and open descriptors back at their plateau (no leak from
  bombs, broken bodies, slow uploads or upstream failures)?

The traffic, from a seeded generator over `--connections` concurrent clients: valid
JSON bodies (one to three activities, a new person each), the same gzipped, invalid
bodies, compression bombs (a small gzip body that inflates far past the body limit),
truncated raw-deflate bodies, and slow uploads that trickle a body until the gateway
gives up on them. Meanwhile the sandbox is told, every couple of seconds, to answer
the next requests with a 503, a 429 with `try-in-seconds`, a slow answer, or a 200
whose body is not Ortto's JSON (a captive portal's page).

Each activity carries an email of its own, so an email the sandbox lists twice is one
activity that reached Ortto twice without being merged: sent again under another `key`
(the sandbox merges a same-key resend, counted in its `duplicates`, which is fine).

Loopback only; every loop is bounded by `--duration`, and every process is stopped at
the end whatever happens. Exit status 1 when an accepted activity was not delivered or
was received twice, or when descriptors or memory did not come back (see `verdict`).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.procs import Procs, child_env, http, status_kib, wait_ready
from tests.servers import free_port

HOST = "127.0.0.1"
API_KEY = "pk-soak-5f1e0c7a9b8d4e3f2a1b0c9d8e7f6a5b"
ACTIVITY_ID = "act:cm:soak"
PATH = "/v1/activities/create"
MAX_BODY = 65536  # the gateway's GATEWAY_MAX_BODY_BYTES in the soak
READ_TIMEOUT = 2.0  # its GATEWAY_READ_TIMEOUT: how long a slow upload is tolerated
# How much more than the plateau the idle gateway may hold at the end: Python's
# allocator keeps freed arenas for reuse, so "back" means no growth beyond noise.
RSS_SLACK = 1.25
# Descriptors beyond the idle count that are not a leak: pooled upstream connections.
FD_SLACK = 8

# (kind, weight): the traffic mix.
MIX: list[tuple[str, int]] = [
    ("valid", 50),
    ("gzip", 12),
    ("invalid", 15),
    ("bomb", 8),
    ("truncated_deflate", 8),
    ("slow", 7),
]
# What the sandbox is told to do, in turn, while the traffic runs.
FAULTS: list[dict[str, Any]] = [
    {"status": 503, "count": 3},
    {"status": 429, "count": 1, "try_in_seconds": 1},
    {"status": 200, "count": 1, "process": True, "delay": 1.5},
    {"status": 200, "count": 1, "answer": "html"},  # a captive portal's page
    {"status": 502, "count": 2},
    {"status": 204, "count": 1, "answer": "empty"},
]


@dataclass
class Tally:
    """What the clients saw: answers by kind and status, and every accepted person."""

    answers: dict[str, dict[str, int]] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, status: int | str) -> None:
        per = self.answers.setdefault(kind, {})
        per[str(status)] = per.get(str(status), 0) + 1


@dataclass
class Received:
    """What the sandbox received: how many times each email (one per activity) arrived,
    read from `/_sandbox/received` a page at a time."""

    times: Counter[str] = field(default_factory=Counter)
    index: int = 0  # how much of the sandbox's list has been read
    duplicates: int = 0  # same-key resends the sandbox merged

    def add(self, data: dict[str, Any]) -> None:
        """One page of `/_sandbox/received`."""
        for item in data["activities"]:
            email = item.get("email")
            if email:
                self.times[email] += 1
        self.index = data["total"]
        self.duplicates = data["duplicates"]

    def poll(self, sandbox_url: str) -> None:
        _, body = http(f"{sandbox_url}/_sandbox/received?since={self.index}")
        self.add(json.loads(body))

    def twice(self) -> list[str]:
        """Emails received more than once: activities sent again under another `key` (the
        sandbox lists a resend it merged by its key only in `duplicates`)."""
        return sorted(email for email, n in self.times.items() if n > 1)


def activity(email: str) -> dict[str, Any]:
    return {"activity_id": ACTIVITY_ID, "fields": {"str::email": email}}


class Traffic:
    """The clients: each request built from a seeded generator, every answer tallied."""

    def __init__(self, port: int, seed: int, tally: Tally) -> None:
        self.port = port
        self.url = f"http://{HOST}:{port}{PATH}"
        self.rng = random.Random(seed)
        self.tally = tally
        self.serial = 0
        self.draws = 0
        # Built once: 8 MiB of zeros, about 8 KB gzipped; and a raw-deflate stream cut short.
        self.bomb = gzip.compress(b"\0" * (8 << 20), compresslevel=9)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        stream = deflater.compress(os.urandom(8192) + b"\0" * (4 << 20)) + deflater.flush()
        self.truncated = stream[: len(stream) // 2]

    def people(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            self.serial += 1
            out.append(f"soak-{self.serial}@example.com")
        return out

    def forwarded_for(self) -> str:
        """A client address (text in a header only: nothing is sent there) from IPv6's
        documentation prefix, a new /64 (its own IP budget) almost every time, so the soak
        measures the gateway's work rather than its 429s."""
        return f"2001:db8:{self.rng.randrange(65536):x}:{self.rng.randrange(65536):x}::1"

    async def one(self, session: aiohttp.ClientSession, kind: str) -> None:
        headers = {"X-Forwarded-For": self.forwarded_for()}
        emails: list[str] = []
        data: bytes
        if kind in ("valid", "gzip"):
            emails = self.people(self.rng.randint(1, 3))
            data = json.dumps({"activities": [activity(e) for e in emails]}).encode()
            headers["Content-Type"] = "application/json"
            if kind == "gzip":
                data = gzip.compress(data)
                headers["Content-Encoding"] = "gzip"
        elif kind == "invalid":
            data = self.rng.choice(
                [
                    b"{not json",
                    b'{"activity_id": 5}',
                    b'{"activity_id": "act:cm:unknown", "fields": {"str::email": "a@b.c"}}',
                    b"[]",
                ]
            )
            headers["Content-Type"] = "application/json"
        elif kind == "bomb":
            data = self.bomb
            headers.update({"Content-Type": "application/json", "Content-Encoding": "gzip"})
        elif kind == "truncated_deflate":
            data = self.truncated
            headers.update({"Content-Type": "application/json", "Content-Encoding": "deflate"})
        else:
            await self.slow_upload()
            return
        try:
            async with session.post(self.url, data=data, headers=headers) as resp:
                body = await resp.read()
                self.tally.count(kind, resp.status)
                if resp.status == 202 and emails:
                    entries = json.loads(body).get("activities", [])
                    for email, entry in zip(emails, entries, strict=False):
                        if entry.get("status") == "queued":
                            self.tally.accepted.add(email)
        except (TimeoutError, aiohttp.ClientError) as exc:
            name = type(exc).__name__
            self.tally.errors[f"{kind}:{name}"] = self.tally.errors.get(f"{kind}:{name}", 0) + 1

    async def slow_upload(self) -> None:
        """Headers promising 4 KB, then a byte every 100 ms until the gateway answers."""
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
        except OSError:
            self.tally.count("slow", "connect_error")
            return
        try:
            writer.write(
                f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                "Content-Length: 4096\r\n\r\n{".encode()
            )
            for _ in range(int(READ_TIMEOUT * 10) * 4):  # bounded: 4x the read timeout
                writer.write(b" ")
                await writer.drain()
                try:
                    head = await asyncio.wait_for(reader.read(64), 0.1)
                except TimeoutError:
                    continue
                status = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "closed"
                self.tally.count("slow", status)
                return
            self.tally.count("slow", "never_answered")
        except (ConnectionError, OSError):
            self.tally.count("slow", "reset")
        finally:
            writer.close()

    def next_kind(self) -> str:
        """Every kind once first (so even a short run sends each), then by weight."""
        self.draws += 1
        if self.draws <= len(MIX):
            return MIX[self.draws - 1][0]
        return self.rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]

    async def client(self, session: aiohttp.ClientSession, until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            await self.one(session, self.next_kind())


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int) -> dict[str, int]:
    return {"rss_kib": status_kib(pid, "VmRSS") or 0, "fds": fd_count(pid)}


def verdict(result: dict[str, Any], rss_slack: float = RSS_SLACK) -> list[str]:
    """What went wrong, one line each; empty when the soak passed."""
    problems = []
    for kind, statuses in result["answers"].items():
        for status, n in statuses.items():
            if status.startswith("5") or status == "never_answered":
                problems.append(f"{n} {kind} requests answered {status}")
    if result["lost"]:
        problems.append(f"{result['lost']} accepted activities never reached Ortto")
    if result["received_twice"]:
        problems.append(
            f"{result['received_twice']} activities reached Ortto twice under two keys"
            f" (e.g. {', '.join(result['received_twice_examples'])})"
        )
    if result["accepted"] == 0:
        problems.append("nothing was accepted: the traffic never reached the gateway")
    idle, end = result["idle_before"], result["idle_after"]
    if end["fds"] > idle["fds"] + FD_SLACK:
        problems.append(f"open descriptors {idle['fds']} before, {end['fds']} after")
    plateau = result["plateau_rss_kib"]
    if end["rss_kib"] > plateau * rss_slack:
        problems.append(f"RSS {end['rss_kib']} KiB after, plateau {plateau} KiB")
    return problems


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Procs) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = procs

    def sandbox(self) -> int:
        key_file = self.workdir / "sandbox-key"
        key_file.write_text(API_KEY, encoding="utf-8")
        port = free_port()
        argv = [sys.executable, "-m", "gateway", "sandbox", "--listen", f"{HOST}:{port}"]
        proc = self.procs.start("sandbox", [*argv, "--api-key-file", str(key_file)], child_env({}))
        wait_ready(proc, f"http://{HOST}:{port}/_sandbox/stats")
        return port

    def gateway(self, sandbox_port: int) -> tuple[int, int, int]:
        port, metrics_port = free_port(), free_port()
        env = child_env(
            {
                "GATEWAY_API_KEY": API_KEY,
                "GATEWAY_UPSTREAM_URL": f"http://{HOST}:{sandbox_port}",
                "GATEWAY_ACTIVITIES": ACTIVITY_ID,
                "GATEWAY_LISTEN": f"{HOST}:{port}",
                "GATEWAY_METRICS_LISTEN": f"{HOST}:{metrics_port}",
                "GATEWAY_SPOOL_PATH": str(self.workdir / "spool.sqlite3"),
                "GATEWAY_SPOOL_COMMIT": self.args.spool_commit,
                "GATEWAY_TRUSTED_PROXIES": HOST,
                "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
                "GATEWAY_READ_TIMEOUT": f"{READ_TIMEOUT:g}s",
                "GATEWAY_UPSTREAM_TIMEOUT": "1s",
                "GATEWAY_UPSTREAM_RATE": "50",
                "GATEWAY_LOG_LEVEL": "WARNING",
                "GATEWAY_DRAIN_TIMEOUT": "5s",
            }
        )
        proc = self.procs.start("gateway", [sys.executable, "-m", "gateway", "serve"], env)
        wait_ready(proc, f"http://{HOST}:{port}/readyz")
        return proc.pid, port, metrics_port

    async def run(self) -> dict[str, Any]:
        sandbox_port = self.sandbox()
        pid, port, metrics_port = self.gateway(sandbox_port)
        sandbox_url = f"http://{HOST}:{sandbox_port}"
        metrics_url = f"http://{HOST}:{metrics_port}/metrics"
        tally = Tally()
        traffic = Traffic(port, self.args.seed, tally)
        loop = asyncio.get_running_loop()
        duration = self.args.duration
        samples: list[tuple[float, dict[str, int]]] = []
        # Warm the gateway up with clean traffic, then take its idle figures.
        async with client_session(self.args.connections) as session:
            warm_until = loop.time() + min(3.0, duration / 5)
            await asyncio.gather(*(valid_only(traffic, session, warm_until) for _ in range(4)))
        idle_before = await idle(pid, metrics_url)
        progress(f"soak: idle after warm-up {idle_before}")
        started = loop.time()
        until = started + duration

        async def sampler() -> None:
            while loop.time() < until:
                samples.append((loop.time() - started, sample(pid)))
                await asyncio.sleep(0.5)

        async def faults() -> None:
            i = 0
            while loop.time() < until:
                await asyncio.sleep(2.0)
                post_json(f"{sandbox_url}/_sandbox/faults", FAULTS[i % len(FAULTS)])
                i += 1

        async with client_session(self.args.connections) as session:
            clients = [traffic.client(session, until) for _ in range(self.args.connections)]
            await asyncio.gather(sampler(), faults(), *clients)
        http(f"{sandbox_url}/_sandbox/faults", method="DELETE")
        progress(f"soak: traffic done, {len(tally.accepted)} activities accepted")
        received = await self.delivered(sandbox_url, tally.accepted)
        idle_after = await idle(pid, metrics_url)
        received.poll(sandbox_url)  # anything sent again meanwhile, the spool now empty
        delivered = set(received.times)
        twice = received.twice()
        half = [s["rss_kib"] for t, s in samples if t <= duration / 2]
        return {
            "duration_s": duration,
            "connections": self.args.connections,
            "answers": tally.answers,
            "client_errors": tally.errors,
            "accepted": len(tally.accepted),
            "delivered": len(delivered & tally.accepted),
            "lost": len(tally.accepted - delivered),
            "received_twice": len(twice),
            "received_twice_examples": twice[:5],
            "sandbox_duplicates": received.duplicates,
            "idle_before": idle_before,
            "idle_after": idle_after,
            "plateau_rss_kib": max(half) if half else idle_before["rss_kib"],
            "peak_rss_kib": max((s["rss_kib"] for _, s in samples), default=0),
            "peak_fds": max((s["fds"] for _, s in samples), default=0),
            "samples": [{"t": round(t, 2), **s} for t, s in samples],
        }

    async def delivered(self, sandbox_url: str, accepted: set[str]) -> Received:
        """What the sandbox received once it holds every accepted email (or 120 s passed)."""
        received = Received()
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            received.poll(sandbox_url)
            if accepted <= received.times.keys():
                break
            await asyncio.sleep(0.25)
        return received


def client_session(connections: int) -> aiohttp.ClientSession:
    """The clients' session; closed at the end of each phase, so the gateway's idle
    figures hold no connection of ours."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=connections),
    )


async def valid_only(traffic: Traffic, session: aiohttp.ClientSession, until: float) -> None:
    while asyncio.get_running_loop().time() < until:
        await traffic.one(session, "valid")


def post_json(url: str, payload: dict[str, Any]) -> int:
    """POST a JSON object on loopback; the status (a fault an older sandbox does not
    know is refused with a 400 and simply not applied)."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"the soak only talks to loopback, not {url}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(  # noqa: S310 - loopback, checked above
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with opener.open(req, timeout=5.0) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def spool_depth(metrics_url: str) -> float | None:
    status, body = http(metrics_url)
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith("ortto_gateway_spool_depth "):
            return float(line.split()[1])
    return None


async def idle(pid: int, metrics_url: str) -> dict[str, int]:
    """The gateway's figures once its spool is empty (or 60 s passed)."""
    deadline = time.monotonic() + 60.0
    while spool_depth(metrics_url) != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return sample(pid)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def render(result: dict[str, Any], problems: list[str]) -> str:
    lines = [
        f"soak: {result['duration_s']:g} s, {result['connections']} connections",
        f"answers: {json.dumps(result['answers'], sort_keys=True)}",
        f"client errors: {json.dumps(result['client_errors'], sort_keys=True)}",
        f"accepted {result['accepted']}, delivered {result['delivered']}, lost {result['lost']}, "
        f"received twice {result['received_twice']}, "
        f"sandbox duplicates (merged) {result['sandbox_duplicates']}",
        f"idle before: RSS {result['idle_before']['rss_kib']} KiB, "
        f"{result['idle_before']['fds']} fds; after: RSS {result['idle_after']['rss_kib']} KiB, "
        f"{result['idle_after']['fds']} fds",
        f"plateau RSS (peak of the first half) {result['plateau_rss_kib']} KiB, "
        f"peak {result['peak_rss_kib']} KiB; peak fds {result['peak_fds']}",
        "verdict: " + ("pass" if not problems else "FAIL: " + "; ".join(problems)),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic")
    parser.add_argument("--connections", type=int, default=24, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--spool-commit", default="loop", choices=["auto", "loop", "thread"])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument(
        "--rss-slack",
        type=float,
        default=RSS_SLACK,
        help="idle RSS at the end may be this many times the plateau (%(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ortto-gateway-soak-") as tmp:
        workdir = Path(tmp)
        procs = Procs(workdir)
        try:
            result = asyncio.run(Soak(args, workdir, procs).run())
        finally:
            procs.stop_all()
    problems = verdict(result, args.rss_slack)
    print(render(result, problems))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
