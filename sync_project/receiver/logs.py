"""JSON log lines for the receiver process: one object per line, easy to ship and to query.

Records are handed to a background thread (``QueueHandler``) and written there: a write to
stderr or a file releases the GIL, and under load taking it back from the busy group-commit
thread costs the event loop milliseconds per delivery line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from datetime import datetime, timezone
from typing import Any, TextIO


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; a record's ``fields`` (the delivery line) are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_json_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.handlers.QueueListener:
    """Send every log record of this process (ours and uvicorn's) to ``stream`` (stderr) as JSON lines.

    Returns the started listener; stop it before exiting so the last lines are written.
    """
    output = logging.StreamHandler(stream or sys.stderr)
    output.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, output, respect_handler_level=False)
    root = logging.getLogger()
    root.handlers[:] = [_DeferredHandler(records)]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))  # one line per migration step
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    listener.start()
    return listener


class _DeferredHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: ``fields`` stays a dict for :class:`JsonFormatter`.

    The stock ``QueueHandler.prepare`` formats the message eagerly and drops ``exc_info``; here the
    listener's formatter does all the work, off the event loop.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record
