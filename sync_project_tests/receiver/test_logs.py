"""The receiver's JSON log lines: the per-delivery line's direct path and its ordinary fallback."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from sync_project.receiver.logs import DeliveryLog, _direct_queue, configure_json_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_delivery_line_is_one_json_object_like_any_other_record(restore_logging: None) -> None:
    stream = io.StringIO()
    listener = configure_json_logging(logging.INFO, stream)
    delivery_log = DeliveryLog(logging.getLogger("sync_project.receiver"))
    assert _direct_queue(logging.getLogger("sync_project.receiver")) is not None  # no LogRecord made
    try:
        delivery_log(logging.INFO, {"provider": "acme", "status": 202, "event_keys": ["e1"]})
        delivery_log(logging.DEBUG, {"provider": "acme", "status": 202})  # below the level: nothing
        delivery_log(logging.WARNING, {"provider": "acme", "status": 503, "reason": "QueueFullError"})
        logging.getLogger("sync_project.receiver").info("an ordinary record")
    finally:
        listener.stop()
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.pop("ts").endswith("+00:00")
    assert first == {
        "level": "info",
        "logger": "sync_project.receiver",
        "pid": os.getpid(),
        "provider": "acme",
        "status": 202,
        "event_keys": ["e1"],
    }
    assert (second["level"], second["status"], second["reason"]) == ("warning", 503, "QueueFullError")
    assert (third["level"], third["message"], third["pid"]) == ("info", "an ordinary record", os.getpid())


def test_with_another_handler_a_delivery_line_is_an_ordinary_record(
    restore_logging: None, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    listener = configure_json_logging(logging.INFO, stream)
    logging.getLogger().addHandler(caplog.handler)  # what an embedding app or a test adds
    assert _direct_queue(logging.getLogger("sync_project.receiver")) is None
    try:
        DeliveryLog(logging.getLogger("sync_project.receiver"))(logging.INFO, {"provider": "acme", "status": 202})
    finally:
        listener.stop()
    (record,) = [r for r in caplog.records if r.name == "sync_project.receiver"]
    assert json.loads(record.getMessage()) == record.fields == {"provider": "acme", "status": 202}  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["provider"] == "acme"  # and the JSON output has it too
