"""The store's tables, as SQLAlchemy Core metadata for both SQLite and Postgres.

This is the *current* schema. Databases are created and upgraded by the alembic revisions in
``migrations/versions``; a test asserts that the migrated schema equals this metadata.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on both backends.

    SQLite has no time zone type: it keeps naive ISO text, which sorts correctly only if every value
    is UTC. Postgres keeps ``timestamptz`` but answers in the session's zone. Normalising here keeps
    comparisons (guards, cursors) exact everywhere.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware datetimes")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# SQLite only autoincrements an INTEGER PRIMARY KEY; Postgres wants a bigint identity.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

connections = Table(
    "connections",
    metadata,
    Column("provider", String(64), nullable=False),
    Column("connection_id", String(255), nullable=False),
    # The provider-side account (portal, installation, Stripe account) that webhooks name.
    Column("account_id", String(255), nullable=True),
    # The *name* of an environment variable holding the credentials, never the secret itself.
    Column("credentials_env", String(255), nullable=True),
    # Or a file read at run time, or a key in the deployment's secrets directory (revision 0009).
    Column("credentials_file", String(1024), nullable=True),
    Column("credentials_secret", String(255), nullable=True),
    # Or the secret itself, sealed with the deployment's Fernet key (SYNC_CREDENTIALS_KEY).
    Column("credentials_sealed", Text, nullable=True),
    Column("config", Text, nullable=False, default="{}"),
    Column("status", String(16), nullable=False, default="active"),
    # The connection's own cadence (NULL: its sync's); a full-refresh interval of 0: never by cadence.
    Column("poll_interval_s", Integer, nullable=True),
    Column("full_refresh_interval_s", Integer, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("provider", "connection_id", name="pk_connections"),
    Index("ix_connections_account", "provider", "account_id"),
)

# One row: a counter every write of the connections table moves, in the writing transaction. The
# receiver compares it to tell that its routing snapshot is out of date. Timestamps cannot say so:
# the writing host's clock sets them, and a host whose clock is behind writes an older one. Writers
# queue on the row, so the counter moves in commit order (revision 0010).
connections_revision = Table(
    "connections_revision",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
)

records = Table(
    "records",
    metadata,
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    Column("external_id", String(255), nullable=False),
    # Canonical JSON (sorted keys): the hash below is computed over exactly this text.
    Column("data", Text, nullable=False),
    Column("data_hash", String(32), nullable=False),
    Column("source_updated_at", UtcDateTime, nullable=True),
    Column("first_seen_at", UtcDateTime, nullable=False),
    # Moves only when content or deleted state changes; strictly increasing per (sync, connection).
    Column("last_modified_at", UtcDateTime, nullable=False),
    Column("deleted_at", UtcDateTime, nullable=True),
    Column("last_action", String(16), nullable=False),
    # The full-refresh run that last saw this record at the provider (delete detection).
    Column("seen_by_run", String(64), nullable=True),
    # The only index. No index holds a column that a merge changes, so Postgres rewrites a record
    # within its page without touching the index (a "HOT" update); the change feed is ordered by
    # feed_entries instead (revision 0005).
    PrimaryKeyConstraint("sync", "connection_id", "external_id", name="pk_records"),
)

feed_entries = Table(
    "feed_entries",
    metadata,
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    # One write's stamp: every record it changed has this last_modified_at (until changed again).
    Column("modified_at", UtcDateTime, nullable=False),
    # The write's record ids, a JSON array: one row per write, not per record, costs a merge page
    # one small insert. Ids whose record has moved on to a later stamp are skipped by the reader.
    Column("external_ids", Text, nullable=False),
    # Running totals for the (sync, connection) since its entries were last compacted, as of this
    # entry: the ids its entries list, and how many of those a later write has superseded. The
    # writers read them off the newest entry to decide when to compact (feed.compact).
    Column("ids_listed", BigInteger, nullable=False),
    Column("ids_superseded", BigInteger, nullable=False),
    PrimaryKeyConstraint("sync", "connection_id", "modified_at", name="pk_feed_entries"),
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    Column("checkpoint", Text, nullable=True),
    Column("last_success_at", UtcDateTime, nullable=True),
    Column("last_run_id", String(64), nullable=True),
    Column("last_mode", String(16), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
    # The open full refresh (revision 0009): its id (its first run's; the records it saw carry it
    # in seen_by_run), when it started, where the next run of it resumes, and its progress. NULL
    # id: none open. Delete detection covers the whole window, however many runs it took.
    Column("full_window_id", String(64), nullable=True),
    Column("full_window_started_at", UtcDateTime, nullable=True),
    Column("full_window_checkpoint", Text, nullable=True),
    Column("full_window_pages", BigInteger, nullable=False, server_default="0"),
    Column("full_window_records", BigInteger, nullable=False, server_default="0"),
    Column("full_window_runs", Integer, nullable=False, server_default="0"),
    # When the last full refresh completed (its window closed): the cadence counts from here.
    Column("last_full_refresh_at", UtcDateTime, nullable=True),
    PrimaryKeyConstraint("sync", "connection_id", name="pk_sync_state"),
)

inbox = Table(
    "inbox",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("provider", String(64), nullable=False),
    # The provider's own id of the event (delivery id, event id): what duplicates share.
    Column("event_key", String(255), nullable=False),
    # The sync this event is for; '' when no sync subscribes to its type (kept, status 'ignored').
    Column("sync", String(128), nullable=False),
    # The connection it routes to; '' while unroutable (no connection has its account id yet).
    Column("connection_id", String(255), nullable=False),
    Column("account_id", String(255), nullable=True),
    Column("event_type", String(255), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("received_at", UtcDateTime, nullable=False),
    Column("processed_at", UtcDateTime, nullable=True),
    UniqueConstraint("provider", "event_key", "sync", "connection_id", name="uq_inbox_event"),
    # Rows parked outside the work queue (dead, unroutable, ignored, routed): few, looked up by
    # status. Queued and done rows (the bulk; stored 'pending', or 'done' from before 0007) are in
    # no such index, and nothing on the hot path changes an inbox row: acknowledging an event only
    # moves its id from inbox_pending to inbox_done (revision 0007).
    Index(
        "ix_inbox_parked",
        "status",
        "sync",
        "connection_id",
        "id",
        postgresql_where=text("status NOT IN ('pending', 'done')"),
        sqlite_where=text("status NOT IN ('pending', 'done')"),
    ),
    # Ids are never reused (SQLite would hand out max(id) + 1 again after a purge): readers keep
    # cursors on them (the forwarder, the inbox sensor's high-water mark). Revision 0003f.
    sqlite_autoincrement=True,
)

# The work queue: one narrow row per pending event (an inbox row whose stored status is 'pending'),
# deleted by the transaction that applies it. Claims and the sensor read this table's small index
# however many events were ever done.
inbox_pending = Table(
    "inbox_pending",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=False),
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    Index("ix_inbox_pending_claim", "sync", "connection_id", "id"),
)

# Acknowledgements: the id of every applied event and when. Insert-only and narrow; an inbox row
# whose id is here reads as status 'done'. Purged together with its inbox row.
inbox_done = Table(
    "inbox_done",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=False),
    Column("processed_at", UtcDateTime, nullable=False),
)

forwards = Table(
    "forwards",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    # The inbox row this forward was made from (informational: the inbox may purge it first).
    Column("inbox_id", BigInteger, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("event_key", String(255), nullable=False),
    # The connection the event routed to; '' when it routes to none (forwarded without one).
    Column("connection_id", String(255), nullable=False),
    Column("account_id", String(255), nullable=True),
    Column("event_type", String(255), nullable=False),
    # A copy of the event: forwarding outlives an inbox purge of the (long applied) event.
    Column("payload", Text, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("delivered_at", UtcDateTime, nullable=True),
    UniqueConstraint("provider", "event_key", "connection_id", name="uq_forwards_event"),
    Index("ix_forwards_due", "status", "next_attempt_at", "id"),
)

forwarder_state = Table(
    "forwarder_state",
    metadata,
    Column("name", String(64), primary_key=True),
    # Every inbox id up to this one has been turned into forwards (or skipped).
    Column("inbox_cursor", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    # 'poll' (schedules, backfills, UI launches) or 'drain' (webhook runs): one holder each, so a
    # poll and a drain of one partition run side by side, their writes serialised by the batch lock.
    Column("role", String(16), nullable=False),
    # The run that holds it; NULL once released.
    Column("holder", String(64), nullable=True),
    # The fencing token: grows with every grant, never reused. A writer proves, inside its own
    # transaction, that the token it was granted is still this one (leases.check_lease).
    Column("token", BigInteger, nullable=False),
    # Database time (Postgres clock_timestamp()): hosts' clocks may disagree, the server's is one.
    Column("expires_at", UtcDateTime, nullable=True),
    Column("granted_at", UtcDateTime, nullable=True),
    Column("renewed_at", UtcDateTime, nullable=True),
    PrimaryKeyConstraint("sync", "connection_id", "role", name="pk_leases"),
)

sync_resets = Table(
    "sync_resets",
    metadata,
    Column("sync", String(128), nullable=False),
    Column("connection_id", String(255), nullable=False),
    # A stamp of the partition's feed: after every write before the reset, before every one after.
    Column("reset_at", UtcDateTime, nullable=False),
    # What became of the records: 'kept', 'tombstoned' (the feed shows each delete) or 'removed'
    # (the rows are gone; the feed reports the removal to readers whose cursor is older).
    Column("records", String(16), nullable=False),
    Column("tombstoned", BigInteger, nullable=False),
    Column("removed", BigInteger, nullable=False),
    Column("checkpoint_cleared", Boolean, nullable=False),
    # Who asked: "cli:<user>" or the run id of a reset run.
    Column("requested_by", String(64), nullable=False),
    PrimaryKeyConstraint("sync", "connection_id", "reset_at", name="pk_sync_resets"),
)
