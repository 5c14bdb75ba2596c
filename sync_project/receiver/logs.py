"""JSON log lines for the receiver process: one object per line, easy to ship and to query.

Records are handed to a background thread (``QueueHandler``) and written there: a write to
stderr or a file releases the GIL, and under load taking it back from the busy group-commit
thread costs the event loop milliseconds per delivery line.

The per-delivery line skips the ``logging`` machinery when nothing but this JSON output would see
it (:class:`DeliveryLog`): the event loop puts the line's fields on the queue (a timestamp and a
tuple), and the writer thread renders them. A ``LogRecord`` (the caller's frame looked up, thread
and process names, filters, handler locks) cost the event loop about 15 % of a delivery's CPU.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

#: One encoder for every line (``json.dumps`` with options builds a new one per call); a value
#: JSON has no form for is written as its ``str``.
_LINE_JSON = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; a record's ``fields`` (the delivery line) are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # Which process: with --workers N, N of them write to one stream.
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _LINE_JSON.encode(line)


def configure_json_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.handlers.QueueListener:
    """Send every log record of this process (ours and uvicorn's) to ``stream`` (stderr) as JSON lines.

    Returns the started listener; stop it before exiting so the last lines are written.
    """
    output = logging.StreamHandler(stream or sys.stderr)
    output.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord | _Line] = queue.SimpleQueue()
    listener = _JsonListener(records, output)
    root = logging.getLogger()
    root.handlers[:] = [_DeferredHandler(records)]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))  # one line per migration step
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    listener.start()
    return listener


#: How long the writer thread lets lines gather once it has written all it had (see ``dequeue``).
GATHER_S = 0.01


class _DeferredHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: ``fields`` stays a dict for :class:`JsonFormatter`.

    The stock ``QueueHandler.prepare`` formats the message eagerly and drops ``exc_info``; here the
    listener's formatter does all the work, off the event loop.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Line(tuple[float, int, str, dict[str, Any]]):
    """A delivery line on its way to the writer thread: (created, level, logger name, fields)."""

    __slots__ = ()


class _JsonListener(logging.handlers.QueueListener):
    """The writer thread: renders records with the handler's formatter, and :class:`_Line` items
    as the same JSON object :class:`JsonFormatter` would make of their record."""

    def __init__(self, records: queue.SimpleQueue[Any], output: logging.StreamHandler[TextIO]) -> None:
        super().__init__(records, output, respect_handler_level=False)
        self._records = records
        self._output = output

    def dequeue(self, block: bool) -> Any:
        """The next item; when there is none yet, flush what was written and let lines gather.

        Under load a line comes every few hundred microseconds: waking this thread for each one
        (and flushing each one, a system call) took the GIL from the event loop thousands of times
        a second. Waiting :data:`GATHER_S` once the queue is empty makes that a wake-up and a write
        per batch of lines, and delays a line by at most that.
        """
        if block and self._records.empty():
            self._flush()
            time.sleep(GATHER_S)
        return self._records.get(block)

    def stop(self) -> None:
        super().stop()
        self._flush()  # the lines handled after the last wait

    def _flush(self) -> None:
        output = self._output
        with output.lock or _NO_LOCK:
            try:
                output.flush()
            except Exception:  # noqa: BLE001 - as logging does: a broken stream never breaks the receiver
                output.handleError(logging.makeLogRecord({"msg": "flush failed"}))

    def handle(self, record: Any) -> None:
        if not isinstance(record, _Line):
            super().handle(record)
            return
        created, level, name, fields = record
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": logging.getLevelName(level).lower(),
            "logger": name,
            "pid": os.getpid(),  # not cached at import: a forked process has its own
            **fields,
        }
        output = self._output
        with output.lock or _NO_LOCK:
            try:
                output.stream.write(_LINE_JSON.encode(line) + output.terminator)
            except Exception:  # noqa: BLE001 - as logging does: a broken stream never breaks the receiver
                output.handleError(logging.makeLogRecord({"msg": line}))


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


class DeliveryLog:
    """``delivery_log(level, fields)``: one JSON line for a delivery, as cheaply as it can be.

    When JSON logging is configured (:func:`configure_json_logging`) and nothing else would see the
    record (no handler or filter of its own on the way, as in the receiver process), the fields go
    straight to the writer thread's queue. Otherwise (tests capturing logs, an embedding app with
    its own handlers) it is an ordinary record: ``fields`` in ``extra``, the JSON as its message.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def __call__(self, level: int, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        records = _direct_queue(logger)
        if records is None:
            logger.log(level, "%s", _JsonText(fields), extra={"fields": fields})
            return
        records.put_nowait(_Line((time.time(), level, logger.name, fields)))


class _JsonText:
    """A delivery's fields, serialised only if a handler renders the plain message."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields)


def _direct_queue(logger: logging.Logger) -> queue.SimpleQueue[Any] | None:
    """The JSON writer's queue if the root's deferred handler is the only one ``logger``'s
    records would reach and no filter is on the way; else None."""
    root = logging.root
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    if type(handler) is not _DeferredHandler or handler.filters:
        return None
    current: logging.Logger | None = logger
    while current is not None and current is not root:
        if current.handlers or current.filters or not current.propagate:
            return None
        current = current.parent
    return handler.queue  # type: ignore[return-value]
