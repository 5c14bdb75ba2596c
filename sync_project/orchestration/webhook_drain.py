"""Draining one (sync, connection)'s inbox inside a webhook-mode run (no Dagster in here).

Each batch is ONE records transaction: claim the due pending events, run ``on_webhook`` on each,
merge the changes they return, and mark those events done, all before the commit. A crash
anywhere in it rolls everything back and leaves the events pending for the next run. A handler
that raises (or returns a record the store would refuse) fails only its own event: the rest of
the batch is applied, and that event is retried with backoff after the commit, until it is
dead-lettered after ``max_attempts``.

Retention: after draining, a run deletes done events older than ``SYNC_INBOX_RETENTION_DAYS``
(default 7; 0 keeps them), as ``sync-project inbox purge`` does, at most
``RETENTION_ROWS_PER_DRAIN`` per call. The purge walks the oldest
acknowledgements first and stops at the first young one, so with nothing to purge it is one index
probe; a failed purge is logged, never a failed run (the next run tries again).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from sync_project import settings
from sync_project.core import (
    Delete,
    InboundEvent,
    MergeResult,
    ProviderConnection,
    RecordSpec,
    Save,
    SyncDefinition,
    Update,
    WebhookContext,
    utcnow,
)
from sync_project.store import (
    DEFAULT_MAX_ATTEMPTS,
    Action,
    ClaimedEvent,
    InboxEvent,
    LeaseKeeper,
    Step,
    Store,
    StoreError,
    prepare_batch,
)

#: Events claimed per batch (one transaction): each batch pays a fixed cost (batch lock, lease
#: check, claim, the feed's stamp, commit) of a few milliseconds, so 2,000 events spend it on four
#: times as many events as 500 did (measured: mixed drains 30-60 % faster on Postgres). The
#: deadline is checked between batches: a run ends within one batch of it.
DEFAULT_BATCH_SIZE = 2000


@dataclass
class DrainResult:
    """What one drain did: the merge counts and where every claimed event ended up."""

    merge: MergeResult = field(default_factory=MergeResult)
    events_done: int = 0
    events_retrying: int = 0
    events_dead: int = 0
    batches: int = 0
    #: A sync of several models: the counts of each further model, by store key (``merge`` is the
    #: sync's own model's).
    models: dict[str, MergeResult] = field(default_factory=dict)

    def add(self, other: DrainResult) -> None:
        self.merge += other.merge
        self.events_done += other.events_done
        self.events_retrying += other.events_retrying
        self.events_dead += other.events_dead
        self.batches += other.batches
        for key, merged in other.models.items():
            self.models.setdefault(key, MergeResult())
            self.models[key] += merged

    @property
    def events_claimed(self) -> int:
        return self.events_done + self.events_retrying + self.events_dead

    def __iadd__(self, other: DrainResult) -> DrainResult:
        self.add(other)
        return self


def drain_inbox(
    store: Store,
    sync: SyncDefinition,
    connection: ProviderConnection,
    client: httpx.Client,
    log: logging.Logger | Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_events: int | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    retry_base_delay_s: float = 1.0,
    keeper: LeaseKeeper | None = None,
    model_keepers: Mapping[str, LeaseKeeper] | None = None,
    apply_retention: bool = True,
    deadline: float | None = None,
    on_batch: Callable[[DrainResult], None] | None = None,
) -> DrainResult:
    """Apply the due pending inbox events of (``sync``, ``connection``) until none is due, or
    ``deadline`` (``time.monotonic()``) has passed: checked between batches, so under a steady
    stream a run still ends within one batch of it, and its successor takes the rest.

    ``on_batch(batch)`` is called after each committed batch with that batch's own counts (the
    asset records a materialization per batch with it).

    With ``keeper`` (the run's drain lease) every batch, acknowledgements included, is fenced by
    it: a run that lost its lease raises :class:`~sync_project.store.LeaseLostError` and leaves
    the events it had not committed pending for the new holder.

    ``max_events`` bounds the events claimed by this call (the rest wait for the next run).
    Failed events are due again after ``retry_base_delay_s * 2**attempts`` seconds (capped at 1 h).
    With ``apply_retention`` (default) it ends with :func:`purge_expired`.
    """
    if sync.on_webhook is None:
        raise ValueError(f"sync {sync.key} declares no on_webhook handler")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    context = WebhookContext(client=client, connection=connection, log=log)
    spec = sync.record_spec
    #: Each model's spec by store key, built once per drain (a RecordSpec is built per call).
    specs: dict[str, RecordSpec] = {sync.key: spec}
    extra_keepers = dict(model_keepers or {})
    result = DrainResult()
    claimed = 0
    while max_events is None or claimed < max_events:
        if deadline is not None and result.batches and time.monotonic() >= deadline:
            break
        limit = batch_size if max_events is None else min(batch_size, max_events - claimed)
        failures: list[tuple[int, str]] = []
        lease = None
        if keeper is not None:
            keeper.check()
            lease = keeper.lease
        with _no_collection_passes(), store.writer(sync.key, connection.connection_id, spec, lease=lease) as writer:
            events = store.inbox.claim(writer.conn, sync.key, connection.connection_id, limit=limit)
            if not events:
                break
            done: list[int] = []
            # Each model's changes in event order: one plan and one execution per model, after
            # every handler of the batch ran (see RecordWriter.merge_in_order).
            steps: dict[str, list[Step]] = {sync.key: []}
            for event in events:
                handled_at = utcnow()
                try:
                    changes = _handle(sync, context, event, handled_at, specs)
                except Exception as error:  # noqa: BLE001 - the event fails, not the batch
                    failures.append((event.id, f"{type(error).__name__}: {error}"))
                    continue
                for key, step in changes:
                    steps.setdefault(key, []).append(step)
                done.append(event.id)
            merged_by_key: dict[str, MergeResult] = {}
            # One stamp and one change-feed row per model for the whole batch.
            for key, model_steps in steps.items():
                if key == sync.key:
                    model_writer = writer
                else:
                    # Another model's partition joins the transaction, under its own batch lock
                    # and lease.
                    keeper_of = extra_keepers.get(key)
                    if keeper_of is not None:
                        keeper_of.check()
                    model_writer = store.writer_beside(
                        writer, key, specs[key], lease=keeper_of.lease if keeper_of is not None else None
                    )
                with model_writer.one_feed_entry():
                    merged_by_key[key] = model_writer.merge_in_order(model_steps)
            store.inbox.mark_done(writer.conn, done)
        merged = merged_by_key.pop(sync.key)
        for model in sync.models:
            merged_by_key.setdefault(sync.model_key(model.name), MergeResult())
        claimed += len(events)
        result.batches += 1
        result.events_done += len(done)
        result.merge += merged
        for key, model_merged in merged_by_key.items():
            result.models.setdefault(key, MergeResult())
            result.models[key] += model_merged
        retrying = dead = 0
        for event_id, message in failures:
            status = store.inbox.mark_failed(
                event_id, message, max_attempts=max_attempts, base_delay_s=retry_base_delay_s, lease=lease
            )
            if status == "dead":
                dead += 1
            elif status == "pending":
                retrying += 1
        result.events_retrying += retrying
        result.events_dead += dead
        if on_batch is not None:
            on_batch(DrainResult(merged, len(done), retrying, dead, 1, merged_by_key))
        log.info(
            f"inbox {sync.key}/{connection.connection_id}: batch of {len(events)} events: "
            f"{len(done)} done, {retrying} retrying, {dead} dead; "
            + ", ".join(f"{name} {count}" for name, count in merged.as_dict().items() if count)
        )
        if failures:
            log.warning(
                f"inbox {sync.key}/{connection.connection_id}: handler failed for event(s) "
                + ", ".join(f"{event_id} ({error[:200]})" for event_id, error in failures[:5])
                + (" ..." if len(failures) > 5 else "")
            )
    # Only after a call that drained something: a standing drainer calls this on every wake-up.
    if apply_retention and result.batches:
        purge_expired(store, log)
    return result


#: Rows the automatic retention deletes per drain, at most: a backlog (retention enabled on an
#: inbox of millions, or shortened) is spread over the drains that follow, a few 5,000-row
#: transactions each, instead of holding up one drainer for minutes.
RETENTION_ROWS_PER_DRAIN = 50_000


@contextmanager
def _no_collection_passes() -> Iterator[None]:
    """The cyclic garbage collector paused for one batch.

    A batch keeps its events, payloads and changes (tens of thousands of containers) alive until
    it commits, then frees them by reference counting. Collecting meanwhile promotes them all to
    the oldest generation and triggers full passes over the whole process heap (a Dagster run's
    is large): measured, a third of a drain's wall time went to them. Paused, they die young; a
    cycle a handler made is collected after the batch. The collector is left as it was found
    (disabled stays disabled), and a batch is bounded (``batch_size``), so is what it allocates.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def purge_expired(store: Store, log: logging.Logger | Any) -> int:
    """Delete done (and ignored, routed) events past the retention, at most
    :data:`RETENTION_ROWS_PER_DRAIN` of them; 0 if none or disabled."""
    days = settings.inbox_retention_days()
    if days is None:
        return 0
    try:
        purged = store.inbox.purge(timedelta(days=days), limit=RETENTION_ROWS_PER_DRAIN)
    except (StoreError, SQLAlchemyError) as error:  # retention is housekeeping: the drained events are committed
        log.warning(f"inbox retention: purge of events older than {days:g} days failed: {type(error).__name__}")
        return 0
    if purged:
        log.info(f"inbox retention: purged {purged} finished event(s) older than {days:g} days")
    return purged


def inbound_event(event: ClaimedEvent | InboxEvent) -> InboundEvent:
    """The event as the receiver parsed it, rebuilt from its inbox row."""
    return InboundEvent(
        event_key=event.event_key,
        event_type=event.event_type,
        account_id=event.account_id,
        payload=event.payload,
    )


def _handle(
    sync: SyncDefinition,
    context: WebhookContext,
    event: ClaimedEvent,
    handled_at: datetime,
    specs: dict[str, RecordSpec],
) -> list[tuple[str, Step]]:
    """Run the handler and validate every change it returns, so a bad one fails only this event.

    Returns each change as (the store key of its model, its step)."""
    assert sync.on_webhook is not None
    changes: list[tuple[str, Step]] = []
    returned: Iterable[object] | None = sync.on_webhook(context, inbound_event(event))
    for change in returned or ():
        if isinstance(change, Save):
            action: Action = "save"
        elif isinstance(change, Update):
            action = "update"
        elif isinstance(change, Delete):
            action = "delete"
        else:
            raise TypeError(f"on_webhook returned a {type(change).__name__}; expected Save, Update or Delete")
        # Raises ValueError for a model the sync does not declare, and InvalidBatchError (no
        # primary key, not JSON, bad timestamp), before any SQL runs.
        key = sync.model_key(change.model)
        spec = specs.get(key)
        if spec is None:
            spec = specs[key] = sync.model_spec(change.model)
        (incoming,) = prepare_batch(action, [change.record], spec, handled_at)
        changes.append((key, Step(action, incoming, handled_at)))
    return changes
