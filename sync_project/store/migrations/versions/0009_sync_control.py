"""Per-connection sync control: poll and full-refresh intervals, credentials a running deployment
resolves, and full-refresh windows that survive a killed run.

- ``connections.poll_interval_s`` / ``full_refresh_interval_s``: a connection's own cadence, NULL
  for the sync's (``full_refresh_interval_s = 0``: never by cadence).
- ``connections.credentials_file`` / ``credentials_secret`` / ``credentials_sealed``: the other
  kinds of credentials reference beside ``credentials_env``: a file read at run time, a key in the
  deployment's secrets directory, or the secret itself sealed with the deployment's Fernet key.
- ``sync_state.full_window_*``: the open full refresh of a (sync, connection), from its first page
  to its last however many runs it takes: its id (what records it saw are marked with), start,
  where to resume, and its progress; ``last_full_refresh_at`` when the last one completed.

Only columns are added (nullable, or with a default), so no table is rewritten.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def _connection_columns() -> list[sa.Column]:
    return [
        sa.Column("poll_interval_s", sa.Integer(), nullable=True),
        sa.Column("full_refresh_interval_s", sa.Integer(), nullable=True),
        sa.Column("credentials_file", sa.String(1024), nullable=True),
        sa.Column("credentials_secret", sa.String(255), nullable=True),
        sa.Column("credentials_sealed", sa.Text(), nullable=True),
    ]


def _state_columns() -> list[sa.Column]:
    return [
        sa.Column("full_window_id", sa.String(64), nullable=True),
        sa.Column("full_window_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("full_window_checkpoint", sa.Text(), nullable=True),
        sa.Column("full_window_pages", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("full_window_records", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("full_window_runs", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_full_refresh_at", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    for column in _connection_columns():
        op.add_column("connections", column)
    for column in _state_columns():
        op.add_column("sync_state", column)


def downgrade() -> None:
    with op.batch_alter_table("sync_state") as batch:
        for column in _state_columns():
            batch.drop_column(column.name)
    with op.batch_alter_table("connections") as batch:
        for column in _connection_columns():
            batch.drop_column(column.name)
