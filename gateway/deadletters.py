"""Dead letters across a gateway's spool files: list, replay, purge (the CLI and the console).

Each spool file is opened non-exclusively, as a tool that only reads or replays does: a
running gateway notices the change through SQLite's `PRAGMA data_version`, so this works
while it serves (one process or `--workers`). Ids are per file: acting on ids needs the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.spool import DeadLetter, Spool
from gateway.upstream import redact

# The writer runs in its own thread: a console in the serving process never blocks its loop.
COMMIT_ON = "thread"


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter as shown: its error redacted, with the spool file it lives in."""

    spool: str
    letter: DeadLetter
    error: str

    def row(self) -> dict[str, Any]:
        """The plain fields every listing shows (never the payload)."""
        return {
            "id": self.letter.id,
            "activity_id": self.letter.activity_id,
            "person": self.letter.person_hash,
            # Stored as Ortto wrote it by earlier versions: shown bounded, on one line, masked.
            "error": self.error,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.letter.failed_at)),
        }


async def list_letters(
    files: Sequence[str],
    *,
    limit: int = 100,
    error_contains: str | None = None,
    secrets: Sequence[str] = (),
) -> list[Letter]:
    """The newest dead letters of each file (at most `limit` per file), errors redacted."""
    found: list[Letter] = []
    for path in files:
        async with _opened(path) as spool:
            letters = await spool.list_dead_letters(limit=limit, error_contains=error_contains)
        found += [Letter(path, letter, redact(letter.error, secrets)) for letter in letters]
    return found


async def replay(
    files: Sequence[str], *, ids: Sequence[int] | None = None, error_contains: str | None = None
) -> dict[str, int]:
    """Queue matching dead letters for delivery again; how many, per file."""
    done: dict[str, int] = {}
    for path in files:
        async with _opened(path) as spool:
            done[path] = await spool.replay_dead_letters(ids=ids, error_contains=error_contains)
    return done


async def purge(
    files: Sequence[str], *, ids: Sequence[int] | None = None, error_contains: str | None = None
) -> dict[str, int]:
    """Delete matching dead letters (all when no filter is given); how many, per file."""
    done: dict[str, int] = {}
    for path in files:
        async with _opened(path) as spool:
            done[path] = await spool.purge_dead_letters(ids=ids, error_contains=error_contains)
    return done


def _opened(path: str) -> Spool:
    return Spool(path, commit_on=COMMIT_ON)
