"""Asset checks of a sync: is each connection's inbox drained, has anything been dead-lettered, is
each connection fresh.

Four checks on the sync's asset, each partitioned like it (one result per connection), because
Dagster's *Checks* tab shows a partition's result only while it targets that partition's latest
materialization (``targets_latest_materialization``, ``AssetCheckPartitionInfo.is_current``): a
standalone check over all connections, run on a schedule, was hidden by the next materialization
of any connection, so it read "Not evaluated" while it was failing.

- **With every run** of a partition (results in its ``MaterializeResult``; a run that fails yields
  them before it raises, so its checks read as evaluated, not as failed by the run's failure):
  ``inbox_backlog``, ``dead_letters``, ``connections_fresh`` and ``inbox_healthy``.
- **Between runs**, ``sync_checks_job`` (``sync_checks_schedule``, every 5 minutes, or *Launch* in
  the UI) evaluates ``connections_fresh`` and ``inbox_healthy`` of every connection partition and
  records each against that partition's latest materialization, so they stay shown until the
  partition's next run reports newer ones. These catch what per-run checks cannot: a connection
  nothing runs for any more (schedule off, sensor failing, its runs stuck) looks fine forever to
  a check that only runs with its runs.

On top of that each sync asset carries a ``FreshnessPolicy`` (the 1.13 API), which Dagster's
freshness daemon evaluates against the asset's newest materialization of *any* partition: it
says "this sync has stopped altogether" without running anything; ``connections_fresh`` says
which connection is late.

Severities, and why none of them blocks:

- ``dead_letters`` fails with ERROR: an event was given up on after its retries and waits for a
  person (``sync-project inbox replay --status dead``); until the next full refresh the records
  may miss that change.
- ``inbox_backlog`` fails with WARN when a claimable event has waited longer than
  ``backlog_max_wait`` (5 min), naming each such connection and why it is not draining, from its
  newest webhook run in Dagster: none was requested (daemon or sensor not running), one is queued
  (the queue is not starting it), one has been running past its ``dagster/max_runtime`` (its worker
  died and run monitoring has not failed it), the last one failed, or the last one ended long ago.
  A connection whose webhook run started recently is draining, only behind. Events waiting for a
  retry are reported but do not fail it: they wait on purpose.
- ``connections_fresh`` fails with WARN when an active connection's last successful run is older
  than ``poll_interval * freshness_warn_factor`` (2x), with ERROR beyond
  ``poll_interval * freshness_fail_factor`` (3x); paused connections are not expected to sync.
- ``inbox_healthy`` is ``dead_letters`` (ERROR) and ``inbox_backlog`` (WARN) in one, the one the
  schedule refreshes; its text names why a connection is not draining, read from the instance.

None is ``blocking``: a blocking failure would stop downstream assets in the same run, yet the
records stay consistent (polling reconciles what a dead event missed), so an alert is the right
response, not stopping analytics.

Every query is an indexed read of one sync's pending or dead inbox rows or state rows
(``store.health``), cheap enough to run after every run.
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from sync_project.core import ProviderConnection
from sync_project.core.clock import utcnow
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG, connection_partitions
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG

if TYPE_CHECKING:
    from sync_project.store import LastRun, PartitionBacklog, PartitionDeadLetters, Store


INBOX_BACKLOG = "inbox_backlog"
DEAD_LETTERS = "dead_letters"
CONNECTIONS_FRESH = "connections_fresh"
INBOX_HEALTHY = "inbox_healthy"
PARTITION_CHECKS = (INBOX_BACKLOG, DEAD_LETTERS)

CHECKS_JOB = "sync_checks_job"
CHECKS_SCHEDULE = "sync_checks_schedule"
CHECKS_CRON = "*/5 * * * *"
#: Rows of the per-connection tables in check metadata (worst first): enough to act on.
TABLE_ROWS = 50
#: Dagster refuses freshness windows under a minute.
_MIN_WINDOW = timedelta(minutes=1)


@dataclass(frozen=True)
class CheckSettings:
    """Thresholds of the checks (see the module docstring for what each one means)."""

    backlog_max_wait: timedelta = timedelta(minutes=5)
    freshness_warn_factor: float = 2.0
    freshness_fail_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.backlog_max_wait <= timedelta(0):
            raise ValueError("backlog_max_wait must be positive")
        if not 1.0 <= self.freshness_warn_factor < self.freshness_fail_factor:
            raise ValueError("need 1 <= freshness_warn_factor < freshness_fail_factor")

    def warn_window(self, sync: SyncDefinition, poll_interval: timedelta | None = None) -> timedelta:
        """``poll_interval``: a connection's own (default: the sync's)."""
        return max((poll_interval or sync.poll_interval) * self.freshness_warn_factor, _MIN_WINDOW)

    def fail_window(self, sync: SyncDefinition, poll_interval: timedelta | None = None) -> timedelta:
        every = poll_interval or sync.poll_interval
        return max(every * self.freshness_fail_factor, self.warn_window(sync, every) + _MIN_WINDOW)


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, independent of Dagster (the tests and both kinds of check use it)."""

    passed: bool
    severity: dg.AssetCheckSeverity
    description: str
    metadata: dict[str, Any]

    def result(self, check_name: str, asset_key: dg.AssetKey | None = None) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            check_name=check_name,
            asset_key=asset_key,
            passed=self.passed,
            severity=self.severity,
            description=self.description,
            metadata=self.metadata,
        )


# -- evaluation (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainRun:
    """The newest webhook run of one partition, as Dagster's run storage has it."""

    run_id: str
    status: dg.DagsterRunStatus
    #: When it entered its current state: created (queued), started (running), ended (finished).
    since: datetime
    max_runtime_s: float | None = None

    @classmethod
    def of(cls, record: dg.RunRecord) -> "DrainRun":
        run = record.dagster_run
        if run.is_finished and record.end_time is not None:
            since = datetime.fromtimestamp(record.end_time, timezone.utc)
        elif record.start_time is not None:
            since = datetime.fromtimestamp(record.start_time, timezone.utc)
        else:
            since = record.create_timestamp.astimezone(timezone.utc)
        limit = run.tags.get(MAX_RUNTIME_TAG)
        return cls(run.run_id, run.status, since, float(limit) if limit else None)


_QUEUED = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED}
_RUNNING = {dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING}


def last_drain_runs(
    instance: dg.DagsterInstance, sync: SyncDefinition, connection_ids: Sequence[str]
) -> dict[str, DrainRun | None]:
    """The newest webhook run (inbox sensor, drain tag) of each connection: one indexed query each."""
    runs: dict[str, DrainRun | None] = {}
    for connection_id in connection_ids:
        # Any drain slot's: a standing drainer's successor queues in another slot than it.
        tags = {DRAIN_PARTITION_TAG: f"{sync.key}:{connection_id}"}
        records = instance.get_run_records(filters=dg.RunsFilter(tags=tags), limit=1)
        runs[connection_id] = DrainRun.of(records[0]) if records else None
    return runs


def why_not_draining(run: DrainRun | None, *, max_wait: timedelta, now: datetime) -> str | None:
    """Why a connection's claimable events wait longer than ``max_wait``, from its newest webhook
    run; None when runs are draining it (the newest started, or succeeded, within ``max_wait``)."""
    if run is None:
        return "no webhook run was ever requested for it: is dagster-daemon running, with inbox_sensor on?"
    age = (now - run.since).total_seconds()
    name = run.run_id[:8]
    recent = age <= max_wait.total_seconds()
    if recent and run.status in _RUNNING | {dg.DagsterRunStatus.SUCCESS}:
        return None
    if run.status in _QUEUED:
        return (
            f"its webhook run {name} has been queued for {age:.0f} s: is dagster-daemon running? "
            "(a run of the partition still holding its sync/asset_partition slot also keeps it queued)"
        )
    if run.status in _RUNNING:
        if run.max_runtime_s is not None and age < run.max_runtime_s:
            return (
                f"its webhook run {name} has been {run.status.value} for {age:.0f} s without draining them: "
                "its worker may have died; run monitoring fails it at its dagster/max_runtime "
                f"({run.max_runtime_s:.0f} s), or terminate it in the UI"
            )
        limit = f"its dagster/max_runtime of {run.max_runtime_s:.0f} s" if run.max_runtime_s else "any limit"
        return (
            f"its webhook run {name} has been {run.status.value} for {age:.0f} s, beyond {limit}: its worker "
            "died or hangs and run monitoring has not failed it (run_monitoring in dagster.yaml, dagster-daemon "
            "running?); terminate it in the UI to release the partition"
        )
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return (
            f"its last webhook run {name} ended {age:.0f} s ago and none was requested since: "
            "is dagster-daemon running, with inbox_sensor on?"
        )
    return (
        f"its last webhook run {name} ended {run.status.value} {age:.0f} s ago and none has drained since: "
        "see that run's logs; inbox_sensor requests another (is it running?)"
    )


#: Without run information (the per-run check): the causes to look for.
_UNKNOWN_CAUSE = (
    "likely a webhook run of it stuck or failing, or dagster-daemon or inbox_sensor not running "
    "(inbox_healthy, run by sync_checks_schedule, says which)"
)


def late_backlogs(
    backlogs: Sequence["PartitionBacklog"], *, max_wait: timedelta, now: datetime
) -> list["PartitionBacklog"]:
    """The connections whose oldest claimable event waited over ``max_wait``, longest first."""
    return sorted(
        (b for b in backlogs if (b.oldest_due_age_s(now) or 0.0) > max_wait.total_seconds()),
        key=lambda b: -(b.oldest_due_age_s(now) or 0.0),
    )


def evaluate_backlog(
    backlogs: Sequence["PartitionBacklog"],
    *,
    max_wait: timedelta,
    now: datetime,
    drain_runs: Mapping[str, DrainRun | None] | None = None,
) -> CheckOutcome:
    """WARN when a claimable event has waited longer than ``max_wait``, naming each connection that
    is not draining and why (from ``drain_runs``, its newest webhook run, when known)."""
    pending = sum(b.pending for b in backlogs)
    due = sum(b.due for b in backlogs)
    retrying = sum(b.retrying for b in backlogs)
    due_ages = [age for b in backlogs if (age := b.oldest_due_age_s(now)) is not None]
    pending_ages = [age for b in backlogs if (age := b.oldest_pending_age_s(now)) is not None]
    oldest_due = max(due_ages, default=0.0)
    late = late_backlogs(backlogs, max_wait=max_wait, now=now)
    causes: dict[str, str | None] = {
        b.connection_id: _UNKNOWN_CAUSE
        if drain_runs is None
        else why_not_draining(drain_runs.get(b.connection_id), max_wait=max_wait, now=now)
        for b in late
    }
    stuck = [b for b in late if causes[b.connection_id] is not None]
    behind = [b for b in late if causes[b.connection_id] is None]
    metadata: dict[str, object] = {
        "pending": pending,
        "due": due,
        "retrying": retrying,
        "oldest_due_age_s": round(oldest_due, 3),
        "oldest_pending_age_s": round(max(pending_ages, default=0.0), 3),
        "max_wait_s": max_wait.total_seconds(),
        "connections_with_backlog": len(backlogs),
        "connections_not_draining": len(stuck),
        "connections_behind": len(behind),
    }
    if len(backlogs) > 1 or late:
        metadata["by_connection"] = dg.MetadataValue.md(_backlog_table(backlogs, now, causes))
    if late:
        wait_s = max_wait.total_seconds()
        parts = []
        if stuck:
            named = "; ".join(
                f"{b.connection_id} ({b.due} due, oldest {b.oldest_due_age_s(now) or 0:.0f} s): "
                f"{causes[b.connection_id]}"
                for b in stuck[:5]
            )
            parts.append(
                f"{len(stuck)} connection(s) not draining, with claimable events waiting over {wait_s:.0f} s: "
                + named
                + (" ..." if len(stuck) > 5 else "")
            )
        if behind:
            names = ", ".join(b.connection_id for b in behind[:5]) + (" ..." if len(behind) > 5 else "")
            parts.append(
                f"{len(behind)} connection(s) draining but behind, with claimable events waiting over "
                f"{wait_s:.0f} s (oldest {oldest_due:.0f} s): {names}; webhook runs are not keeping up"
            )
        return CheckOutcome(False, dg.AssetCheckSeverity.WARN, ". ".join(parts), metadata)
    return CheckOutcome(
        True,
        dg.AssetCheckSeverity.WARN,
        f"{pending} pending event(s), {retrying} waiting for a retry; none waited over "
        f"{max_wait.total_seconds():.0f} s",
        metadata,
    )


def evaluate_dead_letters(dead: Sequence["PartitionDeadLetters"]) -> CheckOutcome:
    """ERROR while any event of the sync is dead-lettered."""
    total = sum(d.dead for d in dead)
    metadata: dict[str, object] = {"dead": total, "connections_with_dead": len(dead)}
    if not dead:
        return CheckOutcome(True, dg.AssetCheckSeverity.ERROR, "no dead-lettered events", metadata)
    newest = max(dead, key=lambda d: d.newest_id)
    metadata.update(
        newest_dead_event_id=newest.newest_id,
        newest_dead_event_type=newest.newest_event_type,
        newest_error=newest.newest_error or "",
        newest_dead_connection=newest.connection_id,
    )
    if newest.newest_dead_at is not None:
        metadata["newest_dead_at"] = dg.MetadataValue.timestamp(newest.newest_dead_at)
    if len(dead) > 1:
        metadata["by_connection"] = dg.MetadataValue.md(_dead_table(dead))
    return CheckOutcome(
        False,
        dg.AssetCheckSeverity.ERROR,
        f"{total} dead-lettered event(s); newest: {newest.newest_event_type} ({_clip(newest.newest_error, 200)}). "
        "Fix the handler, then `sync-project inbox replay --status dead`.",
        metadata,
    )


def evaluate_freshness(
    sync: SyncDefinition,
    connections: Sequence[ProviderConnection],
    runs: dict[str, "LastRun"],
    settings: CheckSettings,
    now: datetime,
) -> CheckOutcome:
    """WARN/ERROR when an active connection's last success is older than the windows.

    A connection that never succeeded is measured from its registration: it gets the same
    windows to complete its first run. A connection with a poll interval of its own is measured
    against windows of that interval (``warn_after_s``/``fail_after_s`` are the sync's).
    """
    from sync_project.orchestration.cadence import poll_interval

    warn_s = settings.warn_window(sync).total_seconds()
    fail_s = settings.fail_window(sync).total_seconds()
    active = [c for c in connections if c.status == "active"]
    rows: list[tuple[str, float, str, str | None]] = []
    limits: dict[str, tuple[float, float]] = {}
    for connection in active:
        run = runs.get(connection.connection_id)
        since = run.last_success_at if run and run.last_success_at else connection.created_at
        age = max(0.0, (now - since).total_seconds())
        what = "synced" if run and run.last_success_at else "never synced"
        rows.append((connection.connection_id, age, what, run.last_error if run else None))
        every = poll_interval(sync, connection)
        limits[connection.connection_id] = (
            settings.warn_window(sync, every).total_seconds(),
            settings.fail_window(sync, every).total_seconds(),
        )
    rows.sort(key=lambda row: -row[1])
    failing = [row for row in rows if row[1] > limits[row[0]][1]]
    warning = [row for row in rows if limits[row[0]][0] < row[1] <= limits[row[0]][1]]
    metadata: dict[str, object] = {
        "active_connections": len(active),
        "paused_connections": len(connections) - len(active),
        "late_warn": len(warning),
        "late_error": len(failing),
        "oldest_success_age_s": round(rows[0][1], 3) if rows else 0.0,
        "warn_after_s": warn_s,
        "fail_after_s": fail_s,
    }
    if rows:
        metadata["by_connection"] = dg.MetadataValue.md(_freshness_table(rows[:TABLE_ROWS], limits))
    late = failing + warning
    if not late:
        return CheckOutcome(
            True,
            dg.AssetCheckSeverity.WARN,
            f"all {len(active)} active connection(s) synced within {warn_s:.0f} s",
            metadata,
        )
    names = ", ".join(f"{cid} ({age:.0f} s, {what})" for cid, age, what, _ in late[:5]) + (
        " ..." if len(late) > 5 else ""
    )
    severity = dg.AssetCheckSeverity.ERROR if failing else dg.AssetCheckSeverity.WARN
    limit = min(limits[row[0]][1 if failing else 0] for row in (failing or warning))
    own = ", or the connection's own" if {limits[row[0]] for row in late} - {(warn_s, fail_s)} else ""
    return CheckOutcome(
        False,
        severity,
        f"{len(late)} connection(s) without a successful run for over {limit:.0f} s "
        f"(poll interval {sync.poll_interval.total_seconds():.0f} s{own}): {names}",
        metadata,
    )


def evaluate_inbox(backlog: CheckOutcome, dead: CheckOutcome) -> CheckOutcome:
    """Both inbox verdicts in one: dead letters (ERROR) first, then a stuck backlog (WARN)."""
    metadata = {**backlog.metadata, **{k: v for k, v in dead.metadata.items() if k != "by_connection"}}
    if "by_connection" in dead.metadata:
        metadata["dead_by_connection"] = dead.metadata["by_connection"]
    if not dead.passed:
        description = dead.description + ("" if backlog.passed else " Also: " + backlog.description)
        return CheckOutcome(False, dg.AssetCheckSeverity.ERROR, description, metadata)
    if not backlog.passed:
        return CheckOutcome(False, dg.AssetCheckSeverity.WARN, backlog.description, metadata)
    return CheckOutcome(True, dg.AssetCheckSeverity.ERROR, f"{backlog.description}; {dead.description}", metadata)


# -- per connection: with every run, and on a schedule ----------------------------------------------


def partition_check_specs(sync: SyncDefinition) -> list[dg.AssetCheckSpec]:
    """The four checks of the sync's asset, one result per connection partition."""
    key = asset_key(sync)
    partitions = connection_partitions(sync.provider)
    described = {
        INBOX_BACKLOG: "This connection's pending webhook events after the run; WARN when one has been "
        "claimable for longer than the threshold.",
        DEAD_LETTERS: "This connection's dead-lettered webhook events; ERROR while there is any.",
        CONNECTIONS_FRESH: "This connection (if active) had a successful run within 2x (WARN) / 3x (ERROR) "
        "its poll interval. Also evaluated by sync_checks_schedule between runs.",
        INBOX_HEALTHY: "This connection's inbox: no dead letters (ERROR), no claimable event waiting over the "
        "threshold (WARN), naming why it is not draining. Also evaluated by sync_checks_schedule between runs.",
    }
    with warnings.catch_warnings():
        # Partitioned check specs are Preview in 1.13 (see the module docstring): chosen knowingly,
        # so the warning would only repeat at every code-location load.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(name, asset=key, partitions_def=partitions, description=text)
            for name, text in described.items()
        ]


def evaluate_partition(
    store: "Store",
    sync: SyncDefinition,
    connection: ProviderConnection,
    settings: CheckSettings,
    *,
    now: datetime,
    instance: dg.DagsterInstance | None,
) -> dict[str, CheckOutcome]:
    """All four checks of one connection partition (a run's and the schedule's view alike).

    With ``instance``, a backlog that is too old names why it is not draining (the partition's
    newest webhook run); without, it lists what to look for."""
    connection_id = connection.connection_id
    backlogs = store.health.inbox_backlog(sync.key, connection_id, now=now)
    late = [b.connection_id for b in late_backlogs(backlogs, max_wait=settings.backlog_max_wait, now=now)]
    runs = last_drain_runs(instance, sync, late) if instance is not None else None
    backlog = evaluate_backlog(backlogs, max_wait=settings.backlog_max_wait, now=now, drain_runs=runs)
    dead = evaluate_dead_letters(store.health.dead_letters(sync.key, connection_id))
    state = {k: v for k, v in store.health.last_runs(sync.key).items() if k == connection_id}
    return {
        INBOX_BACKLOG: backlog,
        DEAD_LETTERS: dead,
        CONNECTIONS_FRESH: evaluate_freshness(sync, [connection], state, settings, now),
        INBOX_HEALTHY: evaluate_inbox(backlog, dead),
    }


def partition_check_results(
    store: "Store",
    sync: SyncDefinition,
    connection_id: str,
    selected: set[str],
    settings: CheckSettings,
    *,
    now: datetime | None = None,
    instance: dg.DagsterInstance | None = None,
) -> list[dg.AssetCheckResult]:
    """Results of the selected checks of the run's partition, for its ``MaterializeResult`` (or
    yielded before the run fails, so a failed run reports its checks instead of leaving them
    planned, which Dagster shows as failed)."""
    from sync_project.store import UnknownConnectionError

    if not selected:
        return []
    now = now or utcnow()
    try:
        connection = store.connections.get(sync.provider, connection_id)
    except UnknownConnectionError:
        connection = None
    if connection is None:
        outcomes = {
            INBOX_BACKLOG: evaluate_backlog(
                store.health.inbox_backlog(sync.key, connection_id, now=now),
                max_wait=settings.backlog_max_wait,
                now=now,
                drain_runs=None,
            ),
            DEAD_LETTERS: evaluate_dead_letters(store.health.dead_letters(sync.key, connection_id)),
        }
        gone = CheckOutcome(
            False,
            dg.AssetCheckSeverity.WARN,
            f"no connection {connection_id!r} of {sync.provider} is registered: remove the partition, or "
            f"`sync-project connections add {sync.provider} {connection_id}`",
            {},
        )
        outcomes[CONNECTIONS_FRESH] = outcomes[INBOX_HEALTHY] = gone
    else:
        outcomes = evaluate_partition(store, sync, connection, settings, now=now, instance=instance)
    return [
        outcomes[name].result(name)
        for name in (INBOX_BACKLOG, DEAD_LETTERS, CONNECTIONS_FRESH, INBOX_HEALTHY)
        if name in selected
    ]


#: Statuses of a run that will still report its partition's checks.
_IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
SCHEDULED_CHECKS = (CONNECTIONS_FRESH, INBOX_HEALTHY)


def build_checks_job(
    syncs: Sequence[SyncDefinition], job_names: Mapping[str, str], settings: CheckSettings
) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The job that evaluates ``connections_fresh`` and ``inbox_healthy`` of every connection
    partition between runs, and the schedule running it every 5 minutes.

    Dagster's *Checks* tab shows a check's result for a partition only while it targets that
    partition's latest materialization: a result recorded by a standalone check would be hidden
    by the next materialization of any partition, i.e. nearly always under webhook traffic. So the
    job records each partition's evaluation against that partition's latest materialization;
    every run of the partition records newer ones itself. A partition with a run in progress is
    left to that run, unless the run is not draining it (stuck: nothing will report but this)."""

    @dg.op(
        name="evaluate_sync_checks", description="connections_fresh and inbox_healthy of every connection partition."
    )
    def _evaluate(context: dg.OpExecutionContext, sync_store: StoreResource) -> None:
        store = sync_store.get_store()
        now = utcnow()
        for sync in syncs:
            key = asset_key(sync)
            live = {
                record.dagster_run.tags.get("dagster/partition")
                for record in context.instance.get_run_records(
                    filters=dg.RunsFilter(job_name=job_names[sync.key], statuses=_IN_PROGRESS)
                )
            }
            reported = 0
            for connection in store.connections.list(sync.provider):
                connection_id = connection.connection_id
                outcomes = evaluate_partition(store, sync, connection, settings, now=now, instance=context.instance)
                stuck = bool(outcomes[INBOX_BACKLOG].metadata.get("connections_not_draining"))
                if connection_id in live and not stuck:
                    continue
                target = _latest_materialization(context.instance, key, connection_id)
                for name in SCHEDULED_CHECKS:
                    outcome = outcomes[name]
                    # log_event records an AssetCheckEvaluation as the step's own (its annotation
                    # names only the documented event types).
                    context.log_event(
                        dg.AssetCheckEvaluation(  # type: ignore[arg-type]
                            asset_key=key,
                            check_name=name,
                            passed=outcome.passed,
                            metadata=outcome.metadata,
                            severity=outcome.severity,
                            description=outcome.description,
                            blocking=False,
                            partition=connection_id,
                            target_materialization_data=target,
                        )
                    )
                reported += 1
            context.log.info(
                f"{sync.key}: checks of {reported} connection(s) evaluated ({len(live - {None})} left to their runs)"
            )

    job = dg.JobDefinition(
        graph_def=dg.GraphDefinition(name=CHECKS_JOB, node_defs=[_evaluate]),
        description="Freshness and inbox checks of every sync's connections, between their runs.",
        tags={"sync/mode": "checks"},
    )
    schedule = dg.ScheduleDefinition(
        name=CHECKS_SCHEDULE,
        job=job,
        cron_schedule=CHECKS_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Evaluates connections_fresh and inbox_healthy of every connection partition.",
    )
    return job, schedule


def _latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    )
    if not records.records:
        return None
    record = records.records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
    )


def freshness_policy(sync: SyncDefinition, settings: CheckSettings) -> dg.FreshnessPolicy:
    """Asset-level freshness: some connection materialized within the windows (see the docstring)."""
    return dg.FreshnessPolicy.time_window(
        fail_window=settings.fail_window(sync), warn_window=settings.warn_window(sync)
    )


def asset_key(sync: SyncDefinition) -> dg.AssetKey:
    return dg.AssetKey([sync.provider, sync.name])


# -- metadata tables -----------------------------------------------------------------------------


def _backlog_table(backlogs: Sequence["PartitionBacklog"], now: datetime, causes: Mapping[str, str | None]) -> str:
    ordered = sorted(backlogs, key=lambda b: -(b.oldest_due_age_s(now) or 0.0))[:TABLE_ROWS]
    lines = [
        "| connection | pending | due | retrying | oldest claimable (s) | state |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for b in ordered:
        age = b.oldest_due_age_s(now)
        if b.connection_id not in causes:
            state = "ok"
        else:
            cause = causes[b.connection_id]
            state = "behind" if cause is None else f"not draining: {_clip(cause, 160)}"
        lines.append(
            f"| {_cell(b.connection_id)} | {b.pending} | {b.due} | {b.retrying} | "
            f"{'' if age is None else f'{age:.0f}'} | {_cell(state)} |"
        )
    return "\n".join(lines)


def _dead_table(dead: Sequence["PartitionDeadLetters"]) -> str:
    ordered = sorted(dead, key=lambda d: -d.dead)[:TABLE_ROWS]
    lines = ["| connection | dead | newest event | newest error |", "|---|---:|---|---|"]
    for d in ordered:
        lines.append(
            f"| {_cell(d.connection_id)} | {d.dead} | {d.newest_id} {_cell(d.newest_event_type)} | {_cell(_clip(d.newest_error, 120))} |"
        )
    return "\n".join(lines)


def _freshness_table(
    rows: Sequence[tuple[str, float, str, str | None]], limits: Mapping[str, tuple[float, float]]
) -> str:
    lines = ["| connection | since last success (s) | state | last error |", "|---|---:|---|---|"]
    for connection_id, age, what, error in rows:
        warn_s, fail_s = limits[connection_id]
        state = "ERROR" if age > fail_s else "WARN" if age > warn_s else "ok"
        lines.append(f"| {_cell(connection_id)} | {age:.0f} ({what}) | {state} | {_cell(_clip(error, 120))} |")
    return "\n".join(lines)


def _clip(text: str | None, limit: int) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
