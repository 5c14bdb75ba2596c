"""Standby drainers as Dagster runs them: one op job per provider with webhook syncs, and the
``standby_sensor`` that keeps one of its runs up per provider.

The run is a plain op job, not the assets' job: it materializes whichever partitions it drains,
and records each as an ``AssetMaterialization`` of that asset and partition, so the Partitions tab
shows them materialized as batches commit, with no run planned for any one partition (the tab
never shows one "Materializing" for ten minutes).

The sensor keeps the standby alive the way the inbox sensor keeps a partition's drainer: a run is
alive while it holds its standby lease (``leases``, role ``standby``, renewed every 10 s); shortly
before a standby's cap the sensor requests its successor (both drain meanwhile, the partition
leases keep them apart); a standby whose lease expired (its worker died) is replaced at once; and
a provider whose standbys keep failing gets a new one after a back-off (5 s doubling to 2 min), so
a broken standby costs at most 30 runs an hour, a healthy one six.

No ``from __future__ import annotations``: Dagster reads the op's config type at definition time.
"""

import time
from collections.abc import Mapping, Sequence
from datetime import timezone
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import BaseModel, Field

from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition
from sync_project.notifications.sync import SyncResults
from sync_project.orchestration.assets import STORE_KEY, BatchMaterializations, own_asset_key, send_notification
from sync_project.orchestration.notifications import NOTIFIER_KEY
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import RunLimits

if TYPE_CHECKING:
    from sync_project.store import LeaseState

#: Run slots per provider: the standby, its successor, a replacement beside a dead one still
#: counted as started (each slot is a value of the one-run-per-value concurrency tag).
STANDBY_SLOTS = 3
STANDBY_TAG = "sync/standby"
#: A standby lease this far past its expiry belongs to a dead run (a live one renews every 10 s).
DEAD_GRACE_S = 2.0
RETRY_BASE_S = 5.0
RETRY_MAX_S = 120.0
#: The standby's own lease lasts this long unless renewed (the store's ``leases.LEASE_TTL_S``,
#: not imported: the code location's import stays free of the store).
LEASE_TTL_S = 30.0


class StandbyConfig(dg.Config):
    """A standby drainer run (the standby sensor sets it)."""

    slot: int = Field(default=0, ge=0, lt=STANDBY_SLOTS)
    #: The run ends after this long; its successor has started by then.
    max_run_s: float = Field(default=600.0, gt=0, le=86400)
    #: A partition the standby took is released after this long without an event.
    idle_release_s: float = Field(default=10.0, gt=0, le=3600)
    lease_ttl_s: float = Field(default=LEASE_TTL_S, gt=0, le=3600)


def standby_job_name(provider: str) -> str:
    return f"{provider}_standby_drainer"


def standby_tags(provider: str, slot: int) -> dict[str, str]:
    return {
        "sync/mode": "standby",
        STANDBY_TAG: provider,
        # dagster.yaml's one run per value: never two standbys of a provider in one slot.
        "sync/asset_partition": f"standby:{provider}:{slot}",
    }


def build_standby_job(
    provider_name: str, provider: Provider, syncs: Sequence[SyncDefinition], *, notify: bool = True
) -> dg.JobDefinition:
    by_key = {sync.key: sync for sync in syncs if sync.provider == provider_name and sync.on_webhook is not None}
    if not by_key:
        raise ValueError(f"provider {provider_name} has no sync with an on_webhook handler")

    @dg.op(
        name=f"{provider_name}__standby",
        required_resource_keys={STORE_KEY, NOTIFIER_KEY} if notify else {STORE_KEY},
        description=f"Drains the first webhooks of any {provider_name} partition that has no drainer run.",
    )
    def standby_op(context: dg.OpExecutionContext, config: StandbyConfig) -> None:
        # The drain machinery is imported by the run that uses it, not with the code location.
        from sync_project.core import utcnow
        from sync_project.orchestration.standby import (
            HeldPartition,
            Partition,
            Standby,
            StandbySettings,
            standby_lease_key,
        )
        from sync_project.orchestration.webhook_drain import DrainResult

        store = getattr(context.resources, STORE_KEY).get_store()
        notifier = getattr(context.resources, NOTIFIER_KEY).get_notifier() if notify else None
        run_id = context.run.run_id
        recorders: dict[Partition, BatchMaterializations] = {}

        def recorder(sync: SyncDefinition, connection_id: str) -> BatchMaterializations:
            key = (sync.key, connection_id)
            if key not in recorders:
                asset_key = own_asset_key(sync)
                recorders[key] = BatchMaterializations(context.log_event, asset_key, connection_id, store, sync)
            return recorders[key]

        def on_batch(sync: SyncDefinition, connection_id: str, batch: DrainResult) -> None:
            recorder(sync, connection_id).record(batch)

        def on_release(held: HeldPartition, error: str | None) -> None:
            connection_id = held.connection.connection_id
            found = recorders.pop((held.sync.key, connection_id), None)
            if found is not None:
                found.flush()
            if error is not None:
                store.state.record_run(held.sync.key, connection_id, run_id=run_id, mode="webhook", error=error)
            elif held.drained.events_claimed:
                store.state.record_run(
                    held.sync.key, connection_id, run_id=run_id, mode="webhook", succeeded_at=utcnow()
                )
            if error is not None or held.drained.events_claimed:
                results = None if error is not None else SyncResults.of(held.drained.merge)
                send_notification(
                    context.log, notifier, held.sync, connection_id, "webhook", run_id, held.held_since, results, error
                )

        def handed_over() -> set[str]:
            # Any started drainer of a partition it holds waits for its lease: the successor the
            # inbox sensor requested (of this standby, or of the one before it).
            started = context.instance.get_runs(
                filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={"sync/mode": "webhook"})
            )
            return {run.tags[DRAIN_PARTITION_TAG] for run in started if DRAIN_PARTITION_TAG in run.tags}

        lease_sync, lease_connection = standby_lease_key(provider_name, config.slot)
        with store.leases.hold(
            lease_sync,
            lease_connection,
            "standby",
            run_id,
            ttl_s=config.lease_ttl_s,
            wait_s=config.lease_ttl_s + 5.0,
            log=context.log,
        ) as alive:

            def on_tick() -> None:
                alive.check()  # a standby that lost its own lease was taken for dead: it stops
                for found in recorders.values():
                    if found.due:
                        found.flush()

            standby = Standby(
                store,
                by_key,
                provider,
                run_id=run_id,
                log=context.log,
                settings=StandbySettings(
                    max_run_s=config.max_run_s, idle_release_s=config.idle_release_s, lease_ttl_s=config.lease_ttl_s
                ),
                on_batch=on_batch,
                on_release=on_release,
                handed_over=handed_over,
                on_tick=on_tick,
            )
            total = standby.run()
        context.log.info(
            f"standby {provider_name}: {total.events_done} event(s) of {len(standby.partitions_served)} partition(s) "
            f"drained in {total.batches} batch(es)"
        )

    @dg.job(
        name=standby_job_name(provider_name),
        description=(
            f"The {provider_name} standby drainer: listens for webhooks of every {provider_name} partition and drains "
            "those without a drainer run at once. Started and replaced by the standby sensor."
        ),
    )
    def standby_job() -> None:
        standby_op()

    return standby_job


class StandbyRequest(BaseModel):
    """The last standby of a provider the sensor requested for want of a live one."""

    run_key: str
    requested_at: float
    #: Requests in a row after which no standby was seen alive (the back-off's exponent).
    failures: int = 0


class StandbySensorCursor(BaseModel):
    requested: dict[str, StandbyRequest] = {}


_WILL_RUN = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _expires(lease: "LeaseState") -> float:
    expires = lease.expires_at
    if expires is None:
        return float("-inf")
    return (expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)).timestamp()


def _slot(run: dg.DagsterRun) -> int:
    tail = run.tags.get("sync/asset_partition", "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def build_standby_sensor(
    providers: Sequence[str], jobs: Mapping[str, dg.JobDefinition], run_limits: RunLimits | None = None
) -> dg.SensorDefinition:
    """Keeps one standby drainer run alive per provider of ``providers`` (``jobs`` by provider)
    that has an active connection."""
    limits = run_limits or RunLimits()
    cap_s = limits.standby_run_cap.total_seconds()
    lead_s = limits.handoff_lead.total_seconds()
    #: A standby started this long ago without holding its lease never will (it died starting).
    start_grace_s = LEASE_TTL_S + 5.0 + limits.webhook_margin.total_seconds()
    max_runtime = str(int(cap_s + start_grace_s))

    def request(provider: str, slot: int, run_key: str, **tags: str) -> dg.RunRequest:
        return dg.RunRequest(
            job_name=jobs[provider].name,
            run_key=run_key,
            run_config=dg.RunConfig(ops={f"{provider}__standby": StandbyConfig(slot=slot, max_run_s=cap_s)}),
            tags={**standby_tags(provider, slot), "dagster/max_runtime": max_runtime, **tags},
        )

    @dg.sensor(
        name="standby_sensor",
        jobs=list(jobs.values()),
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keeps a standby drainer run alive per provider: a successor before its cap, a replacement for a dead one.",
    )
    def standby_sensor(context: dg.SensorEvaluationContext, sync_store: StoreResource) -> dg.SensorResult:
        store = sync_store.get_store()
        cursor = StandbySensorCursor.model_validate_json(context.cursor) if context.cursor else StandbySensorCursor()
        now = time.time()
        runs = context.instance.get_run_records(
            filters=dg.RunsFilter(statuses=_WILL_RUN, tags={"sync/mode": "standby"})
        )
        leases = [lease for lease in store.leases.list() if lease.role == "standby" and lease.holder]
        # A provider without an active connection has nothing to drain: no process waits for it.
        connected = {connection.provider for connection in store.connections.list(status="active")}
        requests: list[dg.RunRequest] = []
        for provider in providers:
            if provider not in connected:
                continue
            own_runs = [r for r in runs if r.dagster_run.tags.get(STANDBY_TAG) == provider]
            own_leases = [lease for lease in leases if lease.sync == provider]
            live_holders = {lease.holder for lease in own_leases if _expires(lease) + DEAD_GRACE_S > now}
            dead_holders = {lease.holder for lease in own_leases} - live_holders
            live = [r for r in own_runs if r.dagster_run.run_id in live_holders]
            # On its way to holding its lease: queued, starting, or started recently (not one
            # whose lease expired: that one died).
            waiting = [
                r
                for r in own_runs
                if r.dagster_run.run_id not in live_holders | dead_holders
                and (r.start_time is None or now - r.start_time < start_grace_s)
            ]
            free = sorted(set(range(STANDBY_SLOTS)) - {_slot(r.dagster_run) for r in own_runs})
            if live:
                cursor.requested.pop(provider, None)  # a standby is up: no back-off is owed
            if waiting or not free:
                continue
            if live:
                newest = max(live, key=lambda r: r.start_time or 0.0)
                if newest.start_time is not None and now - newest.start_time >= cap_s - lead_s:
                    run_id = newest.dagster_run.run_id
                    requests.append(
                        request(
                            provider, free[0], f"standby|{provider}|successor|{run_id}", **{"sync/successor_of": run_id}
                        )
                    )
                continue
            if live_holders:
                continue  # its run has ended, not its lease: it is releasing, or dies within the TTL
            previous = cursor.requested.get(provider)
            if previous is not None and now - previous.requested_at < min(
                RETRY_MAX_S, RETRY_BASE_S * 2**previous.failures
            ):
                continue
            dead = max(own_leases, key=_expires, default=None)
            run_key = f"standby|{provider}|{int(now * 1000)}"
            tags: dict[str, str] = {}
            if dead is not None and dead.holder and (previous is None or dead.holder not in previous.run_key):
                run_key, tags = f"standby|{provider}|replaces|{dead.holder}", {"sync/replaces": str(dead.holder)}
                context.log.info(f"standby {provider}: {dead.holder[:8]}'s lease expired: replacing it")
            cursor.requested[provider] = StandbyRequest(
                run_key=run_key, requested_at=now, failures=0 if previous is None else previous.failures + 1
            )
            requests.append(request(provider, free[0], run_key, **tags))
        return dg.SensorResult(run_requests=requests, cursor=cursor.model_dump_json())

    return standby_sensor


def standby_providers(syncs: Sequence[SyncDefinition]) -> list[str]:
    """Providers with a sync that takes webhooks: each gets a standby drainer."""
    return sorted({sync.provider for sync in syncs if sync.on_webhook is not None})
