"""The change feed moves to its own table, so a merge updates records in place (HOT updates).

Until now the feed was served by an index on records (sync, connection_id, last_modified_at,
external_id). Every merge changes last_modified_at, so every update of a record added an entry to
that index *and* to the primary key: measured with ``perf`` on the issue-8 change load, half of
Postgres's time in those updates was index insertion. With no index holding a column that merges
change, Postgres writes the new version into the same page without touching any index (a heap-only
tuple), given free space on the page: hence ``fillfactor = 80`` on records.

The feed is now ordered by ``feed_entries``: one row per write (a writer's stamp and the ids it
changed, as a JSON array), which costs a page of 5,000 changes one small insert instead of 5,000
index entries. Readers look each id's record up and skip the ids whose record has since moved on
to a later stamp.

The primary key goes back to (sync, connection_id, external_id) and is the table's only index. 0004
led it with the id because each update then extended it; with HOT updates it is only searched, and
the order measured the same (change load 2.12/2.24 s led by the scope, 2.12/2.29 s led by the id,
against 2.67/2.72 s before this revision), while led by the scope it also serves scans of one sync or
connection (DataFrames, delete detection), which would otherwise need an index of their own.

Each entry also carries two running totals per (sync, connection): ids listed, and ids superseded
by later writes. Writers compact a connection's entries (one per stamp still held by a record) once
superseded ids reach half of those listed, so the table stays within twice the records it indexes.

The upgrade fills feed_entries from the records' current stamps, one row per (sync, connection,
last_modified_at), so every cursor handed out before it still resumes where it was. It rebuilds the
primary key (Postgres holds the table's write lock meanwhile: seconds per million records; SQLite
copies the table).

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "feed_entries",
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("external_ids", sa.Text(), nullable=False),
        sa.Column("ids_listed", sa.BigInteger(), nullable=False),
        sa.Column("ids_superseded", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sync", "connection_id", "modified_at", name="pk_feed_entries"),
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    ids = "json_agg(external_id)::text" if postgres else "json_group_array(external_id)"
    op.execute(
        "INSERT INTO feed_entries (sync, connection_id, modified_at, external_ids, ids_listed, ids_superseded) "
        f"SELECT sync, connection_id, last_modified_at, {ids}, "
        "sum(count(*)) OVER (PARTITION BY sync, connection_id), 0 FROM records "
        "GROUP BY sync, connection_id, last_modified_at"
    )
    op.drop_index("ix_records_feed", table_name="records")
    _primary_key("sync", "connection_id", "external_id")
    if postgres:
        # Applies to pages written from now on; existing pages gain room as VACUUM frees them.
        op.execute("ALTER TABLE records SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE records RESET (fillfactor)")
    _primary_key("external_id", "sync", "connection_id")
    op.create_index("ix_records_feed", "records", ["sync", "connection_id", "last_modified_at", "external_id"])
    op.drop_table("feed_entries")


def _primary_key(*columns: str) -> None:
    with op.batch_alter_table("records") as batch:
        batch.drop_constraint("pk_records", type_="primary")
        batch.create_primary_key("pk_records", list(columns))
