"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, ``request_id``, then the
record's own fields, from ``extra=``), so that a log pipeline indexes every line by its request.

The request id lives in a context variable (``REQUEST_ID``), set per request by ``orchestrator/request_id.py``:
every line logged while a request is handled carries it, from whichever module, without passing it along.
Tasks started during the request (``asyncio.gather``, single-flight) inherit it with the context.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

from orchestrator import telemetry

REQUEST_ID: ContextVar[str | None] = ContextVar("recserve_request_id", default=None)

# Attributes every LogRecord has: the rest came from ``extra=`` and are written as fields.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's own loggers keep their handlers (uvicorn configures them before the app exists): same format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        trace_id = telemetry.current_trace_id()
        if trace_id is not None:
            line["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _Ours(logging.StreamHandler):
    """The handler ``configure`` installs (told apart from the ones it must leave alone: pytest's, a host's).
    Without a stream of its own it writes to whatever ``sys.stderr`` is at the time (a test runner swaps it)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream or sys.stderr)
        self.follows_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follows_stderr:
            self.stream = sys.stderr
        super().emit(record)


def configure(log_format: str, level: str, stream: Any = None) -> logging.Handler:
    """Send the service's log lines to ``stream`` (stderr) in ``log_format``; idempotent (one handler on the root
    logger, replaced on a second call). Called at server start, never at import."""
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    # Ours from an earlier call, and a launcher's plain stderr handler (logging.basicConfig's: same lines twice
    # otherwise). Subclasses (pytest's capture, a host's own) stay.
    for handler in [h for h in root.handlers if isinstance(h, _Ours) or type(h) is logging.StreamHandler]:
        if isinstance(h := handler, _Ours) or getattr(h, "stream", None) is sys.stderr:
            root.removeHandler(h)
    handler = _Ours(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    logging.getLogger("orchestrator").setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        for uvicorn_handler in logging.getLogger(name).handlers:
            uvicorn_handler.setFormatter(formatter)
    return handler
