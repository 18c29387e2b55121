"""Memory per key of the in-process limiter store (`MemoryStore`), in a fresh process.

Fills a store with `--keys` keys shaped like the gateway's person keys
(`p|act:cm:logged-in|e:user<i>@example.com`), one accepted event (one timestamp) per key,
through the public `acquire_many`, and prints one JSON line: the resident set growth
(VmRSS before and after, after a `gc.collect()`) divided by the keys. That is what the
operating system sees, allocator slack included. `--tracemalloc` adds the bytes Python
allocated (about 6x slower; off by default).

    python -m tests.bench.limiter_mem --keys 1000000 [--tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import tracemalloc

from gateway.limits import MemoryStore
from gateway.limits.base import Rule

CHUNK = 10_000
COUNT, WINDOW = 10, 86400.0  # the default person limit, 10/1d


def vm_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def fill(store: MemoryStore, keys: int) -> float:
    now = time.time()
    started = time.perf_counter()
    for first in range(0, keys, CHUNK):
        checks = [
            [Rule(f"p|act:cm:logged-in|e:user{i}@example.com", COUNT, WINDOW)]
            for i in range(first, min(keys, first + CHUNK))
        ]
        decisions = await store.acquire_many(checks, now)
        if not all(d.allowed for d in decisions):
            raise RuntimeError("a first event for a new key was refused")
    return time.perf_counter() - started


def measure(keys: int, use_tracemalloc: bool) -> dict[str, object]:
    evicted = 0

    def on_evict(n: int) -> None:
        nonlocal evicted
        evicted += n

    if use_tracemalloc:
        tracemalloc.start()
    gc.collect()
    rss_before = vm_rss_bytes()
    traced_before = tracemalloc.get_traced_memory()[0] if use_tracemalloc else 0
    store = MemoryStore(max_keys=keys, on_evict=on_evict)
    seconds = asyncio.run(fill(store, keys))
    gc.collect()
    rss_after = vm_rss_bytes()
    result: dict[str, object] = {
        "keys": store.key_count(),
        "evicted": evicted,
        "timestamps_per_key": 1,
        "rss_delta_bytes": rss_after - rss_before,
        "rss_bytes_per_key": round((rss_after - rss_before) / keys, 1),
        "fill_seconds": round(seconds, 2),
        "acquires_per_s": round(keys / seconds),
    }
    if use_tracemalloc:
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        result["traced_bytes_per_key"] = round(traced / keys, 1)
        result["note"] = "fill_seconds under tracemalloc"
    if store.key_count() != keys or evicted:
        raise RuntimeError(f"expected {keys} keys and no eviction: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.keys, args.tracemalloc)))


if __name__ == "__main__":
    main()
