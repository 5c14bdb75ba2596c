"""One run's work on its partition, under the partition's lease (no Dagster in here: the asset
calls this, and so do the fault tests' child processes, which then run exactly what a run runs).

A run takes the lease of its role first: ``poll`` for full and incremental runs (schedules,
backfills, launches from the UI or ``dagster asset materialize``), ``drain`` for webhook runs. Two
roles, so a backfill proceeds while webhook runs keep draining; two polls of one partition take
turns. A poll run that finds its lease held waits for it (a backfill launched while a scheduled
poll runs should follow it, not fail); a drain run waits only as long as a dead holder's lease
takes to expire, and no longer once the holder renews: a live drainer drains the events itself.
A successor drain (``handoff_wait_s``, requested by the inbox sensor shortly before the standing
drainer reaches its cap) is the exception: it waits for the live holder to release, and takes
over within one lease poll of it, so the partition always has a drainer.
Every write is fenced by the lease, so whatever the run's sessions go through, a run that lost its
partition writes nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.polling import PollResult, poll
from sync_project.orchestration.webhook_drain import DrainResult, drain_inbox
from sync_project.store import (
    DEFAULT_FALLBACK_S,
    LeaseHeldError,
    LeaseKeeper,
    LeaseRole,
    MergeResult,
    ProviderConnection,
    RecordsAction,
    ResetResult,
    Store,
)

RunMode = Literal["full", "incremental", "webhook"]


@dataclass(frozen=True)
class RunSettings:
    """How long a run lingers and how it treats its lease (the asset's run config feeds this)."""

    max_events: int | None = None
    linger_s: float = 0.0
    max_linger_run_s: float = 60.0
    lease_ttl_s: float = 30.0
    #: How long a poll run waits for another poll of its partition before it fails.
    poll_lease_wait_s: float = 600.0
    #: A successor drain waits this long for its live predecessor to release the drain lease
    #: (0: an ordinary drain, which defers to a live drainer at once).
    handoff_wait_s: float = 0.0
    #: Postgres: an idle drainer claims at least this often without a notification.
    wake_fallback_s: float = DEFAULT_FALLBACK_S


@dataclass
class PartitionRunResult:
    merge: MergeResult = field(default_factory=MergeResult)
    polled: PollResult | None = None
    drained: DrainResult | None = None
    #: Set when a drain run found a live drainer holding the partition and left it the events.
    deferred_to: str | None = None


def lease_role(mode: RunMode) -> LeaseRole:
    return "drain" if mode == "webhook" else "poll"


def run_partition(
    store: Store,
    sync: SyncDefinition,
    provider: Provider,
    connection: ProviderConnection,
    *,
    mode: RunMode,
    run_id: str,
    log: logging.Logger | Any,
    settings: RunSettings | None = None,
    on_batch: Callable[[DrainResult], None] | None = None,
) -> PartitionRunResult:
    """Poll or drain ``connection``'s partition of ``sync`` holding the lease of the mode's role.

    Raises :class:`~sync_project.store.LeaseHeldError` when a poll's wait for its lease is over,
    and :class:`~sync_project.store.LeaseLostError` when the lease was granted to another run
    meanwhile (the transaction that found out wrote nothing).
    """
    settings = settings or RunSettings()
    role = lease_role(mode)
    # A dead drainer's lease expires within its TTL; a live one (it renews) drains what this run
    # came for, so a drain stops waiting as soon as its holder shows it is alive.
    wait_s = settings.lease_ttl_s + 5.0 if role == "drain" else settings.poll_lease_wait_s
    successor = role == "drain" and settings.handoff_wait_s > 0
    if successor:
        wait_s = max(wait_s, settings.handoff_wait_s)
    result = PartitionRunResult()
    with ExitStack() as held:
        try:
            keeper = held.enter_context(
                store.leases.hold(
                    sync.key,
                    connection.connection_id,
                    role,
                    run_id,
                    ttl_s=settings.lease_ttl_s,
                    wait_s=wait_s,
                    only_for_a_dead_holder=role == "drain" and not successor,
                    log=log,
                )
            )
        except LeaseHeldError as error:
            if role == "poll":
                raise
            log.info(f"{error}: it drains these events; this run leaves them to it")
            result.deferred_to = error.holder
            return result
        log.info(f"{sync.key} {connection.connection_id}: holding {keeper.lease.describe()}")
        # A sync of several models writes each model's records under that model's lease: taken
        # after the sync's own (which decides who runs), in declared order, so runs never deadlock.
        model_keepers = {
            key: held.enter_context(
                store.leases.hold(
                    key, connection.connection_id, role, run_id, ttl_s=settings.lease_ttl_s, wait_s=wait_s, log=log
                )
            )
            for key in (sync.model_key(model.name) for model in sync.models)
        }
        with provider.client(connection) as client:
            if mode == "webhook":
                result.drained = drain_lingering(
                    store, sync, connection, client, log, settings, keeper, on_batch, model_keepers=model_keepers
                )
                result.merge = result.drained.merge
            else:
                result.polled = poll(
                    store,
                    sync,
                    connection,
                    client,
                    log,
                    mode=mode,
                    run_id=run_id,
                    keeper=keeper,
                    model_keepers=model_keepers,
                )
                result.merge = result.polled.merge
    return result


def drain_lingering(
    store: Store,
    sync: SyncDefinition,
    connection: ProviderConnection,
    client: httpx.Client,
    log: logging.Logger | Any,
    settings: RunSettings,
    keeper: LeaseKeeper | None = None,
    on_batch: Callable[[DrainResult], None] | None = None,
    *,
    model_keepers: Mapping[str, LeaseKeeper] | None = None,
) -> DrainResult:
    """Drain the partition's inbox, then keep draining until ``settings.linger_s`` passes with
    nothing new, ``settings.max_linger_run_s`` is up, or ``max_events`` is reached.

    Between claims the run sleeps on the partition's wake-up (Postgres ``LISTEN``, see
    :meth:`Store.wakeup <sync_project.store.Store.wakeup>`), so a new event is claimed as soon as it commits and an
    idle drainer costs one claim per fallback interval. It listens before the first claim: an
    event committed between a claim that found nothing and the wait still wakes it.
    """
    total = DrainResult()
    started = quiet_since = time.monotonic()
    deadline = started + settings.max_linger_run_s
    with store.wakeup(sync.key, connection.connection_id, fallback_s=settings.wake_fallback_s) as wakeup:
        while True:
            remaining = None if settings.max_events is None else settings.max_events - total.events_claimed
            if remaining is not None and remaining <= 0:
                return total
            drained = drain_inbox(
                store,
                sync,
                connection,
                client,
                log,
                max_events=remaining,
                keeper=keeper,
                model_keepers=model_keepers,
                deadline=deadline,
                on_batch=on_batch,
            )
            total.add(drained)
            now = time.monotonic()
            if drained.events_claimed:
                quiet_since = now
            if now - quiet_since >= settings.linger_s or now >= deadline:
                return total
            wakeup.wait(min(quiet_since + settings.linger_s, deadline) - now)


def reset_partition(
    store: Store,
    sync: SyncDefinition,
    connection_id: str,
    *,
    records: RecordsAction,
    requested_by: str,
    wait_s: float = 0.0,
    ttl_s: float = 30.0,
    log: logging.Logger | Any = None,
) -> dict[str, ResetResult]:
    """Reset every model of the sync for the connection (:meth:`Store.reset`), holding the poll
    lease of each, the sync's own first, as polls take them, until all are reset: no poll runs
    between the reset of one model and the next. Results by store key, the sync's own first."""
    with ExitStack() as held:
        keepers = {
            key: held.enter_context(
                store.leases.hold(key, connection_id, "poll", requested_by, ttl_s=ttl_s, wait_s=wait_s, log=log)
            )
            for key in (sync.model_key(model.name) for model in sync.all_models)
        }
        return {
            key: store.reset(key, connection_id, records=records, requested_by=requested_by, lease=keeper.lease)
            for key, keeper in keepers.items()
        }
