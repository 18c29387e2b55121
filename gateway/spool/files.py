"""The spool files on disk: `GATEWAY_SPOOL_PATH`, and one beside it per `--workers` worker."""

from __future__ import annotations

import re
from pathlib import Path


def worker_spool_path(spool_path: str, index: int) -> str:
    """The spool file of worker `index`: `data/spool.sqlite3` -> `data/spool.w1.sqlite3`."""
    path = Path(spool_path)
    return str(path.with_name(f"{path.stem}.w{index}{path.suffix}"))


def drained_spool_files(spool_path: str, workers: int) -> list[str]:
    """The spool files `serve --workers <workers>` drains (the first takes in orphans)."""
    if workers == 1:
        return [spool_path]
    return [worker_spool_path(spool_path, i) for i in range(workers)]


def spool_files(spool_path: str) -> list[str]:
    """The spool file and every worker's, those that exist (for the dead-letters command)."""
    path = Path(spool_path)
    found = [str(path)] if path.exists() else []
    # Exactly `<stem>.w<N><suffix>`: a glob alone would also take SQLite's `-wal` and
    # `-shm` files beside a worker's spool when the path has no suffix.
    name = re.compile(re.escape(path.stem) + r"\.w[0-9]+" + re.escape(path.suffix))
    found += sorted(
        str(p) for p in path.parent.glob(f"{path.stem}.w*{path.suffix}") if name.fullmatch(p.name)
    )
    return found
