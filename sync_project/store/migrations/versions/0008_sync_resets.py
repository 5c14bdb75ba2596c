"""Resets of a sync's partition: what was done, when, and what the change feed's readers must know.

``sync-project syncs reset`` (or a run in ``reset`` mode) clears a (sync, connection)'s checkpoint
and may tombstone or remove its records. Tombstones reach consumers through the change feed like any
delete; removed records leave no row to show, so each reset is kept here and the feed reports a
removal to a reader whose cursor is older than it (it must drop what it holds and read on).

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_table(
        "sync_resets",
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("reset_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("records", sa.String(16), nullable=False),
        sa.Column("tombstoned", sa.BigInteger(), nullable=False),
        sa.Column("removed", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint_cleared", sa.Boolean(), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("sync", "connection_id", "reset_at", name="pk_sync_resets"),
    )


def downgrade() -> None:
    op.drop_table("sync_resets")
