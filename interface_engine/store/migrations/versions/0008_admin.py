"""Admin console: its users (browser login) and API tokens, both stored only as hashes.

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


def downgrade():
    op.drop_table("api_tokens")
    op.drop_table("admin_users")
