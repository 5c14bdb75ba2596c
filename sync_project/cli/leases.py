"""``sync-project leases``: who holds which partition, under which fencing token, until when."""

from __future__ import annotations

from datetime import datetime, timezone

import click


@click.group("leases")
def command() -> None:
    """Partition leases: one per (sync, connection) for polls and one for the webhook drain."""


@command.command("list")
@click.option("--sync", "sync_key", default=None, help="Only this sync (e.g. sandbox/contacts).")
def list_leases(sync_key: str | None) -> None:
    """Every lease: holder (a run id, or free), token, and how long until it expires."""
    from sync_project.store import Store

    with Store() as store:
        states = store.leases.list(sync_key)
    if not states:
        click.echo("no leases yet: no run has synced a partition")
        return
    now = datetime.now(timezone.utc)
    rows = [("SYNC", "CONNECTION", "ROLE", "HOLDER", "TOKEN", "EXPIRES")]
    for state in states:
        if state.holder is None or state.expires_at is None:
            holder, expires = "(free)", "-"
        else:
            holder = state.holder
            left = (state.expires_at - now).total_seconds()
            expires = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago (the next run takes over)"
        rows.append((state.sync, state.connection_id, state.role, holder, str(state.token), expires))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
