"""Polling: one schedule per sync (a sensor for sub-minute intervals, which cron cannot express),
and one sensor for the connections that have a poll interval of their own.

Each tick requests one run for every active connection it covers: an incremental poll, or a full
refresh when one is due for that connection (its cadence elapsed, or a killed one is open and
resumes; see :mod:`~sync_project.orchestration.cadence`). Run keys are deterministic per tick, so
a tick evaluated twice never launches twice. Each run carries ``dagster/max_runtime`` (see
:mod:`~sync_project.orchestration.run_limits`): a poll whose worker died is failed by run
monitoring after that long, and the next tick's run of its partition, queued behind it by the
one-run-per-partition limit, starts then (a full refresh resumes where the dead one stopped).

The sync's schedule skips the connections with their own interval; ``poll_per_connection``, a
sensor evaluated every 30 s, polls each of those once per interval-long slot of the epoch
(``poll|sync|connection|<interval>s|<slot>`` as run key): faster or slower than the sync's.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

import dagster as dg

from sync_project.core.sync import SyncDefinition
from sync_project.orchestration import cadence
from sync_project.orchestration.assets import SyncRunConfig, job_name, op_name
from sync_project.orchestration.partitions import AssetJob, concurrency_tag, partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits
from sync_project.store import ProviderConnection

if TYPE_CHECKING:
    from sync_project.store import Store

PollMode = Literal["full", "incremental"]
PER_CONNECTION_SENSOR = "poll_per_connection"
#: How often the per-connection sensor looks: the shortest poll interval a connection may set.
PER_CONNECTION_EVERY_S = 30
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _full_refreshes_in_flight(instance: dg.DagsterInstance, sync: SyncDefinition) -> set[str]:
    """Partitions with a full run queued or running: a tick leaves their full refresh to it."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=job_name(sync), statuses=_IN_FLIGHT, tags={"sync/mode": "full"})
    )
    return {run.tags.get("dagster/partition", "") for run in runs}


def poll_requests(
    context: dg.ScheduleEvaluationContext | dg.SensorEvaluationContext,
    sync: SyncDefinition,
    store_resource: StoreResource,
    tick: str,
    run_limits: RunLimits | None = None,
    *,
    now: datetime | None = None,
    connections: Sequence[ProviderConnection] | None = None,
) -> list[dg.RunRequest]:
    """A run for each active connection whose partition exists already (``connections``: those
    of the sync's provider that the sync's schedule covers, by default), full when one is due."""
    store = store_resource.get_store()
    now = now or datetime.now(timezone.utc)
    registered = set(context.instance.get_dynamic_partitions(partitions_name(sync.provider)))
    if connections is None:
        connections = [
            c
            for c in store.connections.list(sync.provider, status="active")
            if not cadence.has_own_poll_interval(sync, c)
        ]
    states = store.state.of_sync(sync.key) if connections else {}
    in_flight: set[str] | None = None
    requests = []
    for connection in connections:
        if connection.connection_id not in registered:
            # Added a moment ago elsewhere: connection_partitions_sensor derives its partition
            # from the table within its interval, and the next tick polls it.
            continue
        mode: PollMode = "incremental"
        reason = cadence.full_refresh_due(sync, connection, states.get(connection.connection_id), now)
        if reason is not None:
            if in_flight is None:
                in_flight = _full_refreshes_in_flight(context.instance, sync)
            if connection.connection_id not in in_flight:
                mode = "full"
        run_config, tags = poll_run(sync, connection.connection_id, mode, run_limits)
        if mode == "full":
            tags["sync/full_refresh"] = str(reason)
        requests.append(
            dg.RunRequest(
                run_key=f"poll|{sync.key}|{connection.connection_id}|{tick}",
                partition_key=connection.connection_id,
                run_config=run_config,
                tags=tags,
                job_name=job_name(sync),
            )
        )
    return requests


def poll_run(
    sync: SyncDefinition, connection_id: str, mode: PollMode, run_limits: RunLimits | None = None
) -> tuple[dg.RunConfig, dict[str, str]]:
    """The run config and tags of a poll of one partition, as schedules request it: the queue's
    one-poll-per-partition tag and the poll's maximum run time (a full refresh's is longer). The
    control API's triggers use these too, so a triggered run queues and is limited like a
    scheduled one."""
    limits = run_limits or RunLimits()
    tags = {
        **concurrency_tag(sync.key, connection_id, "poll"),
        "sync/mode": mode,
        **(limits.full_refresh_tags(sync) if mode == "full" else limits.poll_tags(sync)),
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
        description=f"Polls {sync.key} ({cron}) for every active connection without a poll interval of "
        "its own: incrementally, or a full refresh when one is due.",
    )
    def _poll_schedule(context: dg.ScheduleEvaluationContext, sync_store: StoreResource) -> list[dg.RunRequest]:
        return poll_requests(
            context,
            sync,
            sync_store,
            context.scheduled_execution_time.isoformat(),
            run_limits,
            now=context.scheduled_execution_time,
        )

    return _poll_schedule


def per_connection_requests(
    context: dg.SensorEvaluationContext,
    syncs: Sequence[SyncDefinition],
    store_resource: StoreResource,
    run_limits: RunLimits | None,
    now: datetime,
) -> list[dg.RunRequest]:
    """Runs for the connections with a poll interval of their own, one per slot of it."""
    store: Store = store_resource.get_store()
    by_provider: dict[str, list[ProviderConnection]] = {}
    requests: list[dg.RunRequest] = []
    for sync in syncs:
        if sync.provider not in by_provider:
            by_provider[sync.provider] = store.connections.list(sync.provider, status="active")
        for connection in by_provider[sync.provider]:
            if not cadence.has_own_poll_interval(sync, connection):
                continue
            interval = cadence.poll_interval(sync, connection)
            tick = f"{int(interval.total_seconds())}s|{cadence.poll_slot(interval, now)}"
            requests += poll_requests(
                context, sync, store_resource, tick, run_limits, now=now, connections=[connection]
            )
    return requests


def build_per_connection_sensor(
    syncs: Sequence[SyncDefinition], jobs: Mapping[str, AssetJob], run_limits: RunLimits | None = None
) -> dg.SensorDefinition:
    @dg.sensor(
        name=PER_CONNECTION_SENSOR,
        jobs=[jobs[sync.key] for sync in syncs],
        minimum_interval_seconds=PER_CONNECTION_EVERY_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Polls the connections that have a poll interval of their own "
        "(`sync-project connections set PROVIDER ID --poll-interval 2m`), once per interval.",
    )
    def _per_connection(context: dg.SensorEvaluationContext, sync_store: StoreResource) -> dg.SensorResult:
        return dg.SensorResult(
            run_requests=per_connection_requests(context, syncs, sync_store, run_limits, datetime.now(timezone.utc))
        )

    return _per_connection
