"""Several engines on one store: each message's node, node heartbeats, destination queue leases.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("node", sa.String(64),
                                   comment="the engine that stored it; NULL: stored before engines had names"))
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True, comment="[engine] node"),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("seen_at", sa.DateTime(), nullable=False,
                  comment="UTC, the database's clock: the heartbeat"),
    )
    op.create_table(
        "queue_leases",
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("destination", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), comment="the node that delivers for this queue; NULL: free"),
        sa.Column("token", sa.String(32),
                  comment="the owner's process run: a restarted node waits like the others"),
        sa.Column("expires_at", sa.DateTime(), comment="UTC, the database's clock"),
    )


def downgrade():
    op.drop_table("queue_leases")
    op.drop_table("nodes")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("node")
