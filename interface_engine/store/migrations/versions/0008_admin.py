"""Admin console: users (browser login) and API tokens, stored only as hashes; paused channels
and destinations; messages edited by hand from the ones they correct.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "admin_users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False, comment="viewer, analyst, operator or admin"),
        sa.Column("password_hash", sa.String(255), nullable=False, comment="scrypt, salted"),
        sa.Column("created_at", sa.DateTime(), nullable=False, comment="UTC"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(16), primary_key=True, comment="the public part of the token"),
        sa.Column("name", sa.String(64), nullable=False, comment="what it is for, e.g. prometheus"),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, comment="SHA-256 of the secret part"),
        sa.Column("created_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("revoked_at", sa.DateTime(), comment="UTC; NULL: in use"),
    )


    op.create_table(
        "pauses",
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("destination", sa.String(64), primary_key=True,
                  comment="'': the channel's processing; else that destination's deliveries"),
        sa.Column("paused_at", sa.DateTime(), nullable=False, comment="UTC"),
        sa.Column("actor", sa.String(128), nullable=False),
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("edited_from", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                   comment="the message this one corrects, edited by hand and resent"))


def downgrade():
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("edited_from")
    op.drop_table("pauses")
    op.drop_table("api_tokens")
    op.drop_table("admin_users")
