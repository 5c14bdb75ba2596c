"""The connections table's revision: a one-row counter each write of a connection moves.

The receiver keeps a snapshot of the connections for routing and re-reads it when the table
changes. It told so from ``count(*)`` and ``max(updated_at)``, but ``updated_at`` is the writing
host's clock: a connection re-pointed from a host whose clock is behind moved neither, and events
went to the old connection until the snapshot aged out (30 s). The counter moves in the writing
transaction, in commit order.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    table = op.create_table(
        "connections_revision",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "revision": 0}])


def downgrade() -> None:
    op.drop_table("connections_revision")
