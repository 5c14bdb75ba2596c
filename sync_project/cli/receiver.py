"""``sync-project receiver``: serve the webhook receiver with uvicorn."""

from __future__ import annotations

import logging
from typing import Any

import click

from sync_project.receiver.app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from sync_project.receiver.intake import DEFAULT_MAX_JSON_DEPTH, MAX_JSON_DEPTH_LIMIT
from sync_project.settings import COMMIT_DEADLINE_ENV, DEFAULT_COMMIT_DEADLINE_S

#: Group commits in flight per process. One: each batch takes what arrived while the one before
#: committed, so batches grow with the commit's latency. On this 2-core machine, where the receiver
#: is CPU-bound, two writers were 13 % slower (6,076 vs 6,984 deliveries/s, 163 vs 140 µs of CPU a
#: delivery, means of three alternated runs, 2026-12-02): the second commit thread competes for
#: the GIL and the batches shrink. More pay off when a commit is slow next to the load (a remote
#: database): one writer commits at most the requests in flight per round trip.
DEFAULT_WRITERS = 1
DEFAULT_PORT = 8000  # what `make run` serves it on too: one address in every example
#: Connections (and requests in flight) one receiver process serves at once; uvicorn answers
#: 503 beyond it. Below the common 1024 open-files limit, with room for database connections.
DEFAULT_MAX_CONNECTIONS = 900
#: Idle seconds a kept-alive connection waits for its next request (uvicorn's own default).
DEFAULT_KEEP_ALIVE_S = 5
#: How long a worker process (--workers N) may take to answer uvicorn's health ping before it is
#: killed and replaced. A new worker answers only once it has imported the project (seconds on a
#: busy host); uvicorn's 5 s default kills it mid-import over and over.
WORKER_HEALTHCHECK_S = 30


@click.command("receiver")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-body-bytes",
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Deliveries larger than this are refused with 413.",
)
@click.option(
    "--proxy-headers/--no-proxy-headers",
    default=False,
    show_default=True,
    help="Trust X-Forwarded-Proto/For from a reverse proxy on loopback (signatures over the URL need it).",
)
@click.option(
    "--commit-deadline",
    "commit_deadline_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Seconds a delivery waits for its commit before a 503 (default: ${COMMIT_DEADLINE_ENV} or "
    f"{DEFAULT_COMMIT_DEADLINE_S:g}). Also bounds /healthz.",
)
@click.option(
    "--body-timeout",
    "body_timeout_s",
    default=DEFAULT_BODY_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a request may take to send its body; slower ones get 408 and are closed.",
)
@click.option(
    "--max-json-depth",
    default=DEFAULT_MAX_JSON_DEPTH,
    show_default=True,
    type=click.IntRange(1, MAX_JSON_DEPTH_LIMIT),
    help="Deliveries whose JSON nests deeper are refused with 400.",
)
@click.option(
    "--max-connections",
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections served at once; requests beyond get 503 (uvicorn's limit_concurrency).",
)
@click.option(
    "--keep-alive",
    "keep_alive_s",
    default=DEFAULT_KEEP_ALIVE_S,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds an idle kept-alive connection stays open.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Receiver processes sharing the port (each with its own store); they hold no state.",
)
@click.option(
    "--writers",
    default=DEFAULT_WRITERS,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Group commits in flight at once per process, each on its own database connection: more "
    "pay off on Postgres when commits are slow next to the load (a remote database); SQLite's "
    "writers take turns anyway.",
)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
def command(
    host: str,
    port: int,
    max_body_bytes: int,
    proxy_headers: bool,
    commit_deadline_s: float | None,
    body_timeout_s: float,
    max_json_depth: int,
    max_connections: int,
    keep_alive_s: int,
    workers: int,
    writers: int,
    log_level: str,
) -> None:
    """Receive webhooks: POST /webhooks/{provider}, GET /healthz. Logs are JSON lines on stderr.

    It starts whether or not the database is up (answering 503 until it is), and migrates the
    schema once it is reachable.
    """
    import uvicorn

    from sync_project.receiver import factory
    from sync_project.receiver.app import ReceiverConfigError, create_app
    from sync_project.receiver.logs import configure_json_logging
    from sync_project.store import Store

    listener = configure_json_logging(getattr(logging, log_level.upper()))
    # Not migrated here: the app does it once the database answers, so services start in any order.
    store = Store(migrate_schema=False)
    app_options: dict[str, Any] = {
        "max_body_bytes": max_body_bytes,
        "commit_deadline_s": commit_deadline_s,
        "body_timeout_s": body_timeout_s,
        "max_json_depth": max_json_depth,
        "writers": writers,
    }
    server_options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,  # the receiver writes its own line per delivery
        "log_config": None,  # keep the JSON handler configured above (in each worker: the factory's)
        "proxy_headers": proxy_headers,
        "server_header": False,
        # uvicorn has no deadline for a request's body: the app enforces --body-timeout.
        "limit_concurrency": max_connections,  # per worker process
        "timeout_keep_alive": keep_alive_s,
    }
    try:
        try:
            # Built here even with --workers: a configuration that cannot work fails this command.
            app = create_app(store, **app_options)
        except ReceiverConfigError as error:
            raise click.ClickException(f"cannot start: {error}") from None
        if workers > 1:
            # uvicorn's workers are new processes: each builds its own app and store (factory.py).
            factory.export_options(app_options, log_level)
            uvicorn.run(
                "sync_project.receiver.factory:factory",
                factory=True,
                workers=workers,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
                **server_options,
            )
        else:
            factory.tune_serving_process()
            uvicorn.run(app, **server_options)
    finally:
        store.close()
        listener.stop()
