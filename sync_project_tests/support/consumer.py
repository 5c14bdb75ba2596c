"""The customer's app, served for real on loopback: it records every webhook it receives and
answers what the test tells it to (a status sequence, or hanging until released)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync_project.core.standard_webhooks import verify
from sync_project.serving import BackgroundServer


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    #: What ``on_receive`` returned when the request came in (e.g. the store's state then).
    observed: Any = None

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def verified_by(self, secret: str) -> str:
        """The webhook-id, if ``secret`` signed this request (raises SignatureError otherwise)."""
        return verify(self.headers, self.body, [secret], now=time.time())


@dataclass
class Consumer:
    #: Statuses to answer, in order; once used up, ``default_status``.
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    #: Hold every request until :meth:`release` (an endpoint that accepts and never answers).
    hang: bool = False
    #: Called (in a worker thread) as each request arrives; its result is kept in ``observed``.
    on_receive: Callable[[dict[str, str], bytes], Any] | None = None
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._released.set()

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            body = await request.body()
            headers = {k.lower(): v for k, v in request.headers.items()}
            observed = None
            if self.on_receive is not None:
                observed = await asyncio.to_thread(self.on_receive, headers, body)
            with self._lock:
                self.received.append(Received(headers, body, observed))
                status = self.statuses.pop(0) if self.statuses else self.default_status
            if self.hang:
                while not self._released.is_set():
                    await asyncio.sleep(0.02)
            return JSONResponse({"ok": 200 <= status < 300}, status_code=status)

        return Starlette(routes=[Route("/hook", receive, methods=["POST"])])


@contextmanager
def serve(consumer: Consumer) -> Iterator[str]:
    """Serve ``consumer``; yields its webhook URL."""
    server = BackgroundServer(consumer.app()).start()
    try:
        yield f"{server.url}/hook"
    finally:
        consumer.release()
        server.stop()


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused, as with an app that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
