"""Search: the patient index (keyed hashes of PID-3) and indexes for each search criterion.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "message_patients",
        sa.Column("message_id", _Id, sa.ForeignKey("messages.id"), primary_key=True),
        sa.Column("patient_hash", sa.String(64), primary_key=True),
    )
    op.create_index("ix_message_patients_hash", "message_patients", ["patient_hash", "message_id"])
    op.create_index("ix_messages_type", "messages", ["message_type", "trigger_event"])
    op.create_index("ix_messages_sender", "messages", ["sending_application", "sending_facility"])
    op.create_index("ix_deliveries_destination", "deliveries",
                    ["destination", "state", "message_id", "channel"])


def downgrade():
    op.drop_index("ix_deliveries_destination", "deliveries")
    op.drop_index("ix_messages_sender", "messages")
    op.drop_index("ix_messages_type", "messages")
    op.drop_table("message_patients")
