"""Users, scoped and expiring tokens, owners of jobs, sweeps and packages, the audit log.

Everything that existed before belongs to the user "admin" (the first admin), and every
token that existed keeps working with all scopes, as an admin token, until it is revoked.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ALL_SCOPES = ["read", "submit", "code", "admin"]
CONFIGURED_ADMIN = "admin (NESTOR_ADMIN_TOKEN)"  # the name the previous release gave it


def upgrade() -> None:
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), index=True),
        sa.Column("token_id", sa.Integer()),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("target", sa.String(100)),
        sa.Column("detail", sa.Text()),
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer()))
        batch.add_column(sa.Column("scopes", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("submission_id", sa.String(100)))
        batch.add_column(
            sa.Column("configured", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_foreign_key("fk_api_tokens_user_id", "users", ["user_id"], ["id"])
        batch.create_index("ix_api_tokens_user_id", ["user_id"])
    for table in ("jobs", "sweeps", "packages"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner_id", sa.Integer()))
            batch.create_foreign_key(f"fk_{table}_owner_id", "users", ["owner_id"], ["id"])
            batch.create_index(f"ix_{table}_owner_id", ["owner_id"])

    conn = op.get_bind()
    conn.execute(users.insert().values(name="admin", created_at=sa.func.now(), disabled=False))
    admin = conn.execute(sa.select(users.c.id).where(users.c.name == "admin")).scalar_one()
    tokens = sa.table(
        "api_tokens",
        sa.column("role", sa.String),
        sa.column("name", sa.String),
        sa.column("user_id", sa.Integer),
        sa.column("scopes", sa.JSON),
        sa.column("configured", sa.Boolean),
    )
    conn.execute(
        tokens.update()
        .where(tokens.c.role.in_(("admin", "user")))
        .values(role="user", user_id=admin, scopes=ALL_SCOPES)
    )
    conn.execute(tokens.update().where(tokens.c.name == CONFIGURED_ADMIN).values(configured=True))
    for table in ("jobs", "sweeps", "packages"):
        owned = sa.table(table, sa.column("owner_id", sa.Integer))
        conn.execute(owned.update().values(owner_id=admin))


def downgrade() -> None:
    for table in ("packages", "sweeps", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_owner_id")
            batch.drop_constraint(f"fk_{table}_owner_id", type_="foreignkey")
            batch.drop_column("owner_id")
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE api_tokens SET role = 'admin' WHERE role = 'user'"))
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_index("ix_api_tokens_user_id")
        batch.drop_constraint("fk_api_tokens_user_id", type_="foreignkey")
        for column in ("configured", "submission_id", "last_used_at", "expires_at", "scopes"):
            batch.drop_column(column)
        batch.drop_column("user_id")
    op.drop_table("audit")
    op.drop_table("users")
