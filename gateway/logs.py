"""Structured logs: one JSON object a line, emails only as a short hash.

A sink: it imports no gateway module. Callers pass structured data with
`extra={"data": {...}}`; the formatter merges it into the line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

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


# A field path in a log line: at most this long (a browser chooses unknown keys' names).
MAX_LOGGED_FIELD = 80


def log_field(path: str) -> str:
    """A field path fit for a log line: cut short, and hidden if it could hold an email
    (a browser chooses the names of unknown keys, and could send one as a key)."""
    if "@" in path:
        return "<redacted>"
    return path[:MAX_LOGGED_FIELD]


def _error_text(record: logging.LogRecord) -> str | None:
    # The exception type and message only: tracebacks can carry local values.
    if record.exc_info and record.exc_info[0] is not None:
        return f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    error = getattr(record, "error_text", None)
    return error if isinstance(error, str) else None


class ClientErrorFilter(logging.Filter):
    """For `aiohttp.server`: a request its parser refused, without what the client sent.

    aiohttp logs such a request at ERROR as "Error handling request from <peer>" with the
    exception, whose message quotes the raw bytes (a body after its length, so an email;
    a header). Any client can cause one at will, and logs hold neither emails nor client
    addresses: the line becomes an INFO one with the error's type and status only. Other
    aiohttp.server lines keep their exception but lose the peer address.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed HTTP request refused"
            record.args = None
            record.exc_info = record.exc_text = None
            record.data = {"error_type": type(exc).__name__, "status": exc.code}
            level = min(record.levelno, logging.INFO)  # aiohttp logs some at DEBUG already
            record.levelno, record.levelname = level, logging.getLevelName(level)
            return logging.getLogger(record.name).isEnabledFor(level)
        if isinstance(record.msg, str) and record.msg.endswith(" from %s"):
            record.msg = record.msg.removesuffix(" from %s")
            record.args = None
        return True


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread; only the message is rendered on the loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.error_text = _error_text(record)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return record


class _Line:
    """A structured line queued without a `LogRecord`: it has just what the handler
    and `JsonFormatter` read. Building a LogRecord (caller lookup, thread and process
    names, the handler chain) cost the event loop about 20 µs a request (profiled)."""

    __slots__ = ("created", "data", "levelname", "levelno", "msecs", "msg", "name")
    exc_info = None
    error_text = None

    def __init__(self, name: str, level: int, msg: str, data: dict[str, Any]) -> None:
        self.created = time.time()
        self.msecs = (self.created % 1) * 1000
        self.name = name
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.msg = msg
        self.data = data

    def getMessage(self) -> str:  # the LogRecord interface
        return self.msg


def log_line(logger: logging.Logger, level: int, msg: str, data: dict[str, Any]) -> None:
    """`logger.log(level, msg, extra={"data": data})`, cheaper: for a line per request.

    With `setup_logging` the line goes straight to the writer thread's queue (the logger's
    level still decides; its handlers and filters are the root's JSON writer); otherwise
    it takes the ordinary path.
    """
    if not logger.isEnabledFor(level):
        return
    if _records is None:
        logger.log(level, msg, extra={"data": data})
        return
    _records.put(_Line(logger.name, level, msg, data))  # type: ignore[arg-type]


# The writer thread wakes at most this often and writes what came meanwhile in one go.
BATCH_INTERVAL = 0.01
BATCH_MAX = 1000


class _BatchWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """Formats records as they come and writes them in one call per batch."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:  # logging must never raise
            self.handleError(record)

    def write_pending(self) -> None:
        """Write and flush what `emit` collected."""
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing to do
            self.stream.write(text)
            self.flush()


class _BatchListener(logging.handlers.QueueListener):
    """A QueueListener that drains the queue in batches: one wake-up (one trip through
    the GIL, which the event loop keeps busy) and one write per batch, not per line."""

    def _monitor(self) -> None:
        q: Any = self.queue  # a SimpleQueue (setup_logging)
        while True:
            batch = [self.dequeue(True)]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for record in batch:
                if record is self._sentinel:  # type: ignore[attr-defined]
                    stop = True
                else:
                    self.handle(record)
            for handler in self.handlers:
                if isinstance(handler, _BatchWriter):
                    handler.write_pending()
            if stop:
                return
            time.sleep(BATCH_INTERVAL)


_listener: logging.handlers.QueueListener | None = None
_records: queue.SimpleQueue[logging.LogRecord] | None = None


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger to one JSON writer on stderr (or `stream`).

    Formatting and writing happen on a background thread (a `QueueListener` that wakes
    every BATCH_INTERVAL at most and writes a batch at once), so a log line costs the
    event loop a queue put, not a JSON encode and a write.
    """
    global _listener, _records
    stop_logging()
    handler = _BatchWriter(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = _BatchListener(records, handler)
    _listener.start()
    _records = records
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Enqueue(records))
    root.setLevel(level)
    # aiohttp's own access log is replaced by the gateway's request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    for old_filter in list(server_log.filters):
        if isinstance(old_filter, ClientErrorFilter):
            server_log.removeFilter(old_filter)
    server_log.addFilter(ClientErrorFilter())


def flush_logs() -> None:
    """Write out every record queued so far (the writer thread keeps running)."""
    if _listener is not None:
        _listener.stop()
        _listener.start()


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener, _records
    _records = None
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)
