"""How a command runs: the exit codes it may end with, the event loop it runs on, and the
garbage collector's settings while it serves."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

EXIT_CONFIG = 2
# The spool file is held by another running gateway: kept apart from EXIT_CONFIG (as
# documented) because it is no bad setting: it clears when that gateway stops.
EXIT_IN_USE = 3
# The spool cannot be opened (full or read-only disk, a path that cannot be a file): as a
# bad setting, the operator's to fix, and restarting will not help until then.
EXIT_SPOOL = 2

# The collector's young-generation threshold while serving (CPython's default is 700).
# A request allocates a few hundred containers and frees them by reference counting, so
# at 700 a young collection ran every ~20 requests under wrk: 1,315 of them and 0.45 s of
# CPU in ~24,000 requests at full load. At 7,000: 10 in the same run (docs/benchmarks.md).
GC_YOUNG_THRESHOLD = 7000


def tune_gc() -> None:
    """Once a server is up: freeze what start-up built (imports, settings, the app), so
    full collections no longer walk it, and collect the young generation less often.

    Measured at full load (docs/benchmarks.md): the collector's CPU (young and full
    collections) went from 0.83 s to 0.015 s over ~24,000 requests, and p99 latency
    from 37 to 19 ms (full collections walked some 45,000 start-up objects each time)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_loop(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop; its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    else:
        return uvloop.run(coro)
