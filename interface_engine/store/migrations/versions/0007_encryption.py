"""Encryption at rest: the id of the data key that sealed each stored content.

NULL means the value was stored in clear by an engine from before this revision;
`interface-engine keys rotate --resume` seals those too.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SEALED = [("messages", "raw_key"), ("deliveries", "output_key"), ("deliveries", "response_key"),
          ("attempts", "response_key")]


def upgrade():
    for table, column in SEALED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(column, sa.String(16),
                                       comment="data key that sealed it; NULL: stored in clear"))


def downgrade():
    for table, column in reversed(SEALED):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
