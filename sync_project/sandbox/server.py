"""Running the sandbox over real HTTP: in a background thread (tests) or in the foreground (CLI)."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn

from sync_project.sandbox.app import create_app
from sync_project.sandbox.service import Sandbox, SandboxConfig
from sync_project.serving import BackgroundServer, bind_socket, url_of

GRACEFUL_SHUTDOWN_S = 3


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
        self._server: BackgroundServer | None = None
        self.base_url = ""

    @property
    def admin_token(self) -> str:
        return self.sandbox.admin_token

    @property
    def webhook_secret(self) -> str:
        return self.sandbox.webhook_secret

    def start(self, timeout_s: float = 10.0) -> str:
        if self._server is not None:
            return self.base_url
        server = BackgroundServer(
            create_app(self.sandbox),
            host=self._host,
            port=self._port,
            log_level=self._log_level,
            lifespan="off",
            # A request still waiting (say, on /admin/flush) must not hold the shutdown up.
            graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
            name="sandbox-http",
        )
        self._server = server.start(timeout_s)
        self.base_url = server.url
        self.sandbox.start()
        return self.base_url

    def stop(self, timeout_s: float = 10.0) -> None:
        self.sandbox.stop()
        if self._server is not None:
            self._server.stop(timeout_s)
            self.sandbox.close()
        self._server = None

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
        sandbox.close()
