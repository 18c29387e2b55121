"""How a command runs: the exit codes it may end with, and the event loop it runs on."""

from __future__ import annotations

import asyncio
from typing import Any

EXIT_CONFIG = 2
# The spool file is held by another running gateway: kept apart from EXIT_CONFIG (as
# documented) because it is no bad setting: it clears when that gateway stops.
EXIT_IN_USE = 3
# The spool cannot be opened (full or read-only disk, a path that cannot be a file): as a
# bad setting, the operator's to fix, and restarting will not help until then.
EXIT_SPOOL = 2


def run_loop(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop; its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    else:
        return uvloop.run(coro)
