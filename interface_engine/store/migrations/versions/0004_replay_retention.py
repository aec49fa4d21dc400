"""Replay and retention: the replays record, replayed deliveries' links, content removal.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_REPLAYED = sa.text("replay_of IS NOT NULL")


def upgrade():
    op.create_table(
        "replays",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("actor", sa.String(64), nullable=False, comment="the OS user who ran it"),
        sa.Column("source", sa.String(255), nullable=False, comment="the host it was run on"),
        sa.Column("selection", sa.Text(), nullable=False, comment="which messages, as given"),
        sa.Column("mapping", sa.String(16), nullable=False, comment="current or original"),
        sa.Column("destinations", sa.Text(),
                  comment="names asked for; NULL: every destination of the channel"),
        sa.Column("messages", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("replay_of", _Id, comment="the delivery this one repeats"))
        batch.add_column(sa.Column("replay_id", _Id, comment="the replay that queued it"))
        batch.create_foreign_key("fk_deliveries_replay_of", "deliveries", ["replay_of"], ["id"])
        batch.create_foreign_key("fk_deliveries_replay_id", "replays", ["replay_id"], ["id"])
    # Deleting a delivery checks that no replay points at it: without this, a scan each.
    op.create_index("ix_deliveries_replay_of", "deliveries", ["replay_of"],
                    sqlite_where=_REPLAYED, postgresql_where=_REPLAYED)
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("content_removed_at", sa.DateTime(),
                                   comment="UTC; retention removed raw, outputs, responses"))


def downgrade():
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("content_removed_at")
    op.drop_index("ix_deliveries_replay_of", "deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("fk_deliveries_replay_id", type_="foreignkey")
        batch.drop_constraint("fk_deliveries_replay_of", type_="foreignkey")
        batch.drop_column("replay_id")
        batch.drop_column("replay_of")
    op.drop_table("replays")
