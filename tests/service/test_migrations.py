"""Alembic migrations up and down, on SQLite and PostgreSQL; the models match the schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, delete, insert, inspect, select, update
from sqlalchemy.exc import DBAPIError

from service.db import downgrade, upgrade
from service.models import Audit, Base


def test_upgrade_creates_the_models_tables_and_downgrade_removes_them(db_url):
    upgrade(db_url)
    engine = create_engine(db_url)
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for name, table in Base.metadata.tables.items():
        columns = {c["name"] for c in inspect(engine).get_columns(name)}
        assert columns == {c.name for c in table.columns}, name
    downgrade(db_url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(db_url)  # and up again
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()


def test_the_migrated_schema_matches_the_models_in_types_indexes_and_keys(db_url):
    """Alembic's own comparison (what autogenerate would write): a column type, nullability,
    index, unique constraint or foreign key in the models that no migration made (or the
    reverse) is a difference, not only a missing name."""
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == [], "\n".join(map(str, diff))


def test_the_audit_log_refuses_updates_and_deletes(db_url):
    """Append-only in the database itself (migration 0008's triggers), on both dialects."""
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(Audit).values(action="job.submit", target="job 1"))
    for statement in (update(Audit).values(target="job 2"), delete(Audit)):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    with engine.connect() as conn:
        assert conn.execute(select(Audit.target)).scalars().all() == ["job 1"]
    engine.dispose()
    downgrade(db_url, "0007")  # the triggers go with their migration
    with engine.begin() as conn:
        conn.execute(delete(Audit))
    engine.dispose()
