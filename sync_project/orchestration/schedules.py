"""Polling: one schedule per sync (a sensor for sub-minute intervals, which cron cannot express).

Each tick requests one incremental run for every active connection of the sync's provider. Run
keys are deterministic per tick, so a tick evaluated twice never launches twice. Each run carries
``dagster/max_runtime`` (see :mod:`~sync_project.orchestration.run_limits`): a poll whose worker
died is failed by run monitoring after that long, and the next tick's run of its partition, queued
behind it by the one-run-per-partition limit, starts then.
"""


from datetime import datetime
from typing import Literal

import dagster as dg

from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import SyncRunConfig, op_name
from sync_project.orchestration.partitions import AssetJob, concurrency_tag, partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits

PollMode = Literal["full", "incremental"]


def poll_requests(
    context: dg.ScheduleEvaluationContext | dg.SensorEvaluationContext,
    sync: SyncDefinition,
    store_resource: StoreResource,
    tick: str,
    run_limits: RunLimits | None = None,
) -> list[dg.RunRequest]:
    """Incremental runs for the active connections that exist as partitions."""
    store = store_resource.get_store()
    registered = set(context.instance.get_dynamic_partitions(partitions_name(sync.provider)))
    requests = []
    for connection in store.connections.list(sync.provider, status="active"):
        if connection.connection_id not in registered:
            context.log.warning(
                f"{sync.key}: connection {connection.connection_id} has no partition in this Dagster "
                "instance; re-add it with `sync-project connections add` to register it"
            )
            continue
        run_config, tags = poll_run(sync, connection.connection_id, "incremental", run_limits)
        requests.append(
            dg.RunRequest(
                run_key=f"poll|{sync.key}|{connection.connection_id}|{tick}",
                partition_key=connection.connection_id,
                run_config=run_config,
                tags=tags,
            )
        )
    return requests


def poll_run(
    sync: SyncDefinition, connection_id: str, mode: PollMode, run_limits: RunLimits | None = None
) -> tuple[dg.RunConfig, dict[str, str]]:
    """The run config and tags of a poll of one partition, as schedules request it: the queue's
    one-poll-per-partition tag and the poll's maximum run time. The control API's triggers use
    these too, so a triggered run queues and is limited like a scheduled one."""
    tags = {
        **concurrency_tag(sync.key, connection_id, "poll"),
        "sync/mode": mode,
        **(run_limits or RunLimits()).poll_tags(sync),
    }
    return dg.RunConfig(ops={op_name(sync): SyncRunConfig(mode=mode)}), tags


def build_poll_sensor(sync: SyncDefinition, job: AssetJob, run_limits: RunLimits | None = None) -> dg.SensorDefinition:
    """The poller of a sync whose interval is below a minute (``sync.cron`` is None)."""
    interval = int(sync.poll_interval.total_seconds())

    @dg.sensor(
        name=f"poll_{op_name(sync)}",
        job=job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Polls {sync.key} every {interval} s (sub-minute: cron cannot express it).",
    )
    def _poll_sensor(context: dg.SensorEvaluationContext, sync_store: StoreResource) -> dg.SensorResult:
        tick = str(int(datetime.now().timestamp()) // interval)
        return dg.SensorResult(run_requests=poll_requests(context, sync, sync_store, tick, run_limits))

    return _poll_sensor


def build_poll_schedule(
    sync: SyncDefinition, job: AssetJob, run_limits: RunLimits | None = None
) -> dg.ScheduleDefinition:
    """The poller of a sync polled every minute or more slowly (``sync.cron``)."""
    name = f"poll_{op_name(sync)}"
    cron = sync.cron
    if cron is None:
        raise ValueError(f"{sync.key}: polled every {sync.poll_interval}, below cron's minute: use build_poll_sensor")

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Polls {sync.key} incrementally ({cron}) for every active connection.",
    )
    def _poll_schedule(context: dg.ScheduleEvaluationContext, sync_store: StoreResource) -> list[dg.RunRequest]:
        return poll_requests(context, sync, sync_store, context.scheduled_execution_time.isoformat(), run_limits)

    return _poll_schedule
