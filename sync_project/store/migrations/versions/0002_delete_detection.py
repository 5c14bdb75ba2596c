"""Delete detection: remember which full-refresh run last saw each record.

A full refresh marks every record it fetches; once the whole fetch succeeded, live records that it
did not mark (and that nobody modified after it started) are tombstoned.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("seen_by_run", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("records") as batch:
        batch.drop_column("seen_by_run")
