"""Turns declared syncs into Dagster definitions: assets, jobs, polling schedules, the inbox sensor,
the sensor that derives the connection partitions from the store's connections table,
the checks of every sync and the schedule that runs them, and each sync's warehouse asset with the
automation sensor that keeps it following its sync."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import dagster as dg

from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import STORE_KEY, build_sync_asset, job_name
from sync_project.orchestration.checks import CheckSettings, build_checks_job
from sync_project.orchestration.connection_partitions import build_connection_partitions_sensor
from sync_project.orchestration.notifications import NOTIFIER_KEY, NotifierResource
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits
from sync_project.orchestration.schedules import build_per_connection_sensor, build_poll_schedule, build_poll_sensor
from sync_project.orchestration.sensors import DEFAULT_STALL_AFTER_S, DEFAULT_WEBHOOK_LINGER_S, build_inbox_sensor
from sync_project.orchestration.standby_job import build_standby_job, build_standby_sensor, standby_providers
from sync_project.warehouse.assets import (
    WAREHOUSE_KEY,
    WarehouseResource,
    build_warehouse_asset,
    build_warehouse_sensor,
)
from sync_project.warehouse.columns import warehouse_tables

AUTOMATION_SENSOR = "automation_condition_sensor"
AUTOMATION_INTERVAL_S = 30


def build_definitions(
    syncs: Sequence[SyncDefinition],
    providers: Mapping[str, Provider],
    *,
    store: StoreResource | None = None,
    extra_assets: Iterable[dg.AssetsDefinition] = (),
    inbox_stall_after_s: float = DEFAULT_STALL_AFTER_S,
    webhook_linger_s: float = DEFAULT_WEBHOOK_LINGER_S,
    notifier: NotifierResource | None = None,
    check_settings: CheckSettings | None = None,
    run_limits: RunLimits | None = None,
    warehouse: WarehouseResource | None = None,
    standby_drainers: bool = True,
) -> dg.Definitions:
    """``notifier`` defaults to :meth:`NotifierResource.from_env` (off unless ``SYNC_NOTIFY_URL``);
    ``run_limits`` are the ``dagster/max_runtime`` of the runs the sensor and schedules request;
    ``warehouse`` defaults to the environment's (``SYNC_WAREHOUSE_*``: the DuckDB file by default).
    ``standby_drainers`` adds a standby drainer job per provider with webhook syncs and the
    ``standby_sensor`` that keeps one running."""
    settings = check_settings or CheckSettings()
    assets = {
        sync.key: build_sync_asset(sync, providers[sync.provider], notify=True, check_settings=settings)
        for sync in syncs
    }
    # One warehouse table per model: a sync of several models has an asset per model upstream.
    warehouse_assets = [
        build_warehouse_asset(table, store_key=STORE_KEY) for sync in syncs for table in warehouse_tables(sync)
    ]
    jobs = {
        sync.key: dg.define_asset_job(
            name=job_name(sync),
            # The asset with the checks it reports for its partition.
            selection=dg.AssetSelection.assets(assets[sync.key]),
            description=f"Sync {sync.key}. Backfill: `dagster job backfill -j {job_name(sync)} --partitions a,b`.",
        )
        for sync in syncs
    }
    # Cron cannot express an interval below a minute: those syncs poll from a sensor.
    schedules = [build_poll_schedule(sync, jobs[sync.key], run_limits) for sync in syncs if sync.cron]
    sensors: list[dg.SensorDefinition] = [
        build_inbox_sensor(
            {s.key: s for s in syncs},
            jobs,
            stall_after_s=inbox_stall_after_s,
            linger_s=webhook_linger_s,
            run_limits=run_limits,
        ),
        *(build_poll_sensor(sync, jobs[sync.key], run_limits) for sync in syncs if not sync.cron),
        *([build_per_connection_sensor(syncs, jobs, run_limits)] if syncs else []),
        # The connection partitions follow the store's connections table.
        *([build_connection_partitions_sensor([sync.provider for sync in syncs])] if syncs else []),
    ]
    if warehouse_assets:
        sensors.append(build_warehouse_sensor(warehouse_assets))
    extra = list(extra_assets)
    automated = [asset for asset in extra if any(spec.automation_condition is not None for spec in asset.specs)]
    if automated:
        # The downstream assets' declarative automation (analytics), running from the start:
        # Dagster's implicit sensor would start stopped.
        sensors.append(
            dg.AutomationConditionSensorDefinition(
                AUTOMATION_SENSOR,
                target=dg.AssetSelection.assets(*automated),
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=AUTOMATION_INTERVAL_S,
                description="Evaluates the automation conditions of the downstream assets (analytics).",
            )
        )
    if standby_drainers:
        standby_jobs = {
            provider: build_standby_job(provider, providers[provider], syncs) for provider in standby_providers(syncs)
        }
        if standby_jobs:
            sensors.append(build_standby_sensor(list(standby_jobs), standby_jobs, run_limits))
    else:
        standby_jobs = {}
    checks_jobs: list[dg.JobDefinition] = []
    if syncs:
        checks_job, checks_schedule = build_checks_job(syncs, {key: job.name for key, job in jobs.items()}, settings)
        checks_jobs.append(checks_job)
        schedules.append(checks_schedule)
    return dg.Definitions(
        assets=[*assets.values(), *warehouse_assets, *extra],
        jobs=[*jobs.values(), *standby_jobs.values(), *checks_jobs],
        schedules=schedules,
        sensors=sensors,
        resources={
            STORE_KEY: store or StoreResource(),
            NOTIFIER_KEY: notifier if notifier is not None else NotifierResource.from_env(),
            WAREHOUSE_KEY: warehouse or WarehouseResource(),
        },
        # One asset per run: an in-process step saves the ~1 s of a step subprocess per run,
        # which is most of a webhook run's latency.
        executor=dg.in_process_executor,
    )
