"""Serve an ASGI app with uvicorn on a background thread: for tests, benchmarks and the sandbox.

We bind and listen on the socket ourselves and hand it to uvicorn, so ``port=0`` yields a free port
that is known (and connectable) before uvicorn runs, with no race between choosing a port and binding it.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Literal

import uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening now (not when uvicorn gets to it) means clients told the URL are queued in
        # the backlog instead of refused while the server starts.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """A real HTTP server on loopback; ``port=0`` picks a free port (read it back from ``url``)."""

    def __init__(
        self,
        app: Any,  # an ASGI application (uvicorn's type of one is a union of protocols)
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        lifespan: Literal["auto", "on", "off"] = "auto",
        graceful_shutdown_s: float | None = None,
        name: str = "http-server",
    ) -> None:
        self._socket = bind_socket(host, port)
        self.url = url_of(self._socket)
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan=lifespan,
            access_log=False,
            # uvicorn annotates int but waits with asyncio.wait_for, which takes a fraction too.
            timeout_graceful_shutdown=graceful_shutdown_s,  # type: ignore[arg-type]
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=name, daemon=True
        )

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                self._socket.close()
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
