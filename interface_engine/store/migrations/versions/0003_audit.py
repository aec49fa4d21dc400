"""Audit trail: the chained audit events, each chain's head, and a message's correlation id.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("correlation_id", sa.String(32),
                                   comment="follows the message through the audit trail"))
    op.create_table(
        "audit_events",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("chain", sa.String(64), nullable=False, comment="the engine node that wrote it"),
        sa.Column("seq", sa.BigInteger(), nullable=False, comment="1, 2, 3... within the chain"),
        sa.Column("at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("actor", sa.String(128), nullable=False, comment="user or service"),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(128), nullable=False),
        sa.Column("source", sa.String(255), nullable=False,
                  comment="from where: peer address, cli@host"),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("correlation_id", sa.String(32)),
        sa.Column("detail", sa.Text(), comment="small JSON; never message content"),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_index("ux_audit_events_chain_seq", "audit_events", ["chain", "seq"], unique=True)
    op.create_table(
        "audit_heads",
        sa.Column("chain", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )


def downgrade():
    op.drop_table("audit_heads")
    op.drop_table("audit_events")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("correlation_id")
