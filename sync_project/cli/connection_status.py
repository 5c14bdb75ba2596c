"""What ``sync-project connections status`` reports, gathered from where each fact lives.

- The records store: connections, the sync state (a failing run's error, kept until a run
  succeeds), and the inbox (pending and dead-lettered events, per (sync, connection)).
- The Dagster instance: each successful run's materialization carries its counts (the metadata
  the Partitions tab shows), failed runs keep their error in the event log, the schedules' state
  says whether polling is on, and the daemon's heartbeat whether anything will run at all.
- The code location's definitions: each sync's polling schedule (cron and default status).

Nothing is copied from Dagster into the store to serve this view: the instance is the record of
runs, the store is the record of data and inbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import dagster as dg
from pydantic import BaseModel

from sync_project.core import ProviderConnection
from sync_project.core.clock import utcnow
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import job_name, op_name
from sync_project.orchestration.cadence import (
    full_refresh_interval,
    has_own_poll_interval,
    next_full_refresh,
    next_slot_start,
    poll_interval,
)
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.schedules import PER_CONNECTION_SENSOR
from sync_project.store import Store, SyncState

#: The run modes that poll the provider (the others drain the inbox).
POLL_MODES = ("full", "incremental")
COUNT_KEYS = ("added", "updated", "deleted", "unchanged", "skipped_stale", "skipped_missing")
#: Besides the counts, what a run's materialization says about its work.
WORK_KEYS = ("events_drained", "events_retrying", "events_dead", "pages", "records_fetched")
#: Materializations read per (sync, connection) to find the newest poll among the drains.
MATERIALIZATIONS_SCANNED = 200
#: A scheduler daemon that has not reported for this long is taken to be down.
DAEMON_SILENT_AFTER_S = 120.0


class RunSummary(BaseModel):
    """One successful run of a (sync, connection), as its materialization recorded it."""

    run_id: str
    mode: str | None = None
    at: datetime
    counts: dict[str, int]
    work: dict[str, int] = {}
    #: Live records of the partition after the run (its ``dagster/row_count``).
    row_count: int | None = None


class RunFailure(BaseModel):
    run_id: str
    at: datetime | None = None
    error: str
    #: Whether a run of the partition succeeded after this one failed.
    superseded: bool = False


class NextPoll(BaseModel):
    at: datetime | None = None
    #: Why there is no time, or what qualifies it: "paused", "schedule stopped", "no partition",
    #: "no daemon", "every 30 s" (a sub-minute sync polls from a sensor).
    note: str | None = None
    schedule: str


class FullRefreshStatus(BaseModel):
    """When lost deletes heal: the full-refresh cadence, the last complete refresh, the next one,
    and the refresh under way (a killed or failed run left it open; the next full run resumes it)."""

    every_s: int | None = None
    last_completed_at: datetime | None = None
    next_due_at: datetime | None = None
    open_since: datetime | None = None
    open_pages: int = 0
    open_runs: int = 0


class PartitionStatus(BaseModel):
    provider: str
    sync: str
    connection_id: str
    status: str
    account_id: str | None = None
    last_success: RunSummary | None = None
    last_poll: RunSummary | None = None
    last_failure: RunFailure | None = None
    pending: int = 0
    retrying: int = 0
    oldest_pending_received_at: datetime | None = None
    dead: int = 0
    newest_dead_error: str | None = None
    next_poll: NextPoll
    #: Where the next incremental poll starts (None: from the top).
    checkpoint: dict[str, Any] | None = None
    full_refresh: FullRefreshStatus = FullRefreshStatus()


def partition_statuses(
    store: Store,
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    syncs: Sequence[SyncDefinition],
    connections: Sequence[ProviderConnection],
    *,
    now: datetime | None = None,
) -> list[PartitionStatus]:
    """One status per (sync of the connection's provider, connection), sorted by sync."""
    now = now or utcnow()
    daemon_up = _scheduler_alive(instance, now)
    schedule_states = _schedule_states(instance)
    registered = {
        provider: set(instance.get_dynamic_partitions(partitions_name(provider)))
        for provider in {c.provider for c in connections}
    }
    result = []
    for sync in sorted(syncs, key=lambda s: s.key):
        mine = [c for c in connections if c.provider == sync.provider]
        if not mine:
            continue
        backlog = {b.connection_id: b for b in store.health.inbox_backlog(sync.key, now=now)}
        dead = {d.connection_id: d for d in store.health.dead_letters(sync.key)}
        for connection in mine:
            cid = connection.connection_id
            last_success, last_poll = _last_runs(instance, sync, cid)
            state = store.state.get(sync.key, cid)
            result.append(
                PartitionStatus(
                    provider=sync.provider,
                    sync=sync.key,
                    connection_id=cid,
                    status=connection.status,
                    account_id=connection.account_id,
                    last_success=last_success,
                    last_poll=last_poll,
                    last_failure=_last_failure(instance, sync, cid, state, last_success),
                    pending=backlog[cid].pending if cid in backlog else 0,
                    retrying=backlog[cid].retrying if cid in backlog else 0,
                    oldest_pending_received_at=backlog[cid].oldest_pending_received_at if cid in backlog else None,
                    dead=dead[cid].dead if cid in dead else 0,
                    newest_dead_error=dead[cid].newest_error if cid in dead else None,
                    next_poll=_next_poll(
                        defs, sync, connection, cid in registered[sync.provider], schedule_states, daemon_up, now
                    ),
                    checkpoint=state.checkpoint if state is not None else None,
                    full_refresh=_full_refresh(sync, connection, state),
                )
            )
    return result


# -- runs ---------------------------------------------------------------------------------------


def _last_runs(
    instance: dg.DagsterInstance, sync: SyncDefinition, connection_id: str
) -> tuple[RunSummary | None, RunSummary | None]:
    """The newest successful run of the partition, and its newest poll (full or incremental)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([sync.provider, sync.name]), asset_partitions=[connection_id]),
        limit=MATERIALIZATIONS_SCANNED,
    ).records
    last_success = last_poll = None
    for record in records:
        materialization = record.asset_materialization
        if materialization is None:
            continue
        metadata: dict[str, Any] = {key: value.value for key, value in materialization.metadata.items()}
        if "deferred_to_run" in metadata:
            continue  # a webhook run that left its events to a live drainer did nothing itself
        summary = RunSummary(
            run_id=record.run_id,
            mode=metadata.get("mode") if isinstance(metadata.get("mode"), str) else None,
            at=datetime.fromtimestamp(record.timestamp, timezone.utc),
            counts={key: int(metadata[key]) for key in COUNT_KEYS if isinstance(metadata.get(key), int)},
            work={key: int(metadata[key]) for key in WORK_KEYS if isinstance(metadata.get(key), int)},
            row_count=metadata["dagster/row_count"] if isinstance(metadata.get("dagster/row_count"), int) else None,
        )
        last_success = last_success or summary
        if summary.mode in POLL_MODES:
            last_poll = summary
            break
    return last_success, last_poll


def _last_failure(
    instance: dg.DagsterInstance,
    sync: SyncDefinition,
    connection_id: str,
    state: Any,
    last_success: RunSummary | None,
) -> RunFailure | None:
    """The newest failed run of the partition and its error.

    Dagster's run records hold every failure, those the store never hears of included (a run that
    found its connection removed or paused, a run whose process died); the store's sync state
    holds the error of a failing run until one succeeds, without Dagster's event log.
    """
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=job_name(sync), statuses=[dg.DagsterRunStatus.FAILURE], tags={"dagster/partition": connection_id}
        ),
        limit=1,
    )
    if records:
        record = records[0]
        at = record.end_time or record.update_timestamp.timestamp()
        failed_at = datetime.fromtimestamp(at, timezone.utc)
        return RunFailure(
            run_id=record.dagster_run.run_id,
            at=failed_at,
            error=_run_error(instance, record.dagster_run.run_id),
            superseded=last_success is not None and last_success.at > failed_at,
        )
    if state is not None and state.last_error:
        return RunFailure(run_id=state.last_run_id or "?", at=state.updated_at, error=state.last_error)
    return None


def _run_error(instance: dg.DagsterInstance, run_id: str) -> str:
    """The failing step's own description (a ``dg.Failure``'s), else the error, else the run's."""
    step_failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    for entry in reversed(step_failures):
        data = entry.dagster_event.step_failure_data if entry.dagster_event else None
        if data is None:
            continue
        if data.user_failure_data is not None and data.user_failure_data.description:
            return data.user_failure_data.description
        if data.error is not None:
            return data.error.message.strip()
    for entry in reversed(instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)):
        if entry.dagster_event and entry.dagster_event.message:
            return entry.dagster_event.message
    return "the run failed (no error recorded; see the run in the UI)"


# -- polling ------------------------------------------------------------------------------------


def _schedule_states(instance: dg.DagsterInstance) -> dict[str, str]:
    """Instigator name -> status (RUNNING, STOPPED, DECLARED_IN_CODE) as the instance stores it."""
    from dagster._core.scheduler.instigation import InstigatorType

    states: dict[str, str] = {}
    for instigator_type in (InstigatorType.SCHEDULE, InstigatorType.SENSOR):
        for state in instance.all_instigator_state(instigator_type=instigator_type):
            states[state.instigator_name] = state.status.value
    return states


def _full_refresh(sync: SyncDefinition, connection: ProviderConnection, state: SyncState | None) -> FullRefreshStatus:
    every = full_refresh_interval(sync, connection)
    window = state.full_window if state is not None else None
    return FullRefreshStatus(
        every_s=int(every.total_seconds()) if every else None,
        last_completed_at=state.last_full_refresh_at if state is not None else None,
        next_due_at=next_full_refresh(sync, connection, state),
        open_since=window.started_at if window else None,
        open_pages=window.pages if window else 0,
        open_runs=window.runs if window else 0,
    )


def _scheduler_alive(instance: dg.DagsterInstance, now: datetime) -> bool:
    heartbeat = instance.get_daemon_heartbeats().get("SCHEDULER")
    return heartbeat is not None and now.timestamp() - heartbeat.timestamp < DAEMON_SILENT_AFTER_S


def _next_poll(
    defs: dg.Definitions,
    sync: SyncDefinition,
    connection: ProviderConnection,
    has_partition: bool,
    states: Mapping[str, str],
    daemon_up: bool,
    now: datetime,
) -> NextPoll:
    name = f"poll_{op_name(sync)}"
    if connection.status != "active":
        return NextPoll(schedule=name, note=connection.status)
    if not has_partition:
        return NextPoll(schedule=name, note="no partition yet (connection_partitions_sensor adds it)")
    if has_own_poll_interval(sync, connection):
        sensor_name = PER_CONNECTION_SENSOR
        sensor = defs.resolve_sensor_def(sensor_name)
        if _stopped(states.get(sensor_name), sensor.default_status.value):
            return NextPoll(schedule=sensor_name, note="sensor stopped")
        at = next_slot_start(poll_interval(sync, connection), now.astimezone(timezone.utc))
        return NextPoll(schedule=sensor_name, at=at, note=None if daemon_up else "no daemon")
    stored = states.get(name)
    if sync.cron is None:
        sensor = defs.resolve_sensor_def(name)
        if _stopped(stored, sensor.default_status.value):
            return NextPoll(schedule=name, note="sensor stopped")
        every = f"every {sensor.minimum_interval_seconds} s"
        return NextPoll(schedule=name, note=every if daemon_up else f"{every}; no daemon")
    schedule = defs.resolve_schedule_def(name)
    if _stopped(stored, schedule.default_status.value):
        return NextPoll(schedule=name, note="schedule stopped")
    from dagster._utils.schedules import cron_string_iterator  # the daemon's own cron arithmetic

    # Times >= the start: one second on, so a tick of this very instant (under way) is not "next".
    cron = schedule.cron_schedule
    assert isinstance(cron, str), cron  # a sync's schedule has one cron string (SyncDefinition.cron)
    upcoming = cron_string_iterator(now.timestamp() + 1, cron, schedule.execution_timezone)
    at = next(upcoming).astimezone(timezone.utc)
    return NextPoll(schedule=name, at=at, note=None if daemon_up else "no daemon")


def _stopped(stored: str | None, default: str) -> bool:
    if stored in (None, "DECLARED_IN_CODE", "AUTOMATICALLY_RUNNING"):
        return default == "STOPPED"
    return stored == "STOPPED"


# -- text ---------------------------------------------------------------------------------------


def ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    return f"{duration(max(0.0, (now - value).total_seconds()))} ago"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds < 600 else f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def counts_text(summary: RunSummary | None) -> str:
    if summary is None:
        return "-"
    c = summary.counts
    text = f"+{c.get('added', 0)} ~{c.get('updated', 0)} -{c.get('deleted', 0)} ={c.get('unchanged', 0)}"
    if c.get("skipped_stale"):
        text += f" stale {c['skipped_stale']}"
    return text


def next_poll_text(poll: NextPoll, now: datetime) -> str:
    if poll.at is None:
        return poll.note or "-"
    text = f"in {duration(max(0.0, (poll.at - now).total_seconds()))}"
    return f"{text} ({poll.note})" if poll.note else text


def pending_text(status: PartitionStatus, now: datetime) -> str:
    if not status.pending:
        return "0"
    text = str(status.pending)
    if status.oldest_pending_received_at is not None:
        text += f", oldest {duration(max(0.0, (now - status.oldest_pending_received_at).total_seconds()))}"
    return text + (f" ({status.retrying} retrying)" if status.retrying else "")


def failure_text(failure: RunFailure | None, prefix: str = "", limit: int | None = 120) -> str:
    """The error's first line, without a leading ``prefix`` the table's row already says."""
    if failure is None:
        return "-"
    first_line = failure.error.strip().splitlines()[0] if failure.error.strip() else "failed"
    first_line = first_line.removeprefix(prefix)
    if limit is not None and len(first_line) > limit:
        first_line = first_line[: limit - 3] + "..."
    return f"{first_line} (then succeeded)" if failure.superseded else first_line


def table(statuses: Sequence[PartitionStatus], now: datetime) -> list[str]:
    header = (
        "SYNC",
        "CONNECTION",
        "STATUS",
        "LAST SUCCESS",
        "COUNTS +~-=",
        "PENDING",
        "DEAD",
        "NEXT POLL",
        "LAST ERROR",
    )
    rows = [header]
    for s in statuses:
        last = s.last_success
        rows.append(
            (
                s.sync,
                s.connection_id,
                s.status,
                f"{ago(last.at, now)} ({last.mode})" if last else "never",
                counts_text(last),
                pending_text(s, now),
                str(s.dead),
                next_poll_text(s.next_poll, now),
                failure_text(s.last_failure, prefix=f"{s.sync} for {s.connection_id}: "),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def detail(statuses: Sequence[PartitionStatus], connection: ProviderConnection, now: datetime) -> list[str]:
    lines = [
        f"{connection.provider}/{connection.connection_id}: {connection.status}, "
        f"account {connection.account_id or '-'}, credentials {connection.credentials_ref}"
    ]
    for s in statuses:
        lines.append(f"  {s.sync}")
        lines.append(f"    last success   {_run_line(s.last_success, now)}")
        lines.append(f"    last poll      {_run_line(s.last_poll, now)}")
        if s.last_failure is None:
            lines.append("    last error     none")
        else:
            f = s.last_failure
            when = f"{f.at:%Y-%m-%d %H:%M:%S}Z ({ago(f.at, now)})" if f.at else "?"
            later = " (a later run succeeded)" if f.superseded else ""
            lines.append(f"    last error     {when}, run {f.run_id}{later}:")
            lines.extend(f"                     {line}" for line in f.error.strip().splitlines()[:20])
        backlog = f"{s.pending} pending"
        if s.oldest_pending_received_at is not None:
            backlog += f", the oldest received {ago(s.oldest_pending_received_at, now)}"
        if s.retrying:
            backlog += f", {s.retrying} waiting to retry after a handler error"
        lines.append(f"    backlog        {backlog}")
        dead = str(s.dead)
        if s.dead:
            newest = (s.newest_dead_error or "").strip().splitlines()
            dead += (f", newest: {newest[0][:200]}" if newest else "") + "  (sync-project inbox replay --status dead)"
        lines.append(f"    dead letters   {dead}")
        poll = s.next_poll
        when = f"{poll.at:%Y-%m-%d %H:%M:%S}Z, {next_poll_text(poll, now)}" if poll.at else next_poll_text(poll, now)
        lines.append(f"    next poll      {when}, by {poll.schedule}")
        lines.append(f"    full refresh   {full_refresh_text(s.full_refresh, now)}")
    return lines


def full_refresh_text(full: FullRefreshStatus, now: datetime) -> str:
    if full.open_since is not None:
        return (
            f"under way since {full.open_since:%Y-%m-%d %H:%M:%S}Z ({ago(full.open_since, now)}), "
            f"{full.open_pages} pages in {full.open_runs} run(s): the next full run resumes it"
        )
    if full.every_s is None:
        return "by hand only (no cadence)"
    last = f"last {ago(full.last_completed_at, now)}" if full.last_completed_at else "none yet"
    due = ""
    if full.next_due_at is not None:
        due = f", due {full.next_due_at:%Y-%m-%d %H:%M:%S}Z" + (
            " (at the next poll)" if full.next_due_at <= now else ""
        )
    return f"every {duration(full.every_s)}; {last}{due}"


def _run_line(summary: RunSummary | None, now: datetime) -> str:
    if summary is None:
        return "never"
    counts = ", ".join(f"{key} {summary.counts.get(key, 0)}" for key in COUNT_KEYS if key in summary.counts)
    work = ", ".join(f"{key} {value}" for key, value in summary.work.items())
    return (
        f"{summary.at:%Y-%m-%d %H:%M:%S}Z ({ago(summary.at, now)}), {summary.mode} run {summary.run_id}: "
        f"{counts}" + (f"; {work}" if work else "")
    )
