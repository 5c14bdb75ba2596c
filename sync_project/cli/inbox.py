"""``sync-project inbox``: look at the webhook inbox and replay what failed or found no connection."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import click

#: ``inbox purge`` shows a progress bar (on a terminal) from this many rows to delete: two chunks.
PROGRESS_FROM = 10_000

if TYPE_CHECKING:
    from sync_project.store import ConnectionInboxStats


@click.group("inbox")
def command() -> None:
    """The webhook inbox: counts by status, replay of dead, unroutable and orphaned events."""


@command.command("stats")
@click.option("--by-connection", is_flag=True, help="One row per provider and connection instead of totals.")
@click.option("--provider", default=None, help="With --by-connection: only this provider's connections.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(by_connection: bool, provider: str | None, as_json: bool) -> None:
    """Events by status, and how long the oldest pending one has waited.

    \b
    pending:    waiting for a webhook run of its sync and connection (after a handler
                failure, until its retry time: backoff doubles per attempt)
    done:       applied, in the same transaction as the merge it caused
    dead:       the handler failed 8 times; the error is kept (`inbox replay --status dead`)
    unroutable: no connection has the account id it names yet; `inbox replay --status
                unroutable` routes it once `connections add ... --account-id` exists
    routed:     an unroutable event that a replay routed: its pending copies, one per
                connection, carry on; the routed row stays as the record of the delivery
    ignored:    no sync subscribes to its event type; kept, so nothing is silently lost
    orphaned:   it was pending when its connection was removed; kept, and pending again
                when `connections add` adds that id back (or `inbox replay --status orphaned`)

    Finished events (done, routed, ignored) are deleted by `inbox purge`.
    """
    from sync_project.store import Store

    if provider is not None and not by_connection:
        raise click.UsageError("--provider goes with --by-connection")
    with Store() as store:
        if by_connection:
            _by_connection(store.inbox.stats_by_connection(provider=provider), as_json)
            return
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


def _by_connection(rows: list[ConnectionInboxStats], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        click.echo("the inbox is empty")
        return
    now = datetime.now(timezone.utc)
    statuses = list(rows[0].counts)
    table = [("PROVIDER", "CONNECTION", *statuses, "OLDEST PENDING")]
    for row in rows:
        oldest = row.oldest_pending_received_at
        table.append(
            (
                row.provider,
                row.connection_id or "(none)",
                *(str(row.counts[status]) for status in statuses),
                "-" if oldest is None else f"{max(0.0, (now - oldest).total_seconds()):.0f} s ago",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())
    if any(not row.connection_id for row in rows):
        click.echo(
            "\n(none): events that route to no connection: unroutable (no connection has their account id) "
            "or ignored (no sync subscribes to their type)"
        )


@command.command("replay")
@click.option(
    "--status",
    "status",
    required=True,
    type=click.Choice(["dead", "unroutable", "orphaned"]),
    help="dead: retry from zero attempts; unroutable: route again to the connections that now exist; "
    "orphaned: events of a removed connection, where a connection of that id exists again.",
)
@click.option("--provider", default=None, help="Only events of this provider.")
def replay(status: str, provider: str | None) -> None:
    """Make dead, unroutable or orphaned events pending again (the inbox sensor then runs them)."""
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
    """Delete finished events (never pending, dead, unroutable or orphaned ones).

    A kept event is what recognises a provider's redelivery as a duplicate: keep them longer than
    your providers redeliver (Stripe: 3 days).
    """
    from datetime import timedelta

    from sync_project.store import Store

    older_than = timedelta(days=older_than_days)
    purged = 0
    with Store() as store:
        # A bar only when there is much to do (the count is one pass; the chunks are 5,000 rows).
        total = store.inbox.purgeable(older_than)
        chunks = store.inbox.purge_chunks(older_than)
        if total < PROGRESS_FROM:
            purged = sum(chunks)
        else:
            with click.progressbar(length=total, label="purging finished events", file=sys.stderr) as bar:
                for removed in chunks:
                    purged += removed
                    bar.update(removed)
    click.echo(f"{purged} finished event(s) purged")
