"""The inbox sensor: turns pending webhook events into webhook-mode runs, per (sync, connection).

Dagster keeps sensor run keys forever, so a key must name the work, not the tick: it is derived
from the partition's inbox high-water mark and its attempts so far. Pending events that a running
or queued run will drain produce the same key (no duplicate run); new events or a retry that has
come due produce a new one. One case keeps the same key although its run is over: a run that ended
before committing (its worker killed, failed by run monitoring, or done without claiming because
another run held the partition) leaves its events pending and untouched, and Dagster would skip
its key for good. So a partition with due events and no queued or draining webhook run, whose key
was requested before, is requested again under a new suffix (``|again<n>``) as soon as 5 s have
passed since that request, a wait that doubles with each retry up to ``stall_after_s``: the next
tick after a dead run is failed drains its partition, and a partition whose runs keep failing
costs one run every two minutes, not one per tick.
"""


import time
from collections import defaultdict
from collections.abc import Mapping

import dagster as dg
from pydantic import BaseModel

from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import SyncRunConfig, op_name
from sync_project.orchestration.partitions import AssetJob, concurrency_tag, connection_partitions
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits
from sync_project.store.inbox import DuePartition

#: Partitions requested per tick: keeps a tick (and its partition checks) far below the 60 s limit.
MAX_RUNS_PER_TICK = 200


#: The longest a partition with due events waits between two requests under the same events.
DEFAULT_STALL_AFTER_S = 120.0
#: The first wait before a key whose run is over is requested again: one tick. Doubles with each retry.
RETRY_BASE_S = 5.0


class RequestedRun(BaseModel):
    """The last run key requested for one (sync, connection), and when."""

    base_key: str
    run_key: str
    requested_at: float
    retries: int = 0


class InboxSensorCursor(BaseModel):
    """What the sensor remembers between ticks (stored by Dagster as JSON)."""

    #: Highest inbox id seen (shown in the UI).
    high_water_mark: int = 0
    requested_runs: int = 0
    #: Keyed by "sync|connection"; only partitions that are due now are kept, so it stays small.
    requested: dict[str, RequestedRun] = {}

    def run_key_for(self, partition: str, base_key: str, now: float, stall_after_s: float) -> str:
        """The key to request for ``partition``, which has due events and no queued or draining
        webhook run.

        Called only for such partitions, so a key requested before names a run that is over (or
        one its tick never created). Within the back-off after that request the same key is
        requested again, which Dagster skips if its run exists and creates if not; after it, a
        new key, since Dagster skips a key it has seen whatever became of its run.
        """
        previous = self.requested.get(partition)
        if previous is None or previous.base_key != base_key:
            self.requested[partition] = RequestedRun(base_key=base_key, run_key=base_key, requested_at=now)
        elif now - previous.requested_at >= retry_delay_s(previous.retries, stall_after_s):
            retries = previous.retries + 1
            self.requested[partition] = RequestedRun(
                base_key=base_key, run_key=f"{base_key}|again{retries}", requested_at=now, retries=retries
            )
        return self.requested[partition].run_key


def retry_delay_s(retries: int, stall_after_s: float) -> float:
    """How long after its last request a partition whose run ended with its events due waits."""
    return min(stall_after_s, RETRY_BASE_S * 2**retries)


#: A webhook run in one of these states will claim whatever is pending when (or while) it drains.
_WILL_CLAIM = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
#: Webhook runs keep claiming this long after their last event (see SyncRunConfig.linger_s).
DEFAULT_WEBHOOK_LINGER_S = 20.0


def waiting_partitions(instance: dg.DagsterInstance) -> set[str]:
    """The ``sync/asset_partition`` tags of webhook runs that are queued or draining."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_WILL_CLAIM, tags={"sync/mode": "webhook"}))
    return {run.tags["sync/asset_partition"] for run in runs if "sync/asset_partition" in run.tags}


def base_run_key(partition: DuePartition) -> str:
    """Names the pending work: new events raise ``max_id``, a failure raises ``attempts`` and a
    replay moves ``requeued_at``, so each gets a key Dagster has never seen."""
    key = f"inbox|{partition.sync}|{partition.connection_id}|{partition.max_id}|{partition.attempts}"
    if partition.requeued_at is not None:
        key += f"|{int(partition.requeued_at.timestamp() * 1_000_000)}"
    return key


def build_inbox_sensor(
    syncs: Mapping[str, SyncDefinition],
    jobs: Mapping[str, AssetJob],
    *,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    linger_s: float = DEFAULT_WEBHOOK_LINGER_S,
    run_limits: RunLimits | None = None,
) -> dg.SensorDefinition:
    """``run_limits`` sets each webhook run's linger cap and its ``dagster/max_runtime``."""
    limits = run_limits or RunLimits()
    run_config_by_sync = {
        key: dg.RunConfig(
            ops={
                op_name(sync): SyncRunConfig(
                    mode="webhook", linger_s=linger_s, max_linger_run_s=limits.webhook_linger_cap.total_seconds()
                )
            }
        )
        for key, sync in syncs.items()
    }

    @dg.sensor(
        name="inbox_sensor",
        jobs=list(jobs.values()),
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests a webhook-mode run for every (sync, connection) with due inbox events.",
    )
    def inbox_sensor(context: dg.SensorEvaluationContext, sync_store: StoreResource) -> dg.SensorResult | dg.SkipReason:
        store = sync_store.get_store()
        cursor = InboxSensorCursor.model_validate_json(context.cursor) if context.cursor else InboxSensorCursor()
        high_water_mark = store.inbox.high_water_mark()
        due = [p for p in store.inbox.due_partitions(limit=MAX_RUNS_PER_TICK) if p.sync in syncs]
        cursor.high_water_mark = high_water_mark
        due_keys = {f"{p.sync}|{p.connection_id}" for p in due}
        cursor.requested = {key: value for key, value in cursor.requested.items() if key in due_keys}
        if not due:
            context.update_cursor(cursor.model_dump_json())
            return dg.SkipReason(f"no due inbox events (high-water mark {high_water_mark})")

        paused = {(c.provider, c.connection_id) for c in store.connections.list(status="paused")}
        waiting = waiting_partitions(context.instance)
        by_provider: dict[str, set[str]] = defaultdict(set)
        requests = []
        now = time.time()
        for partition in due:
            sync = syncs[partition.sync]
            if (sync.provider, partition.connection_id) in paused:
                continue
            tag = concurrency_tag(sync.key, partition.connection_id, "drain")
            if tag["sync/asset_partition"] in waiting:
                # A queued or draining run will claim these events too: another would idle.
                continue
            run_key = cursor.run_key_for(
                f"{partition.sync}|{partition.connection_id}", base_run_key(partition), now, stall_after_s
            )
            by_provider[sync.provider].add(partition.connection_id)
            requests.append(
                dg.RunRequest(
                    job_name=jobs[sync.key].name,
                    partition_key=partition.connection_id,
                    run_key=run_key,
                    run_config=run_config_by_sync[sync.key],
                    tags={
                        **tag,
                        **limits.webhook_tags(),
                        "sync/mode": "webhook",
                        "sync/inbox_high_water_mark": str(partition.max_id),
                    },
                )
            )
        additions = []
        for provider, connection_ids in by_provider.items():
            partitions = connection_partitions(provider)
            known = set(context.instance.get_dynamic_partitions(partitions.name or ""))
            missing = sorted(connection_ids - known)
            if missing:
                additions.append(partitions.build_add_request(missing))
        cursor.requested_runs += len(requests)
        return dg.SensorResult(
            run_requests=requests, dynamic_partitions_requests=additions, cursor=cursor.model_dump_json()
        )

    return inbox_sensor
