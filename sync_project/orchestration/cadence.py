"""When a connection is polled and when it gets a full refresh: its own settings over its sync's.

Pure functions of the sync, the connection and its stored state, shared by the polling schedule,
the per-connection polling sensor, the freshness check and ``connections status``, so all of them
agree. Poll ticks carry the full-refresh cadence: a tick requests a full refresh instead of an
incremental poll when one is due (no extra schedule, and never both for one tick).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

from sync_project.core.sync import SyncDefinition
from sync_project.store import ProviderConnection

if TYPE_CHECKING:
    from sync_project.store import SyncState

FullRefreshReason = Literal["resume", "cadence"]


def poll_interval(sync: SyncDefinition, connection: ProviderConnection) -> timedelta:
    if connection.poll_interval_s is not None:
        return timedelta(seconds=connection.poll_interval_s)
    return sync.poll_interval


def has_own_poll_interval(sync: SyncDefinition, connection: ProviderConnection) -> bool:
    """Polled by the per-connection sensor rather than by the sync's schedule."""
    return (
        connection.poll_interval_s is not None and timedelta(seconds=connection.poll_interval_s) != sync.poll_interval
    )


def full_refresh_interval(sync: SyncDefinition, connection: ProviderConnection) -> timedelta | None:
    """None: no full refresh by cadence (the connection set 0, or the sync declares None)."""
    if connection.full_refresh_interval_s is not None:
        return timedelta(seconds=connection.full_refresh_interval_s) if connection.full_refresh_interval_s else None
    return sync.full_refresh_interval


def full_refresh_due(
    sync: SyncDefinition, connection: ProviderConnection, state: SyncState | None, now: datetime
) -> FullRefreshReason | None:
    """``resume`` when a full refresh is open (a run of it was killed or failed: the next one
    continues it), ``cadence`` when the last complete one (or, for a connection that never had
    one, its registration) is older than the cadence; else None."""
    if state is not None and state.full_window is not None:
        return "resume"
    every = full_refresh_interval(sync, connection)
    if every is None:
        return None
    since = state.last_full_refresh_at if state and state.last_full_refresh_at else connection.created_at
    return "cadence" if now - since >= every else None


def next_full_refresh(sync: SyncDefinition, connection: ProviderConnection, state: SyncState | None) -> datetime | None:
    """From when the next full refresh is due (the first poll tick at or after it runs it)."""
    if state is not None and state.full_window is not None:
        return state.full_window.started_at
    every = full_refresh_interval(sync, connection)
    if every is None:
        return None
    since = state.last_full_refresh_at if state and state.last_full_refresh_at else connection.created_at
    return since + every


def poll_slot(interval: timedelta, now: datetime) -> int:
    """The interval-long slot of the epoch ``now`` is in: a poll per slot (the run key holds it)."""
    return int(now.timestamp() // interval.total_seconds())


def next_slot_start(interval: timedelta, now: datetime) -> datetime:
    seconds = interval.total_seconds()
    return datetime.fromtimestamp((poll_slot(interval, now) + 1) * seconds, tz=now.tzinfo)
