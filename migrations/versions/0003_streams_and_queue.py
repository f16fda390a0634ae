"""Live streams and the queue: metric ids that never repeat (SQLite AUTOINCREMENT) with an
index on (job_id, id) for the stream poll; jobs.pending_reason; sweeps.cancel_requested.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # A restart's delete of the newest points let SQLite hand their ids out again, and
        # a live stream past them missed the new points. Rebuilding the table is the only
        # way to add AUTOINCREMENT.
        with op.batch_alter_table(
            "metrics", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass
    op.create_index("ix_metrics_job_id_id", "metrics", ["job_id", "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pending_reason", sa.Text()))
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Cancellation used to be a flag inside the sweep's spec.
    sweeps = sa.table("sweeps", sa.column("id"), sa.column("spec", sa.JSON))
    conn = op.get_bind()
    for sweep_id, spec in conn.execute(sa.select(sweeps.c.id, sweeps.c.spec)).all():
        if (spec or {}).get("cancel_requested"):
            conn.execute(
                sa.text("UPDATE sweeps SET cancel_requested = :t WHERE id = :id"),
                {"t": True, "id": sweep_id},
            )


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("cancel_requested")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pending_reason")
    op.drop_index("ix_metrics_job_id_id", "metrics")
