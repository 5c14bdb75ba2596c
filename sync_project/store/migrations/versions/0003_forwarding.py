"""Webhook forwarding: the ``forwards`` queue and the forwarder's inbox cursor; stable inbox ids on SQLite.

``forwards`` holds one row per (provider, event, connection) to forward to the customer's app, with
its own delivery state (pending, delivered, dead), so a slow or dead customer endpoint only ever
delays rows of this table. ``forwarder_state`` remembers how far the forwarder has read the inbox.

On SQLite the inbox becomes ``AUTOINCREMENT``: without it SQLite hands out ``max(id) + 1``, so
after ``inbox purge`` removed the newest rows their ids came back, below the forwarder's cursor
(and the inbox sensor's high-water mark), and those deliveries were never seen. Postgres
sequences never reuse a value.

Revision ID: 0003f (named so that another 0003 revision can be ordered around it)
"""

import sqlalchemy as sa
from alembic import op

from sync_project.store.schema import AutoId, UtcDateTime

revision = "0003f"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "forwards",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("inbox_id", sa.BigInteger, nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("event_key", sa.String(255), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=True),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UtcDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("delivered_at", UtcDateTime, nullable=True),
        sa.UniqueConstraint("provider", "event_key", "connection_id", name="uq_forwards_event"),
    )
    op.create_index("ix_forwards_due", "forwards", ["status", "next_attempt_at", "id"])
    op.create_table(
        "forwarder_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("inbox_cursor", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("inbox", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("inbox", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
    op.drop_table("forwarder_state")
    op.drop_index("ix_forwards_due", table_name="forwards")
    op.drop_table("forwards")
