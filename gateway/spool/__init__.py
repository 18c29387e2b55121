"""The spool: accepted activities kept durably (SQLite) until delivery hands them to Ortto.

One file per draining process holds two tables (`schema`): the queue and the dead
letters. The package's modules, one job each:

- `queue`: `Spool`, the bounded FIFO with in-memory leases that the relay puts into and
  delivery leases from; `writer` runs its operations in group commits.
- `dead_letters`: what Ortto refused, to list, replay or purge.
- `schema`: the tables and the SQL that moves whole queues (used by `adopt` too).
- `lock`: the `flock` that makes a file one process's to drain.
- `commit`: where a group commits (the event loop or a thread) and the fsync probe that
  picks one.
- `adopt`: spool files no process drains any more, moved into one that is drained.
- `files`: which files those are: the spool path, and one beside it per worker.
"""

from gateway.spool.commit import fsync_dir, fsync_times
from gateway.spool.dead_letters import DeadLetter
from gateway.spool.errors import (
    SpoolClosed,
    SpoolError,
    SpoolFull,
    SpoolInUse,
    SpoolOpenError,
)
from gateway.spool.items import QueuedActivity, SpooledItem, SpoolStats
from gateway.spool.lock import claim, in_use
from gateway.spool.queue import Spool
from gateway.spool.schema import MEMORY, ensure_schema

__all__ = [
    "MEMORY",
    "DeadLetter",
    "QueuedActivity",
    "Spool",
    "SpoolClosed",
    "SpoolError",
    "SpoolFull",
    "SpoolInUse",
    "SpoolOpenError",
    "SpoolStats",
    "SpooledItem",
    "claim",
    "ensure_schema",
    "fsync_dir",
    "fsync_times",
    "in_use",
]
