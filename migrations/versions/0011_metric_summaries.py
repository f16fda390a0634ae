"""Metric summaries: each series' last step, open buckets and sealed buckets at 32**level steps
(service/summaries.py), built here for the series already stored.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    job_id = sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    op.create_table(
        "metric_series",
        job_id,
        sa.Column("key", sa.String(100)),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("open", sa.LargeBinary()),
        sa.PrimaryKeyConstraint("job_id", "key"),
    )
    op.create_table(
        "metric_buckets",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE")),
        sa.Column("key", sa.String(100)),
        sa.Column("level", sa.Integer()),
        sa.Column("bucket", sa.BigInteger()),
        sa.Column("lo", sa.Float(), nullable=False),
        sa.Column("lo_step", sa.Integer(), nullable=False),
        sa.Column("hi", sa.Float(), nullable=False),
        sa.Column("hi_step", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "key", "level", "bucket"),
        sqlite_with_rowid=False,
    )
    build_existing(op.get_bind())


def build_existing(conn: sa.Connection) -> None:
    """Summaries of every stored series, one series at a time."""
    from service.summaries import Store

    series = conn.execute(
        sa.text("SELECT job_id, key, min(step), max(step) FROM metrics GROUP BY job_id, key")
    ).all()
    for job_id, key, first, last in series:
        store = Store(conn, job_id)
        store.set_lasts([(key, last, None)])  # open buckets: read when next needed
        store.rebuild(key, first, last, last)


def downgrade() -> None:
    op.drop_table("metric_buckets")
    op.drop_table("metric_series")
