"""The asset factory: one partitioned asset per declared sync.

No `from __future__ import annotations` here: Dagster reads the config and resource types of the
asset function's parameters at definition time.
"""

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import dagster as dg
from pydantic import Field

from sync_project.core.clock import utcnow
from sync_project.core.http import ProviderError
from sync_project.core.provider import Provider
from sync_project.core.sync import RecordsAction, SyncDefinition
from sync_project.notifications.sync import NotificationOutcome, SyncNotification, SyncNotifier, SyncResults
from sync_project.orchestration.checks import (
    CheckSettings,
    freshness_policy,
    partition_check_results,
    partition_check_specs,
)
from sync_project.orchestration.notifications import NOTIFIER_KEY
from sync_project.orchestration.partitions import connection_partitions
from sync_project.orchestration.resources import storage_kind
from sync_project.store import LeaseHeldError, MergeResult, StoreError, UnknownConnectionError

if TYPE_CHECKING:
    # Types only: a run imports the store and the drain and poll machinery when it runs; the
    # code location's import is paid by every run process (benchmarks/import_time.py).
    from sync_project.orchestration.partition_run import RunSettings
    from sync_project.orchestration.webhook_drain import DrainResult
    from sync_project.store import FullWindow, Store

#: The run modes: a partition's run polls (full, incremental), drains (webhook) or resets it.
SyncMode = Literal["full", "incremental", "webhook", "reset"]
STORE_KEY = "sync_store"


class SyncRunConfig(dg.Config):
    """How a run syncs its partition.

    ``full`` (the default, so a person's launch or backfill from the UI re-fetches everything and
    then detects deletes), ``incremental`` (schedules: from the stored checkpoint), ``webhook``
    (the inbox sensor: drain the partition's pending webhook events), ``reset`` (what
    ``sync-project syncs reset`` does: clear the checkpoint, and keep, tombstone or remove the
    records as ``empty_records`` says; fetches nothing).
    """

    mode: SyncMode = "full"
    #: Reset mode: what becomes of the partition's records. ``tombstone``: each is deleted in the
    #: change feed, and the next poll restores what the provider still has; ``remove``: the rows
    #: go, and the feed tells readers to drop what they hold.
    empty_records: RecordsAction = "keep"
    #: Reset mode, with ``empty_records`` other than ``keep``: the partition's connection id again,
    #: the launchpad's confirmation (``--yes`` of the command).
    confirm: str = ""
    #: Webhook mode: stop after this many events (the rest waits for the next run).
    max_events: int | None = None
    #: Webhook mode: keep claiming for this long after the last event before finishing. A run
    #: that is already up applies the next webhooks within a second, instead of the next one
    #: paying a sensor tick and a run start-up (several seconds each).
    linger_s: float = 0.0
    #: Webhook mode: a lingering run ends after this long even while events keep coming, so its
    #: counts reach the UI and queued polling runs of the partition get their turn.
    max_linger_run_s: float = 60.0
    #: The run's lease on its partition lasts this long unless renewed (every third of it): a run
    #: whose worker died frees its partition within this time.
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    #: Full and incremental runs: how long to wait for another poll of the partition to finish
    #: (a backfill launched while a scheduled poll runs) before failing.
    poll_lease_wait_s: float = Field(default=600.0, ge=0, le=86400)
    #: Webhook mode: a successor of the partition's standing drainer (the inbox sensor sets it)
    #: waits this long for that drainer to release the drain lease, instead of deferring to it.
    handoff_wait_s: float = Field(default=0.0, ge=0, le=3600)

    def settings(self) -> "RunSettings":
        from sync_project.orchestration.partition_run import RunSettings

        return RunSettings(
            max_events=self.max_events,
            linger_s=self.linger_s,
            max_linger_run_s=self.max_linger_run_s,
            lease_ttl_s=self.lease_ttl_s,
            poll_lease_wait_s=self.poll_lease_wait_s,
            handoff_wait_s=self.handoff_wait_s,
        )


class _RunRefused(dg.Failure):
    """The run did nothing: another run held the partition's lease all the while it waited."""


def op_name(sync: SyncDefinition) -> str:
    """The op behind the asset, as run config addresses it (``provider__object``)."""
    return f"{sync.provider}__{sync.name}"


def job_name(sync: SyncDefinition) -> str:
    """The job that materializes the sync's asset (schedules, the sensor and backfills target it)."""
    return f"{op_name(sync)}_job"


def build_sync_asset(
    sync: SyncDefinition,
    provider: Provider,
    *,
    notify: bool = False,
    check_settings: CheckSettings | None = None,
) -> dg.AssetsDefinition:
    """The sync's asset. It needs the ``sync_store`` resource, and ``sync_notifier`` (a
    :class:`~sync_project.orchestration.notifications.NotifierResource`) when ``notify`` is set,
    as :func:`~sync_project.orchestration.factory.build_definitions` does."""
    settings = check_settings or CheckSettings()
    if sync.models:
        return _build_multi_model_asset(sync, provider, notify=notify, settings=settings)

    @dg.asset(
        key=dg.AssetKey([sync.provider, sync.name]),
        group_name=sync.provider,
        kinds={sync.provider, storage_kind()},
        partitions_def=connection_partitions(sync.provider),
        description=sync.description or f"{sync.name} of {sync.provider}, one partition per connection.",
        metadata={
            "sync": sync.key,
            "primary_key": sync.primary_key,
            "merge_strategy": sync.record_spec.strategy.value,
            "poll_interval_s": sync.poll_interval.total_seconds(),
            "full_refresh_interval_s": (
                sync.full_refresh_interval.total_seconds() if sync.full_refresh_interval else "never"
            ),
            "webhook_events": ", ".join(sync.webhook_events) or "none",
            "track_deletes": sync.track_deletes,
        },
        check_specs=partition_check_specs(sync),
        freshness_policy=freshness_policy(sync, settings),
        # Keys rather than typed parameters: the notifier is optional, and Dagster allows only
        # one of the two ways per asset.
        required_resource_keys={STORE_KEY, NOTIFIER_KEY} if notify else {STORE_KEY},
    )
    def _sync_asset(
        context: dg.AssetExecutionContext, config: SyncRunConfig
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        notifier = getattr(context.resources, NOTIFIER_KEY).get_notifier() if notify else None
        store = getattr(context.resources, STORE_KEY).get_store()
        yield from run_sync(context, config, store, sync, provider, notifier=notifier, check_settings=settings)

    return _sync_asset


def own_asset_key(sync: SyncDefinition) -> dg.AssetKey:
    return dg.AssetKey([sync.provider, sync.name])


def _build_multi_model_asset(
    sync: SyncDefinition, provider: Provider, *, notify: bool, settings: CheckSettings
) -> dg.AssetsDefinition:
    """A sync of several models: one multi-asset, an asset per model, all materialized by each run
    (one fetch reads them all); the partition's checks are the sync's own model's."""
    specs = [
        dg.AssetSpec(
            key=dg.AssetKey([sync.provider, model.name]),
            group_name=sync.provider,
            kinds={sync.provider, storage_kind()},
            partitions_def=connection_partitions(sync.provider),
            description=model.description
            or f"{model.name} of {sync.provider} (sync {sync.key}), one partition per connection.",
            metadata={
                "sync": sync.key,
                "records": sync.model_key(model.name),
                "primary_key": model.primary_key,
                "merge_strategy": model.record_spec.strategy.value,
                "poll_interval_s": sync.poll_interval.total_seconds(),
                "webhook_events": ", ".join(sync.webhook_events) or "none",
                "track_deletes": model.track_deletes,
            },
            freshness_policy=freshness_policy(sync, settings) if model.name == sync.name else None,
        )
        for model in sync.all_models
    ]

    @dg.multi_asset(
        name=op_name(sync),
        specs=specs,
        check_specs=partition_check_specs(sync),
        can_subset=False,
        required_resource_keys={STORE_KEY, NOTIFIER_KEY} if notify else {STORE_KEY},
    )
    def _sync_assets(context: dg.AssetExecutionContext, config: SyncRunConfig):  # type: ignore[no-untyped-def]
        notifier = getattr(context.resources, NOTIFIER_KEY).get_notifier() if notify else None
        store = getattr(context.resources, STORE_KEY).get_store()
        yield from run_sync_models(context, config, store, sync, provider, notifier=notifier, check_settings=settings)

    return _sync_assets


def run_sync_models(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    store: "Store",
    sync: SyncDefinition,
    provider: Provider,
    *,
    notifier: SyncNotifier | None = None,
    check_settings: CheckSettings | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """:func:`run_sync` for a sync of several models: the sync's own model's result (with the
    partition's checks), then one per further model, each with its own counts and row count."""
    models: dict[str, MergeResult] = {}
    own: dg.MaterializeResult | None = None
    for event in run_sync(
        context, config, store, sync, provider, notifier=notifier, check_settings=check_settings, models=models
    ):
        yield event  # a failed run raises after its checks
        if isinstance(event, dg.MaterializeResult):
            own = event
    assert own is not None
    connection_id = context.partition_key
    mode = own.metadata.get("mode") if own.metadata else config.mode
    for model in sync.models:
        key = sync.model_key(model.name)
        merged = models.get(key, MergeResult())
        yield dg.MaterializeResult(
            asset_key=dg.AssetKey([sync.provider, model.name]),
            metadata={
                **merged.as_dict(),
                "mode": mode,
                "sync": sync.key,
                "dagster/row_count": store.count(key, connection_id),
            },
        )


def run_sync(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    store: "Store",
    sync: SyncDefinition,
    provider: Provider,
    *,
    notifier: SyncNotifier | None = None,
    check_settings: CheckSettings | None = None,
    models: dict[str, MergeResult] | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Sync the run's partition, then report: counts, the partition's checks, the notification.

    A sync of several models fills ``models`` with each further model's counts (by store key);
    the result yielded is the sync's own model's.

    A run that fails still reports its partition's checks first, then raises: Dagster shows checks
    a failed run planned but never evaluated as failed, which says nothing about the inbox or
    freshness.

    The notification goes out after everything is committed, failures included, and never
    changes the run's outcome: a notification that cannot be delivered within its time budget is
    a warning in the run's log and ``notification: failed ...`` in its metadata.
    """
    started_at = utcnow()
    settings = check_settings or CheckSettings()
    selected = {key.name for key in context.selected_asset_check_keys if key.asset_key == own_asset_key(sync)}
    try:
        merged, metadata = _failure_notified(
            context,
            config,
            sync,
            notifier,
            started_at,
            lambda: _sync_partition(context, config, store, sync, provider, models),
        )
    except Exception:
        yield from _checks_of_a_failed_run(context, store, sync, selected, settings)
        raise
    yield _report(context, config, store, sync, notifier, settings, selected, started_at, merged, metadata)


def _checks_of_a_failed_run(
    context: dg.AssetExecutionContext, store: "Store", sync: SyncDefinition, selected: set[str], settings: CheckSettings
) -> list[dg.AssetCheckResult]:
    try:
        return partition_check_results(
            store, sync, context.partition_key, selected, settings, instance=context.instance
        )
    except Exception as error:  # noqa: BLE001 - the run's own error is the one to raise
        context.log.warning(f"checks not evaluated after the run failed: {type(error).__name__}: {error}")
        return []


def _failure_notified(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    sync: SyncDefinition,
    notifier: SyncNotifier | None,
    started_at: datetime,
    run: Callable[[], tuple[MergeResult, dict[str, Any]]],
) -> tuple[MergeResult, dict[str, Any]]:
    try:
        return run()
    except _RunRefused:
        raise
    except dg.Failure as failure:
        outcome = _notify(context, notifier, sync, config, started_at, None, failure.description or "failed")
        if outcome is None:
            raise
        raise dg.Failure(
            description=failure.description,
            metadata={**failure.metadata, "notification": str(outcome)},
        ) from failure
    except Exception as error:
        _notify(context, notifier, sync, config, started_at, None, f"{type(error).__name__}: {error}")
        raise


def _report(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    store: "Store",
    sync: SyncDefinition,
    notifier: SyncNotifier | None,
    settings: CheckSettings,
    selected: set[str],
    started_at: datetime,
    merged: MergeResult,
    metadata: dict[str, Any],
) -> dg.MaterializeResult:
    connection_id = context.partition_key
    counts = merged.as_dict()
    context.log.info(f"{sync.key} {connection_id} ({config.mode}): {json.dumps(counts)}")
    check_results = partition_check_results(store, sync, connection_id, selected, settings, instance=context.instance)
    outcome = _notify(context, notifier, sync, config, started_at, SyncResults.of(merged), None)
    if outcome is not None:
        metadata["notification"] = str(outcome)
    return dg.MaterializeResult(
        asset_key=own_asset_key(sync) if sync.models else None,
        metadata={
            **counts,
            **metadata,
            "dagster/row_count": store.count(sync.key, connection_id),
        },
        check_results=check_results,
    )


def _sync_partition(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    store: "Store",
    sync: SyncDefinition,
    provider: Provider,
    models: dict[str, MergeResult] | None = None,
) -> tuple[MergeResult, dict[str, Any]]:
    connection_id = context.partition_key
    models = {} if models is None else models
    try:
        connection = store.connections.get(sync.provider, connection_id)
    except UnknownConnectionError as error:
        raise dg.Failure(
            description=f"{error}. Register it with `sync-project connections add {sync.provider} {connection_id}`."
        ) from None
    if connection.status != "active" and config.mode != "reset":
        raise dg.Failure(
            description=f"connection {sync.provider}/{connection_id} is {connection.status}; "
            f"`sync-project connections resume {sync.provider} {connection_id}` to sync it again."
        )
    if config.mode == "reset":
        return _reset_partition(context, config, store, sync, models)
    metadata: dict[str, Any] = {"mode": config.mode}
    batches = BatchMaterializations.of_asset(context, store, sync)
    try:
        from sync_project.orchestration.partition_run import run_partition

        ran = run_partition(
            store,
            sync,
            provider,
            connection,
            mode=config.mode,
            run_id=context.run.run_id,
            log=context.log,
            settings=config.settings(),
            on_batch=batches.record,
        )
    except LeaseHeldError as error:
        raise _RunRefused(
            description=f"{error}; this run waited {config.poll_lease_wait_s:.0f} s and did nothing."
        ) from None
    except (ProviderError, StoreError) as error:
        store.state.record_run(sync.key, connection_id, run_id=context.run.run_id, mode=config.mode, error=str(error))
        raise dg.Failure(
            description=f"{sync.key} for {connection_id}: {error}",
            metadata=_open_window(store, sync, connection_id) if config.mode == "full" else {},
        ) from error
    except Exception as error:
        store.state.record_run(
            sync.key,
            connection_id,
            run_id=context.run.run_id,
            mode=config.mode,
            error=f"{type(error).__name__}: {error}",
        )
        raise
    if ran.deferred_to is not None:
        # Another drainer is live on the partition: this run's events are its events.
        metadata["deferred_to_run"] = ran.deferred_to
        return ran.merge, metadata
    for part in (ran.polled, ran.drained):
        for key, merged in (part.models if part is not None else {}).items():
            models.setdefault(key, MergeResult())
            models[key] += merged
    if ran.drained is not None:
        metadata["materializations_during_run"] = batches.recorded
        metadata.update(
            events_drained=ran.drained.events_done,
            events_retrying=ran.drained.events_retrying,
            events_dead=ran.drained.events_dead,
        )
    if ran.polled is not None:
        metadata.update(
            pages=ran.polled.pages,
            records_fetched=ran.polled.records,
            checkpoint=dg.MetadataValue.json(ran.polled.checkpoint or {}),
        )
        if ran.polled.window is not None:
            metadata.update(window_metadata(ran.polled.window), deleted_unseen=ran.polled.deleted_unseen)
    store.state.record_run(sync.key, connection_id, run_id=context.run.run_id, mode=config.mode, succeeded_at=utcnow())
    return ran.merge, metadata


def _reset_partition(
    context: dg.AssetExecutionContext,
    config: SyncRunConfig,
    store: "Store",
    sync: SyncDefinition,
    models: dict[str, MergeResult],
) -> tuple[MergeResult, dict[str, Any]]:
    """A reset run: under the partition's poll lease (waiting for a poll like any poll run), clear
    the checkpoint and keep, tombstone or remove the records (:meth:`Store.reset`)."""
    connection_id = context.partition_key
    if config.empty_records != "keep" and config.confirm != connection_id:
        raise dg.Failure(
            description=f"empty_records: {config.empty_records} deletes the records of {sync.key} for "
            f"{connection_id!r}; set confirm: {connection_id!r} in the run config to confirm it."
        )
    run_id = context.run.run_id
    try:
        from sync_project.orchestration.partition_run import reset_partition

        resets = reset_partition(
            store,
            sync,
            connection_id,
            records=config.empty_records,
            requested_by=run_id,
            wait_s=config.poll_lease_wait_s,
            ttl_s=config.lease_ttl_s,
            log=context.log,
        )
    except LeaseHeldError as error:
        raise _RunRefused(
            description=f"{error}; this run waited {config.poll_lease_wait_s:.0f} s and did nothing."
        ) from None
    reset = resets.pop(sync.key)
    for key, other in resets.items():
        context.log.info(other.describe())
        models[key] = MergeResult(deleted=other.tombstoned)
    context.log.info(reset.describe())
    return MergeResult(deleted=reset.tombstoned), {
        "mode": "reset",
        "records": reset.records,
        "tombstoned": reset.tombstoned,
        "removed": reset.removed,
        "checkpoint_cleared": reset.checkpoint_cleared,
        "reset_at": reset.reset_at.isoformat(),
    }


def window_metadata(window: "FullWindow") -> dict[str, Any]:
    """The whole full refresh, not just this run's share of it: a resumed one spans runs."""
    return {
        "full_refresh_started_at": window.started_at.isoformat(),
        "full_refresh_pages": window.pages,
        "full_refresh_records": window.records,
        "full_refresh_resumed_runs": window.runs - 1,
        "full_refresh_window": dg.MetadataValue.text(window.window_id),
    }


def _open_window(store: "Store", sync: SyncDefinition, connection_id: str) -> dict[str, Any]:
    """A failed run's share of an open full refresh, which the next full run resumes."""
    try:
        state = store.state.get(sync.key, connection_id)
    except StoreError:  # the database is what failed: the failure says so already
        return {}
    window = state.full_window if state is not None else None
    return {**window_metadata(window), "full_refresh_open": True} if window is not None else {}


#: Batches committed within this long of the last recorded materialization are recorded with the
#: next one: a standing drainer under a steady stream commits a batch per event, and one event-log
#: write per event would make Dagster's own storage the bottleneck and the asset's history unreadable.
MATERIALIZE_EVERY_S = 1.0


def _drain_result() -> "DrainResult":
    from sync_project.orchestration.webhook_drain import DrainResult

    return DrainResult()


class BatchMaterializations:
    """Records a partition as materialized while a drainer drains it, as its batches commit.

    A standing drainer runs for minutes; without this the partition would show its last
    materialization from before the run and "Materializing" until the run ends. Each recorded
    materialization carries the counts of the batches it covers; the run's MaterializeResult then
    records the batches since the last one and the run's totals. A standby drainer (an op, not
    the asset) records every partition it drains this way, and :meth:`flush` records the rest.
    """

    def __init__(
        self,
        log_event: Callable[[dg.AssetMaterialization], None],
        asset_key: dg.AssetKey,
        partition: str,
        store: "Store",
        sync: SyncDefinition,
    ) -> None:
        self._log_event = log_event
        self._asset_key = asset_key
        self._partition = partition
        self._store = store
        self._sync = sync
        self._pending = _drain_result()
        self._last = float("-inf")  # the run's first batch is recorded at once
        self.recorded = 0

    @classmethod
    def of_asset(
        cls, context: dg.AssetExecutionContext, store: "Store", sync: SyncDefinition
    ) -> "BatchMaterializations":
        return cls(context.log_event, own_asset_key(sync), context.partition_key, store, sync)

    def record(self, batch: "DrainResult") -> None:
        self._pending.add(batch)
        if time.monotonic() - self._last >= MATERIALIZE_EVERY_S:
            self.flush()

    @property
    def due(self) -> bool:
        """Batches wait to be recorded and the last record is a throttle interval old."""
        return bool(self._pending.batches) and time.monotonic() - self._last >= MATERIALIZE_EVERY_S

    def flush(self) -> None:
        """Record the batches not recorded yet (nothing if there are none)."""
        pending = self._pending
        if not pending.batches:
            return
        partition = self._partition
        self._log_event(
            dg.AssetMaterialization(
                asset_key=self._asset_key,
                partition=partition,
                description=f"{pending.batches} webhook batch(es) applied",
                metadata={
                    **pending.merge.as_dict(),
                    "mode": "webhook",
                    "batches": pending.batches,
                    "events_drained": pending.events_done,
                    "events_retrying": pending.events_retrying,
                    "events_dead": pending.events_dead,
                    "dagster/row_count": self._store.count(self._sync.key, partition),
                },
            )
        )
        # A sync of several models: each further model's asset with its own counts.
        for model in self._sync.models:
            key = self._sync.model_key(model.name)
            self._log_event(
                dg.AssetMaterialization(
                    asset_key=dg.AssetKey([self._sync.provider, model.name]),
                    partition=partition,
                    description=f"{pending.batches} webhook batch(es) applied",
                    metadata={
                        **pending.models.get(key, MergeResult()).as_dict(),
                        "mode": "webhook",
                        "sync": self._sync.key,
                        "dagster/row_count": self._store.count(key, partition),
                    },
                )
            )
        self.recorded += 1
        self._pending = _drain_result()
        self._last = time.monotonic()


def _notify(
    context: dg.AssetExecutionContext,
    notifier: SyncNotifier | None,
    sync: SyncDefinition,
    config: SyncRunConfig,
    started_at: datetime,
    results: SyncResults | None,
    error: str | None,
) -> NotificationOutcome | None:
    return send_notification(
        context.log, notifier, sync, context.partition_key, config.mode, context.run.run_id, started_at, results, error
    )


def send_notification(
    log: Any,
    notifier: SyncNotifier | None,
    sync: SyncDefinition,
    connection_id: str,
    mode: str,
    run_id: str,
    started_at: datetime,
    results: SyncResults | None,
    error: str | None,
) -> NotificationOutcome | None:
    """Send a run's (or a standby drainer's drain's) notification, if configured; log a failure
    as a warning. Never raises."""
    if notifier is None:
        return None
    try:
        notification = SyncNotification.build(
            provider=sync.provider,
            sync=sync.key,
            model=sync.model.__name__,
            connection_id=connection_id,
            mode=mode,
            run_id=run_id,
            started_at=started_at,
            finished_at=utcnow(),
            results=results,
            error=error,
        )
        outcome = notifier.send(notification)
    except Exception as failure:  # noqa: BLE001 - a notification must never fail the run
        outcome = NotificationOutcome("failed", f"failed, not sent: {type(failure).__name__}")
    if outcome.status == "failed":
        log.warning(f"sync notification {outcome}")
    else:
        log.info(f"sync notification {outcome}")
    return outcome
