"""Elastic jobs: the workers a running job trains on, the size asked of it, and whether a
resize by hand pinned it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("workers", sa.Integer()))
        batch.add_column(sa.Column("target_workers", sa.Integer()))
        batch.add_column(
            sa.Column("workers_pinned", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("workers_pinned")
        batch.drop_column("target_workers")
        batch.drop_column("workers")
