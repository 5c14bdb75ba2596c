"""``sync-project forwarder``: pass verified webhook deliveries on to the customer's app."""

from __future__ import annotations

import click


@click.group("forwarder")
def command() -> None:
    """Webhook forwarding: the worker, its queue's figures, replay of dead forwards."""


@command.command("run")
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help="Forwards in flight at once."
)
@click.option(
    "--attempt-timeout",
    "attempt_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
)
@click.option(
    "--max-attempts", type=click.IntRange(min=1), default=10, show_default=True, help="Then a forward is dead."
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="On the very first start, forward everything the inbox holds (default: only what arrives from now on).",
)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
def run(concurrency: int, attempt_timeout_s: float, max_attempts: int, from_beginning: bool, log_level: str) -> None:
    """Forward until SIGINT/SIGTERM. Needs SYNC_FORWARD_URL and SYNC_FORWARD_SECRET (whsec_...)."""
    import logging
    import signal
    import threading

    from sync_project.forwarding.forwarder import Forwarder, ForwarderSettings, ForwardingConfigError
    from sync_project.store import Store

    try:
        settings = ForwarderSettings.from_env(
            concurrency=concurrency,
            attempt_timeout_s=attempt_timeout_s,
            max_attempts=max_attempts,
            start_at="beginning" if from_beginning else "now",
        )
    except ForwardingConfigError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Store() as store, Forwarder(store, settings) as forwarder:
        forwarder.run(stop)
    click.echo("forwarder stopped")


@command.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def stats(as_json: bool) -> None:
    """Forwards by status, the oldest pending one's age, and the inbox cursor."""
    from sync_project.store import Store

    with Store() as store:
        figures = store.forwards().stats()
    if as_json:
        click.echo(figures.model_dump_json())
        return
    for status, count in figures.counts.items():
        click.echo(f"{status:<9}  {count}")
    age = "none" if figures.oldest_pending_age_s is None else f"{figures.oldest_pending_age_s:.1f} s"
    click.echo(f"oldest pending: {age}")
    click.echo(f"inbox cursor: {'not started' if figures.inbox_cursor is None else figures.inbox_cursor}")


@command.command("replay")
def replay() -> None:
    """Make dead forwards pending again (the running forwarder retries them from zero attempts)."""
    from sync_project.store import Store

    with Store() as store:
        count = store.forwards().replay_dead()
    click.echo(f"{count} dead forward(s) became pending")


@command.command("purge")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0, min_open=True),
    default=7.0,
    show_default=True,
    help="Delete delivered forwards created longer ago than this (keep them as long as the inbox keeps events).",
)
def purge(older_than_days: float) -> None:
    """Delete delivered forwards (never pending or dead ones)."""
    from datetime import timedelta

    from sync_project.store import Store

    with Store() as store:
        count = store.forwards().purge(timedelta(days=older_than_days))
    click.echo(f"{count} delivered forward(s) purged")
