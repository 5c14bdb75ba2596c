"""``sync-project connections``: register the customer accounts that syncs run for."""

from __future__ import annotations

import json
import os
import sys

import click
import dagster as dg

from sync_project import registry, settings
from sync_project.orchestration.connection_partitions import reconcile_partitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.store import ProviderConnection, Store, StoreError


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


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str, *, allow_never: bool = False) -> int | None:
    """``90``, ``90s``, ``5m``, ``2h``, ``1d`` as seconds; ``default``: None (the sync's);
    ``never``: 0 (full refreshes only)."""
    value = text.strip().lower()
    if value == "default":
        return None
    if allow_never and value in ("never", "off", "0"):
        return 0
    number, unit = value, "s"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(suffix):
            number, unit = value[: -len(suffix)], suffix
            break
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a duration (90s, 5m, 2h, 1d{', never' if allow_never else ''} or default)",
            param_hint=option,
        ) from None
    if seconds != int(seconds) or seconds <= 0:
        raise click.BadParameter(f"{text!r}: a whole number of seconds above 0", param_hint=option)
    return int(seconds)


def _credentials_options(function):  # type: ignore[no-untyped-def]
    """The credentials reference, one of four kinds, resolved by every run (see README)."""
    for option in reversed(
        [
            click.option(
                "--credentials-env", metavar="VAR", help="An environment variable of the services that run syncs."
            ),
            click.option(
                "--credentials-file",
                metavar="PATH",
                help="A file the runs read (absolute path), e.g. a mounted secret.",
            ),
            click.option(
                "--credentials-secret",
                metavar="KEY",
                help="A key of the secrets directory ($SYNC_SECRETS_DIR, default /run/secrets): Docker or Kubernetes secrets.",
            ),
            click.option(
                "--store-credentials",
                is_flag=True,
                help="Read the secret from stdin (or a hidden prompt) and keep it in the store, encrypted with $SYNC_CREDENTIALS_KEY.",
            ),
        ]
    ):
        function = option(function)
    return function


def _interval_options(function):  # type: ignore[no-untyped-def]
    function = click.option(
        "--full-refresh-interval",
        metavar="DURATION",
        help="Full refresh (delete detection) this often instead of the sync's (default daily); never, or default.",
    )(function)
    return click.option(
        "--poll-interval",
        metavar="DURATION",
        help="Poll this connection this often instead of the sync's (min 30s), or default.",
    )(function)


def _credentials(
    provider: str, connection_id: str, env: str | None, file: str | None, secret: str | None, stored: bool
) -> dict[str, str | None] | None:
    """The reference the options name (``value``: the secret, read here), or None for none."""
    given = [
        name
        for name, value in (
            ("--credentials-env", env),
            ("--credentials-file", file),
            ("--credentials-secret", secret),
            ("--store-credentials", stored),
        )
        if value
    ]
    if len(given) > 1:
        raise click.UsageError(f"give one credentials reference, not {' and '.join(given)}")
    if not given:
        return None
    value = None
    if stored:
        stdin = sys.stdin
        if stdin.isatty():
            value = click.prompt(f"credentials of {provider}/{connection_id}", hide_input=True, err=True)
        else:
            value = stdin.read().strip()
        if not value:
            raise click.UsageError("--store-credentials read empty credentials")
    return {"env": env, "file": file, "secret": secret, "value": value}


def _describe(row: ProviderConnection) -> str:
    poll = cadence_text(row.poll_interval_s)
    full = "never" if row.full_refresh_interval_s == 0 else cadence_text(row.full_refresh_interval_s)
    return f"poll={poll} full_refresh={full} credentials={row.credentials_ref}"


def cadence_text(seconds: int | None) -> str:
    if seconds is None:
        return "default"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@command.command("add")
@click.argument("provider")
@click.argument("connection_id")
@click.option("--account-id", help="The provider-side account id webhooks carry (routes them here).")
@_credentials_options
@click.option(
    "--config", "config_pairs", multiple=True, metavar="KEY=VALUE", help="Provider settings, e.g. base_url=..."
)
@_interval_options
def add(
    provider: str,
    connection_id: str,
    account_id: str | None,
    credentials_env: str | None,
    credentials_file: str | None,
    credentials_secret: str | None,
    store_credentials: bool,
    config_pairs: tuple[str, ...],
    poll_interval: str | None,
    full_refresh_interval: str | None,
) -> None:
    """Register CONNECTION_ID for PROVIDER and add its partition to the Dagster instance.

    Running services sync it from their next poll: each run reads the connection and resolves
    its credentials when it starts."""
    try:
        registry.get_provider(provider)
    except KeyError as error:
        raise click.ClickException(str(error.args[0])) from None
    config = _parse_config(config_pairs)
    poll_s = parse_duration(poll_interval, "--poll-interval") if poll_interval else None
    full_s = (
        parse_duration(full_refresh_interval, "--full-refresh-interval", allow_never=True)
        if full_refresh_interval
        else None
    )
    ref = (
        _credentials(provider, connection_id, credentials_env, credentials_file, credentials_secret, store_credentials)
        or {}
    )
    try:
        with Store() as store:
            row = store.connections.add(
                provider,
                connection_id,
                account_id=account_id,
                config=config,
                credentials_env=ref.get("env"),
                credentials_file=ref.get("file"),
                credentials_secret=ref.get("secret"),
                credentials_value=ref.get("value"),
                poll_interval_s=poll_s,
                full_refresh_interval_s=full_s,
            )
            # Its partition is derived from the table (connection_partitions_sensor keeps them
            # equal); added here too, so it is there when this returns.
            reconcile_partitions(dagster_instance(), store, [provider])
    except (StoreError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"added {provider}/{connection_id} (partition {connection_id} of {partitions_name(provider)}): {_describe(row)}"
    )
    with Store() as store:
        waiting = store.inbox.count(status="pending", provider=provider, connection_id=connection_id)
    if waiting:
        click.echo(f"{waiting} webhook event(s) of it are pending (left by an earlier connection of this id)")
    # Only now: a note about the variable is noise when the command refused the connection anyway.
    if credentials_env and credentials_env not in os.environ:
        click.echo(
            f"note: {credentials_env} is not set in this shell; the processes that run syncs need it "
            "(set before they start)",
            err=True,
        )


@command.command("set")
@click.argument("provider")
@click.argument("connection_id")
@_credentials_options
@_interval_options
def set_(
    provider: str,
    connection_id: str,
    credentials_env: str | None,
    credentials_file: str | None,
    credentials_secret: str | None,
    store_credentials: bool,
    poll_interval: str | None,
    full_refresh_interval: str | None,
) -> None:
    """Change a connection's poll interval, full-refresh interval or credentials reference.

    The next tick of its schedule (or the per-connection sensor) and the next run use them: nothing
    restarts."""
    changes: dict[str, object] = {}
    if poll_interval is not None:
        changes["poll_interval_s"] = parse_duration(poll_interval, "--poll-interval")
    if full_refresh_interval is not None:
        changes["full_refresh_interval_s"] = parse_duration(
            full_refresh_interval, "--full-refresh-interval", allow_never=True
        )
    ref = _credentials(
        provider, connection_id, credentials_env, credentials_file, credentials_secret, store_credentials
    )
    if not changes and ref is None:
        raise click.UsageError("nothing to set: give --poll-interval, --full-refresh-interval or a credentials option")
    try:
        if ref is not None:
            changes["credentials"] = ref
        with Store() as store:
            row = store.connections.configure(provider, connection_id, **changes)  # type: ignore[arg-type]
    except (StoreError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{provider}/{connection_id}: {_describe(row)}")


@command.command("list")
@click.option("--provider")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(provider: str | None, as_json: bool) -> None:
    """List connections: intervals, and where the credentials are (never their value)."""
    with Store() as store:
        rows = store.connections.list(provider)
    if as_json:
        click.echo(json.dumps([row.dump() for row in rows], indent=2))
        return
    if not rows:
        click.echo("no connections")
        return
    for row in rows:
        click.echo(
            f"{row.provider:<10} {row.connection_id:<24} {row.status:<7} account={row.account_id or '-'} {_describe(row)}"
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
    """Remove the connection and its partition; cancel its queued runs. Its records stay in the
    store; its pending webhook events become `orphaned` (kept; `connections add` of the same id
    makes them pending again). Runs in progress finish: they find nothing left to drain."""
    try:
        with Store() as store:
            orphaned = store.connections.remove(provider, connection_id)
            instance = dagster_instance()
            reconcile_partitions(instance, store, [provider])  # the partition goes with it
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    canceled = cancel_queued_runs(instance, provider, connection_id)
    click.echo(f"removed {provider}/{connection_id}")
    if orphaned:
        click.echo(
            f"{orphaned} pending webhook event(s) orphaned: `connections add` of {connection_id} makes them pending again"
        )
    if canceled:
        click.echo(f"{canceled} queued run(s) of its partition canceled")


def cancel_queued_runs(instance: dg.DagsterInstance, provider: str, connection_id: str) -> int:
    """Queued (or created, not yet launched) runs of the partition would only fail at start, on a
    connection that is gone."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED],
            tags={"dagster/partition": connection_id},
        )
    )
    canceled = 0
    for record in records:
        run = record.dagster_run
        if run.job_name.startswith(f"{provider}__"):
            instance.report_run_canceled(run, message=f"connection {provider}/{connection_id} was removed")
            canceled += 1
    return canceled


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
        click.echo(
            "no connections" + (f" of provider {provider}" if provider else "") + ": `sync-project connections add`"
        )
        return
    if connection_id is not None:
        click.echo("\n".join(view.detail(statuses, connections[0], now)))
        return
    click.echo("\n".join(view.table(statuses, now)))
    if any(s.next_poll.note and "no daemon" in s.next_poll.note for s in statuses):
        click.echo(
            "\nno Dagster daemon has reported for 2 minutes: schedules and the inbox sensor run only while one does"
        )
