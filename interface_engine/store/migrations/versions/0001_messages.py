"""The messages table: raw bytes as received, routing metadata, state and the ACK sent.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "messages",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), comment="why it was rejected; never message content"),
        sa.Column("sending_application", sa.String(227), nullable=False),
        sa.Column("sending_facility", sa.String(227), nullable=False),
        sa.Column("receiving_application", sa.String(227), nullable=False),
        sa.Column("receiving_facility", sa.String(227), nullable=False),
        sa.Column("message_type", sa.String(16), nullable=False),
        sa.Column("trigger_event", sa.String(16), nullable=False),
        sa.Column("control_id", sa.String(199), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False, comment="the bytes exactly as received"),
        sa.Column("ack", sa.LargeBinary(), comment="the answer sent to the sender"),
        sa.Column("duplicates", sa.Integer(), nullable=False, server_default="0",
                  comment="identical copies received later and answered from this row"),
    )
    op.create_index("ix_messages_control_id", "messages",
                    ["control_id", "sending_application", "sending_facility"])
    op.create_index("ix_messages_received_at", "messages", ["received_at"])
    op.create_index("ix_messages_state", "messages", ["state"])


def downgrade():
    op.drop_table("messages")
