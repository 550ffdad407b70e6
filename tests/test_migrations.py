"""The Alembic migrations build exactly the tables the code declares, on SQLite and PostgreSQL,
and ship with the installed package."""

from __future__ import annotations

import importlib.resources

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audience_sync.state import connect, schema_is_current, upgrade
from audience_sync.state.schema import metadata


def test_migrations_match_the_declared_schema(state_url: str):
    engine = connect(state_url)
    assert not sa.inspect(engine).has_table("sync_runs")
    upgrade(engine)
    assert schema_is_current(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    upgrade(engine)  # a second upgrade is a no-op
    assert schema_is_current(engine)
    engine.dispose()


def test_migration_scripts_ship_inside_the_package():
    scripts = importlib.resources.files("audience_sync.migrations")
    assert scripts.joinpath("env.py").is_file()
    assert any(p.name.startswith("0001") for p in scripts.joinpath("versions").iterdir())
