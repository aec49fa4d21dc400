"""Channels: which channel took a message, why it was filtered, its deliveries and their attempts.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_WAITING = sa.text("state IN ('queued', 'error')")


def upgrade():
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("channel", sa.String(64),
                                   comment="the channel that took it; NULL: stored only"))
        batch.add_column(sa.Column("filter_reason", sa.Text(), comment="the rule that filtered it out"))
    op.create_index("ix_messages_channel_state", "messages", ["channel", "state", "id"])
    op.create_table(
        "deliveries",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("message_id", _Id, sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(), comment="UTC; NULL: at once"),
        sa.Column("target", sa.Text(), comment="where it goes, e.g. the file path"),
        sa.Column("output", sa.LargeBinary(), comment="the rendered payload; NULL if rendering failed"),
        sa.Column("last_error", sa.Text()),
        sa.Column("response", sa.LargeBinary(), comment="the last answer from the far side"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_deliveries_message", "deliveries", ["message_id"])
    op.create_index("ix_deliveries_queue", "deliveries", ["channel", "destination", "id"],
                    sqlite_where=_WAITING, postgresql_where=_WAITING)
    op.create_table(
        "attempts",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", _Id, sa.ForeignKey("deliveries.id"), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("response", sa.LargeBinary()),
    )
    op.create_index("ix_attempts_delivery", "attempts", ["delivery_id"])


def downgrade():
    op.drop_table("attempts")
    op.drop_table("deliveries")
    op.drop_index("ix_messages_channel_state", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("filter_reason")
        batch.drop_column("channel")
