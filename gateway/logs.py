"""Structured logs: one JSON object a line, emails only as a short hash.

A sink: it imports no gateway module. Callers pass structured data with
`extra={"data": {...}}`; the formatter merges it into the line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson

_RESERVED = {"ts", "level", "logger", "msg"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with the record's `data` merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            for key, value in data.items():
                line[key if key not in _RESERVED else f"data_{key}"] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and message only: tracebacks can carry local values.
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger to one JSON handler on stderr (or `stream`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log is replaced by the gateway's request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
