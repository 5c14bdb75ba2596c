"""``sync-project connections``: register the customer accounts that syncs run for."""

from __future__ import annotations

import json
import os

import click
import dagster as dg

from sync_project import registry, settings
from sync_project.orchestration.partitions import partitions_name
from sync_project.store import Store, StoreError


def dagster_instance() -> dg.DagsterInstance:
    """The same instance the UI and daemon use (``DAGSTER_HOME``, default ``.dagster_home``)."""
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home()))
    settings.dagster_home()  # makes sure dagster.yaml is there
    return dg.DagsterInstance.get()


def _parse_config(pairs: tuple[str, ...]) -> dict[str, str]:
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--config")
        config[key] = value
    return config


@click.group(name="connections")
def command() -> None:
    """Add, list, pause, resume and remove connections (one Dagster partition each)."""


@command.command("add")
@click.argument("provider")
@click.argument("connection_id")
@click.option("--account-id", help="The provider-side account id webhooks carry (routes them here).")
@click.option("--credentials-env", help="Name of the environment variable holding the API credentials.")
@click.option("--config", "config_pairs", multiple=True, metavar="KEY=VALUE", help="Provider settings, e.g. base_url=...")
def add(provider: str, connection_id: str, account_id: str | None, credentials_env: str | None, config_pairs: tuple[str, ...]) -> None:
    """Register CONNECTION_ID for PROVIDER and add its partition to the Dagster instance."""
    try:
        registry.get_provider(provider)
    except KeyError as error:
        raise click.ClickException(str(error.args[0])) from None
    config = _parse_config(config_pairs)
    try:
        with Store() as store:
            store.connections.add(
                provider, connection_id, account_id=account_id, credentials_env=credentials_env, config=config
            )
    except (StoreError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    dagster_instance().add_dynamic_partitions(partitions_name(provider), [connection_id])
    click.echo(f"added {provider}/{connection_id} (partition {connection_id} of {partitions_name(provider)})")
    # Only now: a note about the variable is noise when the command refused the connection anyway.
    if credentials_env and credentials_env not in os.environ:
        click.echo(f"note: {credentials_env} is not set in this shell; runs will need it", err=True)


@command.command("list")
@click.option("--provider")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(provider: str | None, as_json: bool) -> None:
    """List connections (credentials are shown as the variable name, never the value)."""
    with Store() as store:
        rows = store.connections.list(provider)
    if as_json:
        click.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        click.echo("no connections")
        return
    for row in rows:
        click.echo(
            f"{row.provider:<10} {row.connection_id:<24} {row.status:<7} account={row.account_id or '-'} "
            f"credentials=${row.credentials_env or '-'}"
        )


def _set_status(provider: str, connection_id: str, status: str) -> None:
    try:
        with Store() as store:
            store.connections.set_status(provider, connection_id, status)  # type: ignore[arg-type]
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{provider}/{connection_id} is {status}")


@command.command("pause")
@click.argument("provider")
@click.argument("connection_id")
def pause(provider: str, connection_id: str) -> None:
    """Stop polling and webhook runs (webhooks are still received and wait in the inbox)."""
    _set_status(provider, connection_id, "paused")


@command.command("resume")
@click.argument("provider")
@click.argument("connection_id")
def resume(provider: str, connection_id: str) -> None:
    """Sync a paused connection again: schedules poll it, and the inbox sensor drains the webhooks
    that queued while it was paused."""
    _set_status(provider, connection_id, "active")


@command.command("remove")
@click.argument("provider")
@click.argument("connection_id")
def remove(provider: str, connection_id: str) -> None:
    """Remove the connection and its partition. Its records stay in the store."""
    try:
        with Store() as store:
            store.connections.remove(provider, connection_id)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    instance = dagster_instance()
    if instance.has_dynamic_partition(partitions_name(provider), connection_id):
        instance.delete_dynamic_partition(partitions_name(provider), connection_id)
    click.echo(f"removed {provider}/{connection_id}")


@command.command("status")
@click.argument("provider", required=False)
@click.argument("connection_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object per sync and connection).")
def status(provider: str | None, connection_id: str | None, as_json: bool) -> None:
    """Per connection and sync: the last successful run and its counts, the last error, the
    webhook backlog (pending events), dead letters, and when the next scheduled poll is due.

    Without arguments, a table of every connection; with PROVIDER, that provider's; with PROVIDER
    and CONNECTION_ID, everything about one connection, errors in full. Counts and errors come from
    the runs recorded in the Dagster instance (DAGSTER_HOME), backlog and dead letters from the
    records store's inbox.
    """
    from sync_project.cli import connection_status as view
    from sync_project.definitions import defs

    if provider is not None and provider not in registry.providers():
        raise click.ClickException(f"unknown provider {provider!r}; known: {', '.join(sorted(registry.providers()))}")
    try:
        with Store() as store:
            if connection_id is not None:
                connections = [store.connections.get(provider, connection_id)]  # type: ignore[arg-type]
            else:
                connections = store.connections.list(provider)
            now = view.utcnow()
            statuses = view.partition_statuses(store, dagster_instance(), defs, registry.syncs(), connections, now=now)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
        return
    if not connections:
        click.echo("no connections" + (f" of provider {provider}" if provider else "") + ": `sync-project connections add`")
        return
    if connection_id is not None:
        click.echo("\n".join(view.detail(statuses, connections[0], now)))
        return
    click.echo("\n".join(view.table(statuses, now)))
    if any(s.next_poll.note and "no daemon" in s.next_poll.note for s in statuses):
        click.echo("\nno Dagster daemon has reported for 2 minutes: schedules and the inbox sensor run only while one does")
