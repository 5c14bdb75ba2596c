"""Partition ownership becomes a fenced lease in the store, not a database session's lock.

Until now a run held a session advisory lock (Postgres) or a file lock (SQLite) for its whole
life. A session can end without its holder noticing (idle_session_timeout, a transaction-mode
pooler, a network cut, pg_terminate_backend): the lock vanished, a second full refresh started, and
the first one's delete detection tombstoned what the second had re-saw. A lease is a row: holder,
a fencing token that grows with every grant, and an expiry the holder renews. Every transaction
that writes the partition checks its token in that transaction, so a holder that lost its lease
writes nothing more, whatever became of its sessions.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("sync", "connection_id", "role", name="pk_leases"),
    )


def downgrade() -> None:
    op.drop_table("leases")
