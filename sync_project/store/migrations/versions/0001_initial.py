"""Initial schema: connections, records, sync state, inbox.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from sync_project.store.schema import AutoId, UtcDateTime

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=True),
        sa.Column("credentials_env", sa.String(255), nullable=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("provider", "connection_id", name="pk_connections"),
    )
    op.create_index("ix_connections_account", "connections", ["provider", "account_id"])
    op.create_table(
        "records",
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("data_hash", sa.String(32), nullable=False),
        sa.Column("source_updated_at", UtcDateTime, nullable=True),
        sa.Column("first_seen_at", UtcDateTime, nullable=False),
        sa.Column("last_modified_at", UtcDateTime, nullable=False),
        sa.Column("deleted_at", UtcDateTime, nullable=True),
        sa.Column("last_action", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("sync", "connection_id", "external_id", name="pk_records"),
    )
    op.create_index("ix_records_feed", "records", ["sync", "connection_id", "last_modified_at", "external_id"])
    op.create_table(
        "sync_state",
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("checkpoint", sa.Text, nullable=True),
        sa.Column("last_success_at", UtcDateTime, nullable=True),
        sa.Column("last_run_id", sa.String(64), nullable=True),
        sa.Column("last_mode", sa.String(16), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("sync", "connection_id", name="pk_sync_state"),
    )
    op.create_table(
        "inbox",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("event_key", sa.String(255), nullable=False),
        sa.Column("sync", sa.String(128), nullable=False),
        sa.Column("connection_id", sa.String(255), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=True),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UtcDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.Column("processed_at", UtcDateTime, nullable=True),
        sa.UniqueConstraint("provider", "event_key", "sync", "connection_id", name="uq_inbox_event"),
    )
    op.create_index("ix_inbox_claim", "inbox", ["status", "sync", "connection_id", "id"])


def downgrade() -> None:
    for table in ("inbox", "sync_state", "records", "connections"):
        op.drop_table(table)
