"""A provider's standby drainer: drains any partition of the provider's syncs that has no drainer
(no Dagster in here: the standby job's op runs this, as the asset runs :mod:`partition_run`).

A partition's first webhook after a quiet spell used to pay a sensor tick, the run queue and a new
run process before anything claimed it. The standby is already up: it listens for wake-ups of every
partition of its syncs on one session (:meth:`Store.listener <sync_project.store.Store.listener>`; SQLite:
a scan of the due partitions every half second), and for a named partition whose drain lease is
free it takes that lease (fenced, as any drainer's), drains with the same
:func:`~sync_project.orchestration.webhook_drain.drain_inbox` a webhook run uses, and reports each
committed batch (the op records it as a materialization of that partition).

It keeps a partition it took while the partition has traffic, and releases it

* after ``idle_release_s`` without an event (a burst is over), or
* once a drainer run of the partition has started (``handed_over``): the inbox sensor requests one,
  as a successor waiting for this lease, whenever it sees the standby holding a partition, so a
  partition with steady traffic gets its standing drainer run while the standby goes back to
  waiting for the next quiet partition,

and all of them at its cap, ``max_run_s``, by which time the sensor has started its successor.
A partition drained in one turn for ``serve_s`` and still due goes to the back of the line, so one
busy partition never holds up another's first event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from sync_project.core import ProviderConnection, utcnow
from sync_project.core.http import ProviderError
from sync_project.core.provider import Provider
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.webhook_drain import DrainResult, drain_inbox
from sync_project.store import (
    DEFAULT_FALLBACK_S,
    DEFAULT_TTL_S,
    LeaseHeldError,
    LeaseKeeper,
    LeaseLostError,
    Store,
    StoreError,
    UnknownConnectionError,
)

Partition = tuple[str, str]
#: Due partitions read per scan: a scan is one grouped query over the narrow pending table.
SCAN_LIMIT = 500
#: How often the standby asks whether partitions it holds have their own drainer now.
HANDOVER_CHECK_S = 2.0
#: A partition handed over is not taken again for this long: its drainer asks for the lease
#: every half second, and a wake-up in between must not win the lease back from it.
HANDOVER_GRACE_S = 5.0


def standby_lease_key(provider: str, slot: int) -> tuple[str, str]:
    """(sync, connection_id) of the standby lease a provider's standby in ``slot`` holds."""
    return provider, f"standby.{slot}"


@dataclass(frozen=True)
class StandbySettings:
    max_run_s: float = 600.0
    serve_s: float = 1.0
    idle_release_s: float = 10.0
    lease_ttl_s: float = DEFAULT_TTL_S
    wake_fallback_s: float = DEFAULT_FALLBACK_S


@dataclass
class HeldPartition:
    """A partition the standby holds the drain lease of, and what it drained while holding it."""

    sync: SyncDefinition
    connection: ProviderConnection
    keeper: LeaseKeeper
    client: httpx.Client
    resources: ExitStack
    held_since: datetime
    last_event: float
    model_keepers: dict[str, LeaseKeeper] = field(default_factory=dict)
    drained: DrainResult = field(default_factory=DrainResult)


class Standby:
    """One standby drainer's loop; :meth:`run` returns after ``max_run_s``.

        ``on_batch(sync, connection_id, batch)`` is called after each committed batch, ``on_tick()``
    after each round (between waits);
        ``on_release(held, error)`` when a partition is given up (``error`` set when a store or
        provider failure ended its drain); ``handed_over()`` returns the ``sync:connection`` of held
        partitions whose own drainer run has started (it is asked every ``HANDOVER_CHECK_S``).
    """

    def __init__(
        self,
        store: Store,
        syncs: Mapping[str, SyncDefinition],
        provider: Provider,
        *,
        run_id: str,
        log: logging.Logger | Any,
        settings: StandbySettings | None = None,
        on_batch: Callable[[SyncDefinition, str, DrainResult], None] | None = None,
        on_release: Callable[[HeldPartition, str | None], None] | None = None,
        handed_over: Callable[[], set[str]] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.syncs = {key: sync for key, sync in syncs.items() if sync.on_webhook is not None}
        self.provider = provider
        self.run_id = run_id
        self.log = log
        self.settings = settings or StandbySettings()
        self._on_batch = on_batch
        self._on_release = on_release
        self._handed_over = handed_over
        self._on_tick = on_tick
        self._stopping = threading.Event()
        self.held: dict[Partition, HeldPartition] = {}
        #: Partitions handed over, and until when (monotonic) they are left to their drainer.
        self._handed: dict[Partition, float] = {}
        self.total = DrainResult()
        self.partitions_served: set[Partition] = set()

    def stop(self) -> None:
        """End :meth:`run` after its current round (within one wait), releasing what it holds."""
        self._stopping.set()

    def run(self) -> DrainResult:
        settings = self.settings
        deadline = time.monotonic() + settings.max_run_s
        last_scan = last_handover_check = float("-inf")
        behind: set[Partition] = set()
        try:
            with self.store.listener(self.syncs, fallback_s=settings.wake_fallback_s) as listener:
                # Listening before the first scan: an event committed after it still wakes the wait.
                named: set[Partition] | None = None
                while True:
                    now = time.monotonic()
                    todo = set(named or ()) | behind
                    if named is None or now - last_scan >= settings.wake_fallback_s:
                        todo |= self._scan()
                        last_scan = now
                    behind = self._serve_all(todo, deadline)
                    now = time.monotonic()
                    if self.held and now - last_handover_check >= HANDOVER_CHECK_S:
                        self._release_handed_over()
                        last_handover_check = now
                    self._release_idle(now)
                    if self._on_tick is not None:
                        self._on_tick()
                    if now >= deadline or self._stopping.is_set():
                        return self.total
                    named = None if behind else listener.wait(min(settings.wake_fallback_s, deadline - now))
        finally:
            for partition in list(self.held):
                self._release(partition, None)

    def _scan(self) -> set[Partition]:
        due = self.store.inbox.due_partitions(limit=SCAN_LIMIT)
        return {(p.sync, p.connection_id) for p in due if p.sync in self.syncs}

    def _held_by_others(self) -> set[Partition]:
        """Partitions whose drain lease another run holds unexpired (its drainer drains them)."""
        now = utcnow()
        held = set()
        for lease in self.store.leases.list():
            if lease.role != "drain" or lease.holder in (None, self.run_id) or lease.sync not in self.syncs:
                continue
            expires = lease.expires_at
            if expires is not None and (expires if expires.tzinfo else expires.replace(tzinfo=now.tzinfo)) > now:
                held.add((lease.sync, lease.connection_id))
        return held

    def _serve_all(self, todo: set[Partition], deadline: float) -> set[Partition]:
        """Drain each partition of ``todo`` for one turn; returns those still due after theirs."""
        if not todo:
            return set()
        now = time.monotonic()
        self._handed = {p: until for p, until in self._handed.items() if until > now}
        others = self._held_by_others() if todo - set(self.held) else set()
        behind = set()
        for partition in sorted(todo):
            if partition not in self.held and (partition in others or partition in self._handed):
                continue
            if time.monotonic() >= deadline:
                break
            if self._serve(partition):
                behind.add(partition)
        return behind

    def _serve(self, partition: Partition) -> bool:
        held = self.held.get(partition) or self._take(partition)
        if held is None:
            return False
        sync, connection_id = partition
        turn_ends = time.monotonic() + self.settings.serve_s
        on_batch = self._on_batch
        try:
            drained = drain_inbox(
                self.store,
                held.sync,
                held.connection,
                held.client,
                self.log,
                keeper=held.keeper,
                model_keepers=held.model_keepers,
                deadline=turn_ends,
                on_batch=(lambda batch: on_batch(held.sync, connection_id, batch)) if on_batch is not None else None,
            )
        except LeaseLostError as error:
            self.log.warning(f"standby: {error}")
            self._release(partition, str(error))
            return False
        except (ProviderError, StoreError, SQLAlchemyError) as error:
            self.log.warning(f"standby: draining {sync} {connection_id} failed: {type(error).__name__}: {error}")
            self._release(partition, f"{type(error).__name__}: {error}")
            return False
        held.drained += drained
        self.total += drained
        if drained.events_claimed:
            held.last_event = time.monotonic()
            self.partitions_served.add(partition)
        # Cut short by its turn: events may remain, served after the other partitions' turns.
        return bool(drained.events_claimed) and time.monotonic() >= turn_ends

    def _take(self, partition: Partition) -> HeldPartition | None:
        sync_key, connection_id = partition
        sync = self.syncs[sync_key]
        try:
            connection = self.store.connections.get(sync.provider, connection_id)
        except UnknownConnectionError:
            return None  # events of an unregistered connection wait for it
        if connection.status != "active":
            return None
        resources = ExitStack()
        ttl_s = self.settings.lease_ttl_s
        try:
            keeper = resources.enter_context(
                self.store.leases.hold(sync_key, connection_id, "drain", self.run_id, ttl_s=ttl_s, log=self.log)
            )
        except LeaseHeldError:
            return None  # another drainer took it meanwhile: it drains these events
        try:
            # A sync of several models writes each further model under its own drain lease,
            # taken after the sync's own as every drainer takes them (a dead holder's expires).
            model_keepers = {
                key: resources.enter_context(
                    self.store.leases.hold(
                        key, connection_id, "drain", self.run_id, ttl_s=ttl_s, wait_s=ttl_s + 5.0, log=self.log
                    )
                )
                for key in (sync.model_key(model.name) for model in sync.models)
            }
            client = resources.enter_context(self.provider.client(connection))
        except BaseException:
            resources.close()
            raise
        self.log.info(f"standby: {sync_key} {connection_id}: holding {keeper.lease.describe()}")
        held = HeldPartition(sync, connection, keeper, client, resources, utcnow(), time.monotonic(), model_keepers)
        self.held[partition] = held
        return held

    def _release(self, partition: Partition, error: str | None) -> None:
        held = self.held.pop(partition)
        try:
            held.resources.close()  # the client, then the lease (released unless lost)
        finally:
            if self._on_release is not None:
                self._on_release(held, error)

    def _release_idle(self, now: float) -> None:
        for partition, held in list(self.held.items()):
            if now - held.last_event >= self.settings.idle_release_s:
                self._release(partition, None)

    def _release_handed_over(self) -> None:
        if self._handed_over is None:
            return
        started = self._handed_over()
        for partition in list(self.held):
            if f"{partition[0]}:{partition[1]}" in started:
                self.log.info(f"standby: {partition[0]} {partition[1]}: its drainer has started; handing it over")
                self._release(partition, None)
                self._handed[partition] = time.monotonic() + HANDOVER_GRACE_S
