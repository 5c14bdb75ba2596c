"""``sync-project syncs``: operate on one sync of one connection (a partition) without a run."""

from __future__ import annotations

import getpass

import click

from sync_project import registry
from sync_project.core import RecordsAction


@click.group("syncs")
def command() -> None:
    """Reset a sync's partition: one sync (PROVIDER/OBJECT) of one connection."""


@command.command("reset")
@click.argument("sync_key", metavar="PROVIDER/OBJECT")
@click.argument("connection_id", metavar="CONNECTION")
@click.option(
    "--empty-records",
    is_flag=True,
    help="Also tombstone the partition's records: the change feed shows each as deleted, and the next poll restores what the provider still has.",
)
@click.option(
    "--remove",
    is_flag=True,
    help="With --empty-records: delete the rows instead of tombstoning them (the change feed tells readers to drop what they hold).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation before emptying the records.")
def reset(sync_key: str, connection_id: str, empty_records: bool, remove: bool, yes: bool) -> None:
    """Clear the checkpoint of PROVIDER/OBJECT for CONNECTION, so its next poll fetches everything.

    It takes the partition's poll lease, so it never runs beside a poll: while a run holds it,
    this refuses, naming the run. Webhook runs go on (their events are newer than any reset).
    The same from the Dagster UI: launch the sync's asset for the partition with run config
    ``mode: reset`` (and ``empty_records: tombstone|remove``, ``confirm: CONNECTION``).
    """
    from sync_project.store import Store, StoreError, UnknownConnectionError

    if remove and not empty_records:
        raise click.UsageError("--remove only applies with --empty-records")
    try:
        sync = registry.get_sync(sync_key)
    except KeyError as error:
        owner = next((s for s in registry.syncs() if sync_key in (s.model_key(m.name) for m in s.models)), None)
        if owner is not None:
            raise click.ClickException(
                f"{sync_key} is a model of {owner.key}, which keeps one checkpoint for all its models: "
                f"`sync-project syncs reset {owner.key} {connection_id}` resets them all"
            ) from None
        raise click.ClickException(str(error.args[0])) from None
    action: RecordsAction = "remove" if remove else "tombstone" if empty_records else "keep"
    from sync_project.orchestration.partition_run import reset_partition

    keys = [sync.model_key(model.name) for model in sync.all_models]
    try:
        with Store() as store:
            store.connections.get(sync.provider, connection_id)
            if action != "keep":
                counted = [(key, store.count(key, connection_id, include_deleted=action == "remove")) for key in keys]
                kind = "record rows" if action == "remove" else "live records"
                verb = "delete all" if action == "remove" else "tombstone all"
                what = ", ".join(f"{count} {kind} of {key}" for key, count in counted)
                if not yes:
                    click.confirm(f"This will {verb} {what} for {connection_id!r}. Continue?", abort=True)
            results = reset_partition(store, sync, connection_id, records=action, requested_by=f"cli:{_user()}"[:64])
    except UnknownConnectionError as error:
        raise click.ClickException(f"{error}; `sync-project connections list` shows them") from None
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    for result in results.values():
        click.echo(result.describe())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
