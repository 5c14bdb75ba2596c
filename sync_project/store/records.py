"""Guarded writes of records: one :class:`RecordWriter` is one transaction on one (sync, connection).

The writer takes the batch lock first, so the stored state it reads cannot change before it writes,
and the counts it returns are what happened. A writer on behalf of a run also proves, right after,
that the run's lease is still current (the fence: :func:`~sync_project.store.leases.check_lease`),
so a run that lost its partition to another writes nothing. Checkpoints and inbox acknowledgements
are written through the same transaction (:attr:`RecordWriter.conn`), so a crash loses or repeats
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.engine import Connection

from sync_project.core.clock import utcnow
from sync_project.core.records import RecordLike
from sync_project.store import feed
from sync_project.store.bulk import KEY_CHUNK, SaveUnread, bulk_writer
from sync_project.store.errors import InvalidBatchError
from sync_project.store.leases import Lease, check_lease
from sync_project.store.locks import take_batch_lock
from sync_project.store.merge import (
    Action,
    Incoming,
    MergeResult,
    MergeStrategy,
    Plan,
    RecordSpec,
    Step,
    Stored,
    plan_batch,
    plan_in_order,
    prepare_batch,
    segments,
)
from sync_project.store.schema import feed_entries, records

if TYPE_CHECKING:
    from sync_project.store.state import FullWindow

_ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class PreparedBatch:
    """A batch already validated, de-duplicated, encoded and hashed: what :func:`prepare` returns.

    Preparing needs no database and no lock, and it is a fifth of a merge's time (canonical JSON
    and its hash, per record). A poll prepares page k+1 on its fetch thread while page k's
    transaction runs, so that work overlaps the database's instead of adding to it. The webhook
    drain builds one from changes its handlers returned, each prepared once, by its own event
    (a delete without a timestamp is dated by that event's handling, not by ``fetched_at``).
    """

    action: Action
    spec: RecordSpec
    fetched_at: datetime
    items: list[Incoming]


def prepare(
    action: Action, batch: Iterable[RecordLike], spec: RecordSpec, *, fetched_at: datetime | None = None
) -> PreparedBatch:
    """Validate and encode ``batch`` for a later ``RecordWriter.merge`` of the same action and spec.

    Raises :class:`InvalidBatchError` here, before any transaction, for any bad record.
    """
    fetched_at = _aware("fetched_at", fetched_at or utcnow())
    return PreparedBatch(action, spec, fetched_at, prepare_batch(action, batch, spec, fetched_at))


class WriteHints:
    """What the last saved page of each (sync, connection) was like: mostly written, or not.

    A save can read the stored state of its keys and then write what changed, or write first with
    the guard inside the upsert and read only what it left (``PostgresBulk.save_unread``). The
    results are identical; the cost is not. Writing first skips a read of the whole page but sends
    every record's content and locks the rows it leaves, so it pays when most of a page changes
    (incremental polls, webhooks, first loads) and loses when most is unchanged (full refreshes).
    Pages of one sync tend to resemble the page before, so each save follows its predecessor's
    outcome. A store keeps one of these for its writers; it is a hint, never a correctness input.
    SQLite always reads first: in-process, a read costs it no round trip and no parse.
    """

    #: The share of a page's keys that must have been written for the next page to write first.
    WRITE_FIRST_AT = 0.5
    _LIMIT = 4096

    def __init__(self) -> None:
        self._mostly_written: dict[tuple[str, str], bool] = {}

    def write_first(self, sync: str, connection_id: str) -> bool:
        return self._mostly_written.get((sync, connection_id), False)

    def observe(self, sync: str, connection_id: str, keys: int, written: int) -> None:
        if len(self._mostly_written) >= self._LIMIT:
            self._mostly_written.clear()  # a bounded cache of hints: forgetting costs one read
        self._mostly_written[(sync, connection_id)] = written >= keys * self.WRITE_FIRST_AT


class RecordWriter:
    """Merges batches into the records of one (sync, connection) inside one locked transaction."""

    def __init__(
        self,
        conn: Connection,
        sync: str,
        connection_id: str,
        spec: RecordSpec,
        hints: WriteHints | None = None,
        *,
        lease: Lease | None = None,
    ) -> None:
        _check_scope(sync, connection_id)
        if lease is not None and (lease.sync, lease.connection_id) != (sync, connection_id):
            raise ValueError(f"{lease.describe()} does not cover {sync} for connection {connection_id!r}")
        if not isinstance(spec, RecordSpec):
            raise InvalidBatchError(f"spec must be a RecordSpec, not {type(spec).__name__}")
        self.conn = conn
        self.sync = sync
        self.connection_id = connection_id
        self.spec = spec
        self._last_stamp: datetime | None = None
        # The connection's feed totals (see feed.compact), read with the last stamp.
        self._ids_listed = 0
        self._ids_superseded = 0
        self._hints = hints if hints is not None else WriteHints()
        #: Inside :meth:`one_feed_entry`: its stamp, and the keys (in order) its entry will list.
        self._held_stamp: datetime | None = None
        self._held_keys: dict[str, None] | None = None
        self._held_superseded = 0
        take_batch_lock(conn, sync, connection_id)
        if lease is not None:
            check_lease(conn, lease)
        self.lease = lease
        self._bulk = bulk_writer(conn, sync, connection_id)

    # -- batches ------------------------------------------------------------------------------

    def save(
        self,
        batch: Iterable[RecordLike] | PreparedBatch,
        *,
        fetched_at: datetime | None = None,
        seen_by_run: str | None = None,
    ) -> MergeResult:
        """Upsert full records."""
        return self.merge("save", batch, fetched_at=fetched_at, seen_by_run=seen_by_run)

    def update(self, batch: Iterable[RecordLike] | PreparedBatch, *, fetched_at: datetime | None = None) -> MergeResult:
        """Deep-merge partial records into existing live records; unknown keys are skipped."""
        return self.merge("update", batch, fetched_at=fetched_at)

    def delete(self, batch: Iterable[RecordLike] | PreparedBatch, *, fetched_at: datetime | None = None) -> MergeResult:
        """Tombstone records (each needs only its primary key and, if known, its timestamp)."""
        return self.merge("delete", batch, fetched_at=fetched_at)

    def merge(
        self,
        action: Action,
        batch: Iterable[RecordLike] | PreparedBatch,
        *,
        fetched_at: datetime | None = None,
        seen_by_run: str | None = None,
    ) -> MergeResult:
        """Merge ``batch`` (records, or a :class:`PreparedBatch` of the same action and spec)."""
        if seen_by_run is not None and (not isinstance(seen_by_run, str) or not 0 < len(seen_by_run) <= 64):
            raise InvalidBatchError(f"seen_by_run must be a run id of 1 to 64 characters, got {seen_by_run!r}")
        if isinstance(batch, PreparedBatch):
            self._check_prepared(action, batch, fetched_at)
        else:
            # The whole batch is validated before the first statement: a bad record writes nothing.
            batch = prepare(action, batch, self.spec, fetched_at=fetched_at)
        fetched_at, incoming = batch.fetched_at, batch.items
        result = MergeResult()
        for start in range(0, len(incoming), KEY_CHUNK):
            chunk = incoming[start : start + KEY_CHUNK]
            if action != "save":
                result += self._read_plan_apply(action, chunk, fetched_at, seen_by_run)
                continue
            # The plan's two executions: the set-based one (the guards in SQL) when the backend
            # has it and the partition's saves mostly write; else read, plan in Python, write.
            save_unread = self._bulk.save_unread
            if save_unread is not None and self._hints.write_first(self.sync, self.connection_id):
                chunk_result = self._save_unread(save_unread, chunk, fetched_at, seen_by_run)
            else:
                chunk_result = self._read_plan_apply(action, chunk, fetched_at, seen_by_run)
            self._hints.observe(self.sync, self.connection_id, len(chunk), chunk_result.added + chunk_result.updated)
            result += chunk_result
        return result

    def merge_in_order(self, steps: Sequence[Step]) -> MergeResult:
        """Merge event-ordered changes (a webhook batch) as if each segment of them were merged
        one after another (see :func:`~sync_project.store.merge.segments`), in one execution.

        A batch that is one plain batch (one action, its keys collapsible) goes through
        :meth:`merge`, which may write first. Any other is planned in Python over one read of
        all its keys (:func:`~sync_project.store.merge.plan_in_order`) and written with one
        statement per kind of write: one stamp and one change-feed entry for the whole batch.
        """
        cut = segments(steps, self.spec)
        if not cut:
            return MergeResult()
        if len(cut) == 1 and len(cut[0][1]) == 1:
            fetched_at, batches = cut[0]
            ((action, items),) = batches.items()
            return self.merge(action, PreparedBatch(action, self.spec, fetched_at, items))
        keys = list(dict.fromkeys(step.incoming.key for step in steps))
        stored: dict[str, Stored] = {}
        with_data = any(step.action == "update" for step in steps)
        with_modified = self.spec.strategy is MergeStrategy.IGNORE_IF_MODIFIED_AFTER
        for start in range(0, len(keys), KEY_CHUNK):
            stored.update(
                self._bulk.read_state(keys[start : start + KEY_CHUNK], with_data=with_data, with_modified=with_modified)
            )
        plan = plan_in_order(steps, stored, self.spec)
        for start in range(0, max(len(plan.writes), len(plan.advance)), KEY_CHUNK):
            self._apply(
                Plan(writes=plan.writes[start : start + KEY_CHUNK], advance=plan.advance[start : start + KEY_CHUNK]),
                None,
            )
        return plan.result

    @contextmanager
    def one_feed_entry(self) -> Iterator[None]:
        """Merges inside share one stamp and one change-feed entry, written when the block ends.

        For a caller that splits one transaction into several merges to keep their order (a
        webhook run's batch: a save, then a delete of the same record): every record they change
        gets the same ``last_modified_at``, which is still after every earlier write, and the
        feed gets one row for the batch instead of one per merge. A record changed twice is
        listed once, with its final state. Nothing is written if the block raises (the
        transaction rolls back anyway).
        """
        if self._held_keys is not None:
            raise RuntimeError("one_feed_entry is already active")
        self._held_keys, self._held_stamp, self._held_superseded = {}, None, 0
        try:
            yield
            keys, stamp, superseded = list(self._held_keys), self._held_stamp, self._held_superseded
        finally:
            self._held_keys, self._held_stamp = None, None
        if stamp is not None and keys:
            self._insert_feed_entry(stamp, keys, superseded)

    def delete_unseen(self, run_id: str, started_at: datetime) -> int:
        """Tombstone live records a full refresh did not see and nobody modified since it started.

        Call it only after the whole fetch succeeded: a failed or partial fetch deletes nothing.

        Absence is weak evidence, so these tombstones keep the provider timestamp of the last copy
        seen alive: any later copy that is not older (the next poll that returns the record) brings
        it back, while copies older than the last live one still cannot. A delete the provider
        announced is dated by the provider (or by when we heard of it) and only a newer copy
        revives it. Dating an inferred tombstone by the run, as this once did, made a wrong
        tombstone permanent: every later copy of the unchanged record looked stale beside it.
        """
        started_at = _aware("started_at", started_at)
        now = self._stamp()
        statement = (
            update(records)
            .where(
                records.c.sync == self.sync,
                records.c.connection_id == self.connection_id,
                records.c.deleted_at.is_(None),
                or_(records.c.seen_by_run.is_(None), records.c.seen_by_run != run_id),
                records.c.last_modified_at < started_at,
            )
            .values(deleted_at=now, last_modified_at=now, last_action="deleted")
            .returning(records.c.external_id)
        )
        keys = list(self.conn.execute(statement).scalars())
        self._record_feed_entry(now, [(key, True) for key in keys])
        return len(keys)

    def tombstone_all(self) -> int:
        """Tombstone every live record of the partition (a reset that empties it); returns how many.

        The tombstones are weak, like those of :meth:`delete_unseen`: they keep the provider
        timestamp of the last copy, so the first poll after the reset that returns a record brings
        it back. They are one write of the change feed, so consumers see each record deleted.
        """
        now = self._stamp()
        statement = (
            update(records)
            .where(
                records.c.sync == self.sync,
                records.c.connection_id == self.connection_id,
                records.c.deleted_at.is_(None),
            )
            .values(deleted_at=now, last_modified_at=now, last_action="deleted")
            .returning(records.c.external_id)
        )
        keys = list(self.conn.execute(statement).scalars())
        self._record_feed_entry(now, [(key, True) for key in keys])
        return len(keys)

    def next_stamp(self) -> datetime:
        """A stamp after every write of the partition so far (a reset's moment in feed order)."""
        return self._stamp()

    def remove_all(self) -> tuple[int, datetime]:
        """Delete every record of the partition, tombstones included, and its change-feed entries.

        Returns how many rows went and a stamp after every write of the partition before them:
        the moment of the removal as the change feed orders it (see :mod:`~sync_project.store.resets`).
        """
        stamp = self._stamp()
        removed = self.conn.execute(
            delete(records).where(records.c.sync == self.sync, records.c.connection_id == self.connection_id)
        ).rowcount
        self.conn.execute(
            delete(feed_entries).where(
                feed_entries.c.sync == self.sync, feed_entries.c.connection_id == self.connection_id
            )
        )
        self._ids_listed = self._ids_superseded = 0
        return int(removed or 0), stamp

    # -- sync state, in the same transaction as the records it describes ---------------------

    def set_checkpoint(self, checkpoint: Mapping[str, Any] | None, *, sync: str | None = None) -> None:
        """Store the checkpoint of this writer's sync, or of ``sync``: a sync of several models
        keeps one checkpoint, under its own key, whichever model's page carried it."""
        from sync_project.store.state import upsert_state

        upsert_state(
            self.conn,
            sync or self.sync,
            self.connection_id,
            checkpoint=None if checkpoint is None else json.dumps(checkpoint, sort_keys=True),
        )

    def save_window(self, window: FullWindow, *, sync: str | None = None) -> None:
        """Store the open full refresh's progress with the page that made it (same transaction),
        under this writer's sync or ``sync`` (a sync of several models keeps one window)."""
        from sync_project.store.state import open_window

        open_window(self.conn, sync or self.sync, self.connection_id, window)

    def close_window(self, window: FullWindow, *, detect_deletes: bool) -> int:
        """End a complete full refresh: tombstone what the whole window never saw (if asked),
        hand its final checkpoint to incremental runs, and date the connection's last full
        refresh. Returns the records tombstoned."""
        from sync_project.store.state import close_window

        deleted = self.delete_unseen(window.window_id, window.started_at) if detect_deletes else 0
        if window.checkpoint is not None:
            self.set_checkpoint(window.checkpoint)
        close_window(self.conn, self.sync, self.connection_id, utcnow())
        return deleted

    # -- internals ----------------------------------------------------------------------------

    def _read_plan_apply(
        self, action: Action, chunk: list[Incoming], fetched_at: datetime, seen_by_run: str | None
    ) -> MergeResult:
        stored = self._bulk.read_state(
            [item.key for item in chunk],
            with_data=action == "update",
            with_modified=self.spec.strategy is MergeStrategy.IGNORE_IF_MODIFIED_AFTER,
        )
        plan = plan_batch(action, chunk, stored, self.spec, fetched_at)
        self._apply(plan, seen_by_run)
        return plan.result

    def _save_unread(
        self, save_unread: SaveUnread, chunk: list[Incoming], fetched_at: datetime, seen_by_run: str | None
    ) -> MergeResult:
        """A save that writes first (see :class:`WriteHints`), then reads and plans only the keys
        the guarded upsert left: their counts, source advances and seen marks come from the same
        rules as ever, on state this transaction has not changed."""
        now = self._stamp()
        written = save_unread(chunk, now, self.spec.strategy, fetched_at, seen_by_run)
        result = MergeResult()
        for _, last_action, _ in written:
            if last_action == "added":
                result.added += 1
            else:
                result.updated += 1
        self._record_feed_entry(now, [(key, not is_new) for key, _, is_new in written])
        if len(written) < len(chunk):
            done = {key for key, _, _ in written}
            left = [item for item in chunk if item.key not in done]
            result += self._read_plan_apply("save", left, fetched_at, seen_by_run)
        return result

    def _check_prepared(self, action: Action, batch: PreparedBatch, fetched_at: datetime | None) -> None:
        # A batch prepared for another action or spec was validated (and collapsed) by other
        # rules; merging it anyway would apply them silently.
        if batch.action != action:
            raise InvalidBatchError(f"a batch prepared for {batch.action!r} cannot be merged as {action!r}")
        if batch.spec != self.spec:
            raise InvalidBatchError(f"a batch prepared for {batch.spec} cannot be merged under {self.spec}")
        if fetched_at is not None:
            raise InvalidBatchError("a prepared batch carries its fetched_at; do not pass another")

    def _stamp(self) -> datetime:
        """A last_modified_at strictly after every other in this (sync, connection).

        Writers are serialised by the batch lock, so stamps increase in commit order and a change
        feed reader paging by (last_modified_at, key) can never miss a later commit.
        Inside :meth:`one_feed_entry` every write gets that block's one stamp.
        """
        if self._held_keys is not None and self._held_stamp is not None:
            return self._held_stamp
        if self._last_stamp is None:
            newest = self.conn.execute(
                select(feed_entries.c.modified_at, feed_entries.c.ids_listed, feed_entries.c.ids_superseded)
                .where(feed_entries.c.sync == self.sync, feed_entries.c.connection_id == self.connection_id)
                .order_by(feed_entries.c.modified_at.desc())
                .limit(1)
            ).first()
            if newest is not None:
                self._last_stamp, self._ids_listed, self._ids_superseded = newest
        now = utcnow()
        if self._last_stamp is not None and now <= self._last_stamp:
            now = self._last_stamp + _ONE_MICROSECOND
        self._last_stamp = now
        if self._held_keys is not None:
            self._held_stamp = now
        return now

    def _apply(self, plan: Plan, seen_by_run: str | None) -> None:
        if plan.writes:
            now = self._stamp()
            content = [w for w in plan.writes if w.data_json is not None]
            tombstones = [w for w in plan.writes if w.data_json is None]
            if content:
                self._bulk.upsert(content, now, seen_by_run)
            if tombstones:
                self._bulk.tombstone(tombstones, now)
            self._record_feed_entry(now, [(w.key, not w.is_new) for w in plan.writes])
        if plan.advance:
            self._bulk.advance_source(plan.advance)
        if seen_by_run and plan.untouched:
            self._bulk.mark_seen(plan.untouched, seen_by_run)

    def _record_feed_entry(self, stamp: datetime, written: Sequence[tuple[str, bool]]) -> None:
        """Enter one write in the change feed: (key, whether the record existed before, so was
        listed under an older stamp) for each record stamped ``stamp``, each once."""
        if not written:
            return
        if self._held_keys is not None:
            # Only a key's first write in the block says whether it was listed before the block: a
            # later one finds the record the block itself wrote (and a write-first upsert of a row
            # this transaction inserted even reports it as new).
            for key, existed in written:
                if key not in self._held_keys:
                    self._held_keys[key] = None
                    self._held_superseded += existed
            return
        self._insert_feed_entry(stamp, [key for key, _ in written], sum(existed for _, existed in written))

    def _insert_feed_entry(self, stamp: datetime, keys: list[str], superseded: int) -> None:
        """One change-feed row: ``keys`` stamped ``stamp``, ``superseded`` of them listed before
        under an older stamp; compact the feed when it is due."""
        self._ids_listed += len(keys)
        self._ids_superseded += superseded
        self.conn.execute(
            insert(feed_entries).values(
                sync=self.sync,
                connection_id=self.connection_id,
                modified_at=stamp,
                external_ids=json.dumps(keys),
                ids_listed=self._ids_listed,
                ids_superseded=self._ids_superseded,
            )
        )
        if feed.should_compact(self._ids_listed, self._ids_superseded):
            self._ids_listed, self._ids_superseded = feed.compact(self.conn, self.sync, self.connection_id), 0


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidBatchError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidBatchError(f"{name} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(timezone.utc)


def _check_scope(sync: str, connection_id: str) -> None:
    # The columns are VARCHAR(128)/VARCHAR(255): Postgres would refuse longer values halfway
    # through a batch, SQLite would silently keep them. Refuse them up front on both.
    for name, value, limit in (("sync", sync, 128), ("connection_id", connection_id, 255)):
        if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
            raise InvalidBatchError(f"{name} must be a string of 1 to {limit} characters without NUL, got {value!r}")
