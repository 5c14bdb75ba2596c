"""Real loopback parts for the sandbox tests: a running sandbox and a webhook receiver that records.

The receiver is deliberately not the project's receiver: it only records what arrives (and can be
told to fail), so these tests pin down what the sandbox sends, independently of how it is consumed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sync_project.core.provider import WebhookRequest
from sync_project.sandbox import RetryPolicy, SandboxAdmin, SandboxConfig, SandboxServer

#: Retries fast enough for tests, slow enough to be real backoff.
FAST_RETRY = RetryPolicy(max_attempts=8, initial_backoff_s=0.05, max_backoff_s=0.3, timeout_s=5)


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    received_at: datetime

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def as_request(self, url: str = "http://127.0.0.1/webhooks/sandbox") -> WebhookRequest:
        return WebhookRequest("POST", url, self.headers, self.body, self.received_at)


class Receiver:
    """A loopback HTTP server recording every POST; ``fail_next`` makes it answer errors first."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._failures: list[int] = []
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/sandbox"

    def start(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._cond:
                    status = receiver._failures.pop(0) if receiver._failures else 204
                    if status < 300:
                        headers = {name.lower(): value for name, value in self.headers.items()}
                        receiver.received.append(Received(headers, body, datetime.now(timezone.utc)))
                    receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._cond:
            self._failures.extend([status] * count)

    def ids(self) -> list[str]:
        with self._cond:
            return [r.headers["webhook-id"] for r in self.received]


def free_port() -> int:
    """A port nothing listens on right now (for a receiver that is 'down', started later)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Synchronise with background work; failing here means it never happened, not that it was slow."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


SandboxFactory = Callable[..., tuple[SandboxServer, SandboxAdmin]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture
def make_sandbox() -> Iterator[SandboxFactory]:
    """Start sandboxes (``make_sandbox(**SandboxConfig fields)``); all are stopped afterwards."""
    started: list[tuple[SandboxServer, SandboxAdmin]] = []

    def make(**config: Any) -> tuple[SandboxServer, SandboxAdmin]:
        config.setdefault("retry", FAST_RETRY)
        config.setdefault("rate_limit", {"enabled": False})
        server = SandboxServer(SandboxConfig.model_validate(config))
        server.start()
        admin = SandboxAdmin(server.base_url, server.admin_token)
        started.append((server, admin))
        return server, admin

    yield make
    for server, admin in started:
        admin.close()
        server.stop()
