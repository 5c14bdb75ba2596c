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

Standing drainers: a webhook run keeps claiming while its partition has traffic (``linger_s``
without an event ends it) up to its cap (``RunLimits.webhook_linger_cap``). So that a partition
with steady traffic is never without a drainer, the sensor requests a successor once the drainer
holding the partition's drain lease has run for its cap less ``handoff_lead``: the successor
starts while the drainer still drains, waits for its lease (``handoff_wait_s``), and claims
within one lease poll of its release. A drainer whose lease expired while Dagster still counts
its run as started died with its worker: the sensor requests a replacement at once, which takes
the expired lease, instead of leaving the partition undrained until run monitoring fails the
dead run at its ``dagster/max_runtime``. A partition whose lease the provider's standby drainer
holds (:mod:`sync_project.orchestration.standby`: it drained the partition's first events after a
quiet spell at once) gets its own drainer the same way, as the standby's successor; the standby
hands the partition over once that run has started. Each partition has ``DRAIN_SLOTS`` concurrency slots
(drainer, successor, replacement), so these never queue behind the run they take over from.

Only registered connections get runs: events of a connection that was removed are ``orphaned``
(``connections remove`` does it in its transaction; the sensor catches the few a receiver routed
from a snapshot older than the removal), so a removed partition is never re-added nor run.
"""

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import BaseModel

from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import SyncRunConfig, op_name
from sync_project.orchestration.partitions import (
    DRAIN_SLOTS,
    AssetJob,
    connection_partitions,
    drain_partition_of,
    drain_slot,
    drain_tags,
)
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits

if TYPE_CHECKING:
    from sync_project.store import DuePartition, Store

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
#: Webhook runs keep claiming this long after their last event (see SyncRunConfig.linger_s): a
#: partition with an event in the last five minutes has a standing drainer, and its next event is
#: applied as it commits; a partition quiet for longer pays one run start (the cold case).
DEFAULT_WEBHOOK_LINGER_S = 300.0
#: A drain lease past its expiry by this much, still held by a started run, means that run's
#: worker is dead (a live one renews every third of the TTL).
DEAD_LEASE_GRACE_S = 2.0


@dataclass
class PartitionDrainers:
    """The webhook runs of one (sync, connection) that will claim, and its drain lease."""

    runs: list[dg.RunRecord] = field(default_factory=list)
    holder: str | None = None
    expires_at: datetime | None = None
    token: int = 0

    def slots(self) -> set[int]:
        return {drain_slot(record.dagster_run.tags) for record in self.runs}

    def free_slot(self) -> int | None:
        return next((slot for slot in range(DRAIN_SLOTS) if slot not in self.slots()), None)

    def holder_run(self) -> dg.RunRecord | None:
        return next((r for r in self.runs if r.dagster_run.run_id == self.holder), None)

    def holder_is_dead(self, now: datetime) -> bool:
        """Its lease expired while still held: its run's worker died (a run that ends releases
        it), whether Dagster still counts that run as started or its code server failed it."""
        return (
            self.holder is not None
            and self.expires_at is not None
            and (now - self.expires_at).total_seconds() > DEAD_LEASE_GRACE_S
        )

    def waiting(self, now: float, stale_after_s: float) -> list[dg.RunRecord]:
        """Runs other than the holder still on their way to draining: queued, or started recently
        enough that they may be waiting for the lease (older ones died before taking it)."""
        waiting = []
        for record in self.runs:
            if record.dagster_run.run_id == self.holder:
                continue
            started = record.start_time or record.create_timestamp.timestamp()
            if record.dagster_run.status in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED) or (
                now - started < stale_after_s
            ):
                waiting.append(record)
        return waiting


def partition_drainers(instance: dg.DagsterInstance, store: "Store") -> dict[str, PartitionDrainers]:
    """Webhook runs that will claim, and the drain leases, by ``sync:connection``."""
    by_partition: dict[str, PartitionDrainers] = defaultdict(PartitionDrainers)
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=_WILL_CLAIM, tags={"sync/mode": "webhook"}))
    for record in records:
        partition = drain_partition_of(record.dagster_run.tags)
        if partition is not None:
            by_partition[partition].runs.append(record)
    for lease in store.leases.list():
        # Every held drain lease, also of partitions with no run that will claim: a drainer that
        # ended without releasing its lease (its worker was killed, and its code server failed
        # the run) is a partition that lost its drainer.
        if lease.role == "drain" and lease.holder is not None:
            expires_at = lease.expires_at
            if expires_at is not None and expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=timezone.utc)
            found = by_partition[f"{lease.sync}:{lease.connection_id}"]
            found.holder, found.expires_at, found.token = lease.holder, expires_at, lease.token
    return dict(by_partition)


def standby_runs(instance: dg.DagsterInstance) -> set[str]:
    """Run ids of the standby drainers that are queued or running (any provider)."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_WILL_CLAIM, tags={"sync/mode": "standby"}))
    return {run.run_id for run in runs}


def waiting_partitions(instance: dg.DagsterInstance) -> set[str]:
    """The ``sync/asset_partition`` tags of webhook runs that are queued or draining."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_WILL_CLAIM, tags={"sync/mode": "webhook"}))
    return {run.tags["sync/asset_partition"] for run in runs if "sync/asset_partition" in run.tags}


def base_run_key(partition: "DuePartition") -> str:
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
    """``run_limits`` sets each webhook run's linger cap, its successor's lead and wait, and its
    ``dagster/max_runtime``."""
    limits = run_limits or RunLimits()
    cap_s = limits.webhook_linger_cap.total_seconds()
    lead_s = limits.handoff_lead.total_seconds()
    handoff_wait_s = limits.handoff_wait.total_seconds()

    def run_config(sync: SyncDefinition, *, successor: bool) -> dg.RunConfig:
        config = SyncRunConfig(
            mode="webhook",
            linger_s=linger_s,
            max_linger_run_s=cap_s,
            handoff_wait_s=handoff_wait_s if successor else 0.0,
        )
        return dg.RunConfig(ops={op_name(sync): config})

    def request(
        sync: SyncDefinition,
        connection_id: str,
        slot: int,
        run_key: str,
        high_water_mark: str,
        successor: bool,
        **tags: str,
    ) -> dg.RunRequest:
        return dg.RunRequest(
            job_name=jobs[sync.key].name,
            partition_key=connection_id,
            run_key=run_key,
            run_config=run_config(sync, successor=successor),
            tags={
                **drain_tags(sync.key, connection_id, slot),
                **limits.webhook_tags(),
                "sync/mode": "webhook",
                "sync/inbox_high_water_mark": high_water_mark,
                **tags,
            },
        )

    @dg.sensor(
        name="inbox_sensor",
        jobs=list(jobs.values()),
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Keeps a drainer on every (sync, connection) with webhook traffic: requests a webhook-mode run for due "
            "inbox events, a successor shortly before a standing drainer's cap, a replacement for a dead one."
        ),
    )
    def inbox_sensor(context: dg.SensorEvaluationContext, sync_store: StoreResource) -> dg.SensorResult | dg.SkipReason:
        store = sync_store.get_store()
        cursor = InboxSensorCursor.model_validate_json(context.cursor) if context.cursor else InboxSensorCursor()
        high_water_mark = store.inbox.high_water_mark()
        due = [p for p in store.inbox.due_partitions(limit=MAX_RUNS_PER_TICK) if p.sync in syncs]
        registered = {(c.provider, c.connection_id): c.status for c in store.connections.list()}
        paused = {key for key, status in registered.items() if status == "paused"}
        # A removed connection's events were orphaned with it; ones a receiver routed from a
        # snapshot older than the removal are orphaned here. Its partition is never added back.
        for gone in due:
            provider = syncs[gone.sync].provider
            if (provider, gone.connection_id) not in registered:
                orphaned = store.inbox.orphan_unregistered(provider, gone.connection_id)
                if orphaned:
                    context.log.info(
                        f"{gone.sync}:{gone.connection_id}: no such connection: {orphaned} pending "
                        "event(s) orphaned (`connections add` of it makes them pending again)"
                    )
        due = [p for p in due if (syncs[p.sync].provider, p.connection_id) in registered]
        cursor.high_water_mark = high_water_mark
        due_keys = {f"{p.sync}|{p.connection_id}" for p in due}
        cursor.requested = {key: value for key, value in cursor.requested.items() if key in due_keys}
        drainers = partition_drainers(context.instance, store)
        standbys = standby_runs(context.instance) if any(d.holder for d in drainers.values()) else set()
        now = time.time()
        now_utc = datetime.fromtimestamp(now, timezone.utc)
        stale_after_s = handoff_wait_s + limits.webhook_margin.total_seconds()
        requests: list[dg.RunRequest] = []
        # Standing drainers first: a successor before one reaches its cap, a replacement for a dead one.
        handled: set[str] = set()
        for partition, found in drainers.items():
            sync_key, _, connection_id = partition.partition(":")
            sync = syncs.get(sync_key)
            if sync is None or (sync.provider, connection_id) not in registered or found.waiting(now, stale_after_s):
                continue
            holder = found.holder_run()
            slot = found.free_slot()
            if found.holder is None or slot is None:
                continue
            if found.holder_is_dead(now_utc):
                handled.add(partition)
                if (sync.provider, connection_id) in paused:
                    continue
                context.log.info(f"{partition}: drainer {found.holder[:8]}'s lease expired: replacing it")
                requests.append(
                    request(
                        sync,
                        connection_id,
                        slot,
                        f"replace|{sync_key}|{connection_id}|{found.holder}",
                        str(high_water_mark),
                        successor=False,
                        **{"sync/replaces": found.holder},
                    )
                )
                continue
            if holder is None:
                if found.holder in standbys:
                    # The provider's standby drains this partition (its first events after a
                    # quiet spell): its own standing drainer takes over from it, as a successor.
                    handled.add(partition)
                    if (sync.provider, connection_id) not in paused:
                        requests.append(
                            request(
                                sync,
                                connection_id,
                                slot,
                                f"promote|{sync_key}|{connection_id}|{found.token}",
                                str(high_water_mark),
                                successor=True,
                                **{"sync/successor_of": found.holder},
                            )
                        )
                continue
            handled.add(partition)
            if holder.start_time is not None and now - holder.start_time >= cap_s - lead_s:
                requests.append(
                    request(
                        sync,
                        connection_id,
                        slot,
                        f"handoff|{sync_key}|{connection_id}|{holder.dagster_run.run_id}",
                        str(high_water_mark),
                        successor=True,
                        **{"sync/successor_of": holder.dagster_run.run_id},
                    )
                )
        by_provider: dict[str, set[str]] = defaultdict(set)
        for due_partition in due:
            sync = syncs[due_partition.sync]
            key = f"{due_partition.sync}:{due_partition.connection_id}"
            if (sync.provider, due_partition.connection_id) in paused or key in handled:
                continue
            found = drainers.get(key, PartitionDrainers())
            holder = found.holder_run()
            if (holder is not None and not found.holder_is_dead(now_utc)) or found.waiting(now, stale_after_s):
                # A draining or queued run will claim these events too: another would idle.
                continue
            slot = found.free_slot()
            if slot is None:
                continue
            run_key = cursor.run_key_for(
                f"{due_partition.sync}|{due_partition.connection_id}", base_run_key(due_partition), now, stall_after_s
            )
            by_provider[sync.provider].add(due_partition.connection_id)
            requests.append(
                request(sync, due_partition.connection_id, slot, run_key, str(due_partition.max_id), successor=False)
            )
        if not requests:
            context.update_cursor(cursor.model_dump_json())
            if not due:
                return dg.SkipReason(f"no due inbox events (high-water mark {high_water_mark})")
            return dg.SkipReason(f"{len(due)} partition(s) with due events, each with a drainer")
        # Only connections of the table get runs (above), so these are partitions derived from it,
        # as connection_partitions_sensor derives them: added in this tick so its runs can start.
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
