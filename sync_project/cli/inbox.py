"""``sync-project inbox``: look at the webhook inbox and replay what failed or found no connection."""

from __future__ import annotations

import click


@click.group("inbox")
def command() -> None:
    """The webhook inbox: counts by status, replay of dead and unroutable events."""


@command.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def stats(as_json: bool) -> None:
    """Events by status, and how long the oldest pending one has waited."""
    from sync_project.store import Store

    with Store() as store:
        figures = store.inbox.stats()
    if as_json:
        click.echo(figures.model_dump_json())
        return
    width = max(len(status) for status in figures.counts)
    for status, count in figures.counts.items():
        click.echo(f"{status:<{width}}  {count}")
    if figures.oldest_pending_age_s is None:
        click.echo("oldest pending: none")
    else:
        received = figures.oldest_pending_received_at.isoformat() if figures.oldest_pending_received_at else "?"
        click.echo(f"oldest pending: {figures.oldest_pending_age_s:.1f} s ago (received {received})")


@command.command("replay")
@click.option(
    "--status",
    "status",
    required=True,
    type=click.Choice(["dead", "unroutable"]),
    help="dead: retry from zero attempts; unroutable: route again to the connections that now exist.",
)
@click.option("--provider", default=None, help="Only events of this provider.")
def replay(status: str, provider: str | None) -> None:
    """Make dead or unroutable events pending again (the inbox sensor then runs them)."""
    from sync_project.store import Store

    with Store() as store:
        pending = store.inbox.replay(status, connections=store.connections, provider=provider)  # type: ignore[arg-type]
        left = store.inbox.count(status=status, provider=provider)  # type: ignore[arg-type]
    scope = f" of provider {provider}" if provider else ""
    click.echo(f"{pending} event(s){scope} became pending; {left} still {status}")


@command.command("purge")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0, min_open=True),
    default=7.0,
    show_default=True,
    help="Delete done, ignored and routed events received longer ago than this.",
)
def purge(older_than_days: float) -> None:
    """Delete finished events (never pending, dead or unroutable ones).

    A kept event is what recognises a provider's redelivery as a duplicate: keep them longer than
    your providers redeliver (Stripe: 3 days).
    """
    from datetime import timedelta

    from sync_project.store import Store

    with Store() as store:
        purged = store.inbox.purge(timedelta(days=older_than_days))
    click.echo(f"{purged} finished event(s) purged")
