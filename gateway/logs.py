"""Structured logs: one JSON object a line, emails only as a short hash.

A sink: it imports no gateway module. Callers pass structured data with
`extra={"data": {...}}`; the formatter merges it into the line.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
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
        error = _error_text(record)
        if error is not None:
            line["error"] = error
        return orjson.dumps(line, default=str).decode()


def _error_text(record: logging.LogRecord) -> str | None:
    # The exception type and message only: tracebacks can carry local values.
    if record.exc_info and record.exc_info[0] is not None:
        return f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    error = getattr(record, "error_text", None)
    return error if isinstance(error, str) else None


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread; only the message is rendered on the loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.error_text = _error_text(record)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return record


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger to one JSON writer on stderr (or `stream`).

    Formatting and writing happen on a background thread (a `QueueListener`), so a
    log line costs the event loop a queue put, not a JSON encode and a write.
    """
    global _listener
    stop_logging()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Enqueue(records))
    root.setLevel(level)
    # aiohttp's own access log is replaced by the gateway's request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def flush_logs() -> None:
    """Write out every record queued so far (the writer thread keeps running)."""
    if _listener is not None:
        _listener.stop()
        _listener.start()


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)
