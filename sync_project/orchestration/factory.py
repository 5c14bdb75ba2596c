"""Turns declared syncs into Dagster definitions: assets, jobs, polling schedules, the inbox sensor."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import dagster as dg

from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import build_sync_asset, job_name, op_name
from sync_project.orchestration.partitions import AssetJob
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.schedules import build_poll_schedule
from sync_project.orchestration.sensors import DEFAULT_STALL_AFTER_S, DEFAULT_WEBHOOK_LINGER_S, build_inbox_sensor


def build_definitions(
    syncs: Sequence[SyncDefinition],
    providers: Mapping[str, Provider],
    *,
    store: StoreResource | None = None,
    extra_assets: Iterable[dg.AssetsDefinition] = (),
    inbox_stall_after_s: float = DEFAULT_STALL_AFTER_S,
    webhook_linger_s: float = DEFAULT_WEBHOOK_LINGER_S,
) -> dg.Definitions:
    assets = {sync.key: build_sync_asset(sync, providers[sync.provider]) for sync in syncs}
    jobs = {
        sync.key: dg.define_asset_job(
            name=job_name(sync),
            selection=dg.AssetSelection.assets(assets[sync.key]),
            description=f"Sync {sync.key}. Backfill: `dagster job backfill -j {job_name(sync)} --partitions a,b`.",
        )
        for sync in syncs
    }
    schedules = [build_poll_schedule(sync, jobs[sync.key]) for sync in syncs]
    sensors = [build_inbox_sensor({s.key: s for s in syncs}, jobs, stall_after_s=inbox_stall_after_s, linger_s=webhook_linger_s)]
    return dg.Definitions(
        assets=[*assets.values(), *extra_assets],
        jobs=list(jobs.values()),
        schedules=[s for s in schedules if isinstance(s, dg.ScheduleDefinition)],
        sensors=[*sensors, *(s for s in schedules if isinstance(s, dg.SensorDefinition))],
        resources={"sync_store": store or StoreResource()},
        # One asset per run: an in-process step saves the ~1 s of a step subprocess per run,
        # which is most of a webhook run's latency.
        executor=dg.in_process_executor,
    )
