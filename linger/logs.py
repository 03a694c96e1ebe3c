"""Logging: text or JSON lines, with the id of the request being served.

The request id lives in a context variable set by the HTTP layer for the duration of a
request, so that anything logged while serving it (a database error deep in the store,
a warning of the broker) carries it without being passed the request.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID: ContextVar[str | None] = ContextVar("linger_request_id", default=None)
# Fields that a log call may add (``extra=``), shown by the JSON format.
REQUEST_FIELDS = ("method", "path", "status", "duration", "client")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"


class _RequestId(logging.Filter):
    """Stamps every record with the current request id (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        record.request_id = request_id
        record.request_suffix = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the request
    id and request fields when there are some, and the exception's traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as ``text`` or ``json`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
