"""The records store: one object per database, shared by runs, the receiver and the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from sync_project import settings
from sync_project.store import feed, migrate, resets
from sync_project.store.connections import Connections
from sync_project.store.engine import make_engine, reading, unavailable_as_store_error
from sync_project.store.forwards import DEFAULT_SETTLE_S, DEFAULT_STATE_NAME, Forwards
from sync_project.store.health import Health
from sync_project.store.inbox import Inbox
from sync_project.store.leases import Lease, Leases
from sync_project.store.merge import MergeResult, RecordSpec
from sync_project.store.records import RecordLike, RecordWriter, WriteHints
from sync_project.store.resets import RecordsAction, ResetResult, Resets
from sync_project.store.schema import records
from sync_project.store.state import NO_WINDOW, SyncStates, upsert_state
from sync_project.store.wakeup import DEFAULT_FALLBACK_S, InboxListener, InboxWakeup

if TYPE_CHECKING:  # imported where frames are built (see feed.py)
    import pandas as pd


class Store:
    """Records, connections, sync state and inbox in one database (SQLite or Postgres).

    Opening a store migrates its schema to the newest version. This object is the store's only
    way in: its attributes (``connections``, ``state``, ``inbox``, ``leases``, ``resets``,
    ``health``) and methods; nothing outside the package builds on ``engine``.
    """

    def __init__(self, url: str | None = None, *, engine: Engine | None = None, migrate_schema: bool = True) -> None:
        self.url = url or settings.database_url()
        self.engine = engine or make_engine(self.url)
        if migrate_schema:
            migrate.upgrade(self.engine)
        self.connections = Connections(self.engine)
        self.state = SyncStates(self.engine)
        self.inbox = Inbox(self.engine)
        self.leases = Leases(self.engine)
        self.resets = Resets(self.engine)
        self.health = Health(self.engine)
        #: Shared by this store's writers: how each save should start (a cost hint, see WriteHints).
        self._write_hints = WriteHints()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def upgrade_schema(self) -> None:
        """Migrate the schema to the newest revision (a store opened with ``migrate_schema=False``
        does it here, when its database can be reached)."""
        migrate.upgrade(self.engine)

    def connect(self) -> Connection:
        """A connection of the store's own, for a caller that keeps one for its whole life (a
        receiver worker thread) and runs the store's ``conn``-taking operations in it."""
        return self.engine.connect()

    def forwards(
        self,
        *,
        name: str = DEFAULT_STATE_NAME,
        settle_s: float = DEFAULT_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> Forwards:
        """The forwarding queue. A new view per call: a forwarder keeps the one it runs on, since
        the view holds the gaps it waits on in memory."""
        return Forwards(self.engine, name=name, settle_s=settle_s, clock=clock)

    def wakeup(self, sync: str, connection_id: str, *, fallback_s: float = DEFAULT_FALLBACK_S) -> InboxWakeup:
        """A wait for new inbox events of (sync, connection); see :class:`InboxWakeup`."""
        return InboxWakeup(self.engine, sync, connection_id, fallback_s=fallback_s)

    def listener(self, syncs: Iterable[str], *, fallback_s: float = DEFAULT_FALLBACK_S) -> InboxListener:
        """A wait for new inbox events of any partition of ``syncs``; see :class:`InboxListener`."""
        return InboxListener(self.engine, syncs, fallback_s=fallback_s)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------

    @contextmanager
    def writer(
        self, sync: str, connection_id: str, spec: RecordSpec, *, lease: Lease | None = None
    ) -> Iterator[RecordWriter]:
        """One transaction holding the batch lock of (sync, connection); commits on exit.

        With ``lease``, the transaction first proves the lease current, or raises
        :class:`~sync_project.store.errors.LeaseLostError` having written nothing.
        """
        with unavailable_as_store_error(), self.engine.begin() as conn:
            yield RecordWriter(conn, sync, connection_id, spec, self._write_hints, lease=lease)

    def writer_beside(
        self, writer: RecordWriter, sync: str, spec: RecordSpec, *, lease: Lease | None = None
    ) -> RecordWriter:
        """A writer of another sync of ``writer``'s connection, in ``writer``'s transaction (it
        takes that sync's batch lock and proves ``lease`` there too): a webhook batch of a sync of
        several models changes them all, and acknowledges its events, in one commit."""
        return RecordWriter(writer.conn, sync, writer.connection_id, spec, self._write_hints, lease=lease)

    def save(
        self,
        sync: str,
        connection_id: str,
        spec: RecordSpec,
        batch: Iterable[RecordLike],
        *,
        fetched_at: datetime | None = None,
    ) -> MergeResult:
        with self.writer(sync, connection_id, spec) as writer:
            return writer.save(batch, fetched_at=fetched_at)

    def update(
        self,
        sync: str,
        connection_id: str,
        spec: RecordSpec,
        batch: Iterable[RecordLike],
        *,
        fetched_at: datetime | None = None,
    ) -> MergeResult:
        with self.writer(sync, connection_id, spec) as writer:
            return writer.update(batch, fetched_at=fetched_at)

    def delete(
        self,
        sync: str,
        connection_id: str,
        spec: RecordSpec,
        batch: Iterable[RecordLike],
        *,
        fetched_at: datetime | None = None,
    ) -> MergeResult:
        with self.writer(sync, connection_id, spec) as writer:
            return writer.delete(batch, fetched_at=fetched_at)

    def reset(
        self,
        sync: str,
        connection_id: str,
        *,
        records: RecordsAction = "keep",
        requested_by: str,
        lease: Lease | None = None,
    ) -> ResetResult:
        """Clear the partition's checkpoint and keep, tombstone or remove its records, in one
        transaction (see :mod:`~sync_project.store.resets`).

        Without ``lease`` it takes the partition's poll lease for ``requested_by`` without
        waiting, so it never runs beside a poll: :class:`~sync_project.store.errors.LeaseHeldError`
        names the run that holds it. A run that holds the lease already passes it.
        """
        action = resets.check_action(records)
        if lease is None:
            with self.leases.hold(sync, connection_id, "poll", requested_by, wait_s=0.0) as keeper:
                return self._reset(sync, connection_id, action, requested_by, keeper.lease)
        return self._reset(sync, connection_id, action, requested_by, lease)

    def _reset(
        self, sync: str, connection_id: str, action: RecordsAction, requested_by: str, lease: Lease
    ) -> ResetResult:
        with self.writer(sync, connection_id, RecordSpec(), lease=lease) as writer:
            cleared = resets.had_checkpoint(writer.conn, sync, connection_id)
            # An open full refresh is abandoned too: the next full run starts at page 1.
            upsert_state(writer.conn, sync, connection_id, checkpoint=None, **NO_WINDOW)
            tombstoned = removed = 0
            if action == "tombstone":
                tombstoned = writer.tombstone_all()
                stamp = writer.next_stamp()
            elif action == "remove":
                removed, stamp = writer.remove_all()
            else:
                stamp = writer.next_stamp()
            result = ResetResult(
                sync=sync,
                connection_id=connection_id,
                reset_at=stamp,
                records=resets.outcome(action),
                tombstoned=tombstoned,
                removed=removed,
                checkpoint_cleared=cleared,
                requested_by=requested_by,
            )
            resets.record_reset(writer.conn, result)
        return result

    # -- reads --------------------------------------------------------------------------------

    def changes(
        self,
        sync: str,
        connection_id: str,
        *,
        cursor: str | None = None,
        limit: int = 100,
        actions: Sequence[feed.ChangeAction] | None = None,
        modified_after: datetime | None = None,
    ) -> feed.ChangePage:
        """One page of the change feed, ordered by (last_modified_at, id)."""
        with unavailable_as_store_error(), reading(self.engine) as conn:
            return feed.read_changes(
                conn, sync, connection_id, cursor=cursor, limit=limit, actions=actions, modified_after=modified_after
            )

    def get(self, sync: str, connection_id: str, external_id: str) -> feed.Change | None:
        with unavailable_as_store_error(), reading(self.engine) as conn:
            row = conn.execute(
                select(*feed._COLUMNS).where(
                    records.c.sync == sync,
                    records.c.connection_id == connection_id,
                    records.c.external_id == external_id,
                )
            ).first()
        return None if row is None else feed._change(row)

    def count(self, sync: str, connection_id: str | None = None, *, include_deleted: bool = False) -> int:
        query = select(func.count()).select_from(records).where(records.c.sync == sync)
        if connection_id is not None:
            query = query.where(records.c.connection_id == connection_id)
        if not include_deleted:
            query = query.where(records.c.deleted_at.is_(None))
        with unavailable_as_store_error(), reading(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    def dataframe(self, sync: str, connection_id: str | None = None, *, include_deleted: bool = False) -> pd.DataFrame:
        """All records of a sync (optionally one connection) as one DataFrame."""
        frames = list(self.iter_dataframes(sync, connection_id, include_deleted=include_deleted))
        if not frames:
            return feed.empty_frame()
        import pandas as pd

        return pd.concat(frames, ignore_index=True)

    def iter_dataframes(
        self, sync: str, connection_id: str | None = None, *, include_deleted: bool = False, chunk_size: int = 50_000
    ) -> Iterator[pd.DataFrame]:
        with unavailable_as_store_error(), reading(self.engine) as conn:
            yield from feed.iter_dataframes(
                conn, sync, connection_id, include_deleted=include_deleted, chunk_size=chunk_size
            )
