"""Running the sandbox over real HTTP: in a background thread (tests, ``make run``) or in the foreground (CLI).

We bind and listen on the socket ourselves and hand it to uvicorn, so ``port=0`` yields a free port
that is known (and connectable) before uvicorn runs, with no race between choosing a port and binding it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from sync_project.sandbox.app import create_app
from sync_project.sandbox.service import Sandbox, SandboxConfig

GRACEFUL_SHUTDOWN_S = 3


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


class SandboxServer:
    """The sandbox API on a background thread: ``base_url = server.start()``, later ``server.stop()``.

    Also a context manager. ``port=0`` (the default) picks a free port.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.sandbox = Sandbox(config)
        self._host, self._port, self._log_level = host, port, log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    @property
    def admin_token(self) -> str:
        return self.sandbox.admin_token

    @property
    def webhook_secret(self) -> str:
        return self.sandbox.webhook_secret

    def start(self, timeout_s: float = 10.0) -> str:
        if self._thread is not None:
            return self.base_url
        sock = bind_socket(self._host, self._port)
        self.base_url = url_of(sock)
        config = uvicorn.Config(
            create_app(self.sandbox),
            log_level=self._log_level,
            lifespan="off",
            access_log=False,
            # A request still waiting (say, on /admin/flush) must not hold the shutdown up.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="sandbox-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                self._server, self._thread = None, None
                raise RuntimeError(f"sandbox server did not start on {self.base_url}")
            time.sleep(0.01)
        self.sandbox.start()
        return self.base_url

    def stop(self, timeout_s: float = 10.0) -> None:
        self.sandbox.stop()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
        self._server, self._thread = None, None

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    config: SandboxConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    log_level: str = "info",
    on_ready: Callable[[Sandbox, str], None] | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (uvicorn handles both), then stop the workers."""
    sandbox = Sandbox(config)
    sock = bind_socket(host, port)
    base_url = url_of(sock)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(sandbox), log_level=log_level, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
        )
    )
    sandbox.start()
    try:
        if on_ready is not None:
            on_ready(sandbox, base_url)
        server.run(sockets=[sock])
    finally:
        sandbox.stop()
        sock.close()
