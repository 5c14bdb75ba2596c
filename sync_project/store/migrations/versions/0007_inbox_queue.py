"""The inbox's work queue and acknowledgements move to two narrow tables.

Marking an event done was an UPDATE of its inbox row: a new copy of a ~1 kB row and an entry in
each of its three indexes (the claim index held the status), for every event a webhook run
applied. Now an inbox row is written once by the receiver and never changed on the hot path:

- ``inbox_pending`` (id, sync, connection_id) holds one row per pending event; claims and the
  sensor read its small index, however many events were ever done;
- ``inbox_done`` (id, processed_at) gets one row per applied event, inserted by the transaction
  that deletes its ``inbox_pending`` row and commits the merge.

An inbox row reads as ``done`` when its id is in ``inbox_done``, ``pending`` when it is in
``inbox_pending``, else as its stored status (dead, unroutable, ignored, routed). Rows done before
this revision keep their stored 'done' and get an ``inbox_done`` row here, so no inbox row is
rewritten by the upgrade. The status index becomes a partial one over the few parked rows.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_PARKED = "status NOT IN ('pending', 'done')"


def upgrade() -> None:
    op.create_table(
        "inbox_pending",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=False),
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
    )
    op.create_index("ix_inbox_pending_claim", "inbox_pending", ["sync", "connection_id", "id"])
    op.create_table(
        "inbox_done",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        "INSERT INTO inbox_pending (id, sync, connection_id) "
        "SELECT id, sync, connection_id FROM inbox WHERE status = 'pending'"
    )
    op.execute(
        "INSERT INTO inbox_done (id, processed_at) "
        "SELECT id, COALESCE(processed_at, received_at) FROM inbox WHERE status = 'done'"
    )
    op.drop_index("ix_inbox_claim", table_name="inbox")
    op.create_index(
        "ix_inbox_parked",
        "inbox",
        ["status", "sync", "connection_id", "id"],
        postgresql_where=sa.text(_PARKED),
        sqlite_where=sa.text(_PARKED),
    )


def downgrade() -> None:
    op.drop_index("ix_inbox_parked", table_name="inbox")
    op.execute(
        "UPDATE inbox SET status = 'done', next_attempt_at = NULL, "
        "processed_at = (SELECT d.processed_at FROM inbox_done d WHERE d.id = inbox.id) "
        "WHERE id IN (SELECT id FROM inbox_done)"
    )
    op.create_index("ix_inbox_claim", "inbox", ["status", "sync", "connection_id", "id"])
    op.drop_table("inbox_done")
    op.drop_index("ix_inbox_pending_claim", table_name="inbox_pending")
    op.drop_table("inbox_pending")
