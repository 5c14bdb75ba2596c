"""Draining one (sync, connection)'s inbox inside a webhook-mode run (no Dagster in here).

Each batch is ONE records transaction: claim the due pending events, run ``on_webhook`` on each,
merge the changes they return, and mark those events done, all before the commit. A crash
anywhere in it rolls everything back and leaves the events pending for the next run. A handler
that raises (or returns a record the store would refuse) fails only its own event: the rest of
the batch is applied, and that event is retried with backoff after the commit, until it is
dead-lettered after ``max_attempts``.

Retention: after draining, a run deletes done events older than ``SYNC_INBOX_RETENTION_DAYS``
(default 7; 0 keeps them), as ``sync-project inbox purge`` does. The purge walks the oldest
acknowledgements first and stops at the first young one, so with nothing to purge it is one index
probe; a failed purge is logged, never a failed run (the next run tries again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
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
    MergeStrategy,
    ProviderConnection,
    RecordSpec,
    Save,
    SyncDefinition,
    Update,
    WebhookContext,
    utcnow,
)
from sync_project.store import Store
from sync_project.store.errors import StoreError
from sync_project.store.inbox import DEFAULT_MAX_ATTEMPTS, ClaimedEvent, InboxEvent
from sync_project.store.leases import LeaseKeeper
from sync_project.store.merge import Action, Incoming, prepare_batch, supersedes
from sync_project.store.records import PreparedBatch, RecordWriter

_ACTIONS: tuple[Action, ...] = ("save", "update", "delete")
#: A repeated key in one merge batch is collapsed by the store; for these actions the collapse
#: ends where applying the changes one by one would (last copy, or newest provider version).
#: Partial updates are not collapsible (a deep merge of patches differs when a field changes type).
_COLLAPSIBLE: frozenset[Action] = frozenset({"save", "delete"})


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


@dataclass(frozen=True)
class _Change:
    #: The store key of the model it changes.
    key: str
    action: Action
    #: Validated, encoded and hashed once, by the handler's event; merged as it is.
    incoming: Incoming


def drain_inbox(
    store: Store,
    sync: SyncDefinition,
    connection: ProviderConnection,
    client: httpx.Client,
    log: logging.Logger | Any,
    *,
    batch_size: int = 500,
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
        with store.writer(sync.key, connection.connection_id, spec, lease=lease) as writer:
            events = store.inbox.claim(writer.conn, sync.key, connection.connection_id, limit=limit)
            if not events:
                break
            done: list[int] = []
            # One stamp and one change-feed row per model for the whole batch, however many
            # merges its event order splits it into.
            with ExitStack() as feeds:
                feeds.enter_context(writer.one_feed_entry())
                buffers = {sync.key: _ChangeBuffer(writer, spec)}

                # This batch's buffers, bound here: the closure must not see a later batch's.
                def buffer_of(key: str, buffers: dict[str, _ChangeBuffer] = buffers) -> _ChangeBuffer:
                    # Another model's partition joins the transaction at its first change, under
                    # its own batch lock and lease.
                    if key not in buffers:
                        keeper_of = extra_keepers.get(key)
                        if keeper_of is not None:
                            keeper_of.check()
                        model_spec = sync.model_spec(key.split("/", 1)[1])
                        joined = store.writer_beside(
                            writer, key, model_spec, lease=keeper_of.lease if keeper_of is not None else None
                        )
                        feeds.enter_context(joined.one_feed_entry())
                        buffers[key] = _ChangeBuffer(joined, model_spec)
                    return buffers[key]

                for event in events:
                    handled_at = utcnow()
                    try:
                        changes = _handle(sync, context, event, handled_at)
                    except Exception as error:  # noqa: BLE001 - the event fails, not the batch
                        failures.append((event.id, f"{type(error).__name__}: {error}"))
                        continue
                    for change in changes:
                        buffer_of(change.key).add([change], handled_at)
                    done.append(event.id)
                merged_by_key = {key: buffer.finish() for key, buffer in buffers.items()}
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


def purge_expired(store: Store, log: logging.Logger | Any) -> int:
    """Delete done (and ignored, routed) events past the retention; 0 if none or disabled."""
    days = settings.inbox_retention_days()
    if days is None:
        return 0
    try:
        purged = store.inbox.purge(timedelta(days=days))
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


def _handle(sync: SyncDefinition, context: WebhookContext, event: ClaimedEvent, handled_at: datetime) -> list[_Change]:
    """Run the handler and validate every change it returns, so a bad one fails only this event."""
    assert sync.on_webhook is not None
    changes: list[_Change] = []
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
        key, spec = sync.model_key(change.model), sync.model_spec(change.model)
        (incoming,) = prepare_batch(action, [change.record], spec, handled_at)
        changes.append(_Change(key, action, incoming))
    return changes


class _ChangeBuffer:
    """Accumulates one batch's changes into as few merges as applying them in event order allows.

    Changes go into one save, one update and one delete batch while their keys are disjoint. When a
    key comes back under another action (a Save then a Delete of one record), or as a second
    partial update, the buffer is merged first, so the later change lands after the earlier one.

    ``fetched_at`` of a merge is the time its newest handler ran, and never earlier than the end
    of this transaction's previous merge: the writer holds the batch lock since before the first
    handler ran, so the only writes after a handler read its data are this batch's own earlier
    (older) events, which must not make later events look stale. Each change keeps what it was
    prepared with, by its own event: a delete without a timestamp is dated when its handler ran.
    """

    def __init__(self, writer: RecordWriter, spec: RecordSpec) -> None:
        self._writer = writer
        self._spec = spec
        self._newest_wins = spec.strategy is MergeStrategy.NEWEST_SOURCE_WINS
        self._batches: dict[Action, dict[str, Incoming]] = {action: {} for action in _ACTIONS}
        self._keys: dict[str, Action] = {}
        self._newest_handled: datetime | None = None
        self._previous_merge_end: datetime | None = None
        self.result = MergeResult()

    def add(self, changes: list[_Change], handled_at: datetime) -> None:
        for change in changes:
            action, incoming = change.action, change.incoming
            earlier = self._keys.get(incoming.key)
            if earlier is not None and not (earlier == action and earlier in _COLLAPSIBLE):
                self._merge()
            batch = self._batches[action]
            kept = batch.get(incoming.key)
            if kept is None or not supersedes(kept, incoming.source_updated_at, action, self._newest_wins):
                batch[incoming.key] = incoming
            self._keys[incoming.key] = action
            self._newest_handled = handled_at

    def finish(self) -> MergeResult:
        self._merge()
        return self.result

    def _merge(self) -> None:
        if not self._keys or self._newest_handled is None:
            return
        fetched_at = self._newest_handled
        if self._previous_merge_end is not None and self._previous_merge_end > fetched_at:
            fetched_at = self._previous_merge_end
        for action in _ACTIONS:
            if self._batches[action]:
                prepared = PreparedBatch(action, self._spec, fetched_at, list(self._batches[action].values()))
                self.result += self._writer.merge(action, prepared)
                self._batches[action] = {}
        self._keys.clear()
        self._previous_merge_end = utcnow()
