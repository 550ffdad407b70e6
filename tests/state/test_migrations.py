"""The Alembic migrations build exactly the tables the code declares (the state's and those
destinations keep in the state database), on SQLite and PostgreSQL, and ship with the installed
package."""

from __future__ import annotations

import importlib.resources

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audience_sync.destinations import table_metadata
from audience_sync.state import connect, schema_is_current, upgrade
from audience_sync.state.database import SCHEMA_HEAD, _alembic_config
from audience_sync.state.schema import metadata


def downgrade(engine: sa.Engine, revision: str) -> None:
    """Migrate ``engine``'s schema down to ``revision`` (Alembic, on one connection)."""
    from alembic import command

    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_migrations_match_the_declared_schema(state_url: str):
    engine = connect(state_url)
    assert not sa.inspect(engine).has_table("sync_runs")
    upgrade(engine)
    assert schema_is_current(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), [metadata, *table_metadata()])
    assert diff == []
    upgrade(engine)  # a second upgrade is a no-op
    assert schema_is_current(engine)
    engine.dispose()


def test_the_known_schema_head_is_alembics_head():
    """A run checks the schema against ``SCHEMA_HEAD`` without loading the scripts: a new
    migration must move it (this fails until it does)."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(_alembic_config()).get_heads() == [SCHEMA_HEAD]


def test_the_schema_is_current_at_the_head_only_as_alembic_says(state_url: str):
    """At every revision, from none to the head, the check without Alembic answers as Alembic
    does."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config())
    head = scripts.get_current_head()
    revisions = [None, *reversed([s.revision for s in scripts.walk_revisions()])]
    engine = connect(state_url)
    for revision in revisions:
        if revision is not None:
            upgrade(engine, revision)
        with engine.connect() as conn:
            alembic_says = MigrationContext.configure(conn).get_current_revision() == head
        assert schema_is_current(engine) == alembic_says == (revision == head), revision
    engine.dispose()


def test_migration_scripts_ship_inside_the_package():
    scripts = importlib.resources.files("audience_sync.migrations")
    assert scripts.joinpath("env.py").is_file()
    assert any(p.name.startswith("0001") for p in scripts.joinpath("versions").iterdir())


def at_revision_with_foreign_key(state_url: str, revision: str, table: str, referred: str):
    """An engine on a database migrated to ``revision``, where ``table`` still has its foreign
    key to ``referred``, holding audience 1."""
    engine = connect(state_url)
    upgrade(engine, revision)
    assert any(
        fk["referred_table"] == referred for fk in sa.inspect(engine).get_foreign_keys(table)
    )
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sync_audiences (id, destination, audience_key, audience_name, "
                "created_at) VALUES (1, 'jsonl', 'vip', 'VIP', CURRENT_TIMESTAMP)"
            )
        )
    return engine


def test_upgrading_from_0002_keeps_the_change_log_and_drops_its_foreign_key(state_url: str):
    engine = at_revision_with_foreign_key(state_url, "0002", "sync_changes", "sync_runs")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sync_runs (id, audience_id, destination, audience_key, audience_name,"
                " mode, trigger, status, started_at) VALUES (7, 1, 'jsonl', 'vip', 'VIP', "
                "'initial', 'manual', 'succeeded', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO sync_changes (run_id, user_id, trait_key, value, outcome, at) "
                "VALUES (7, 'u1', 'vip', TRUE, 'delivered', CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine)
    assert schema_is_current(engine)
    inspector = sa.inspect(engine)
    assert not any(
        fk["referred_table"] == "sync_runs" for fk in inspector.get_foreign_keys("sync_changes")
    )
    assert {i["name"] for i in inspector.get_indexes("sync_changes")} == {
        "ix_sync_changes_run_user"
    }
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT run_id, user_id, value FROM sync_changes")).all()
    assert [tuple(r) for r in rows] == [(7, "u1", True)]
    engine.dispose()


def test_postgresql_autovacuums_the_members_after_one_percent_churn(state_url: str):
    engine = connect(state_url)
    upgrade(engine)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        pytest.skip("an autovacuum setting exists only in PostgreSQL")
    with engine.connect() as conn:
        options = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE oid = 'sync_members'::regclass")
        ).scalar_one()
    engine.dispose()
    assert sorted(options) == [
        "autovacuum_vacuum_insert_scale_factor=0.01",
        "autovacuum_vacuum_scale_factor=0.01",
    ]


def test_upgrading_from_0004_keeps_the_members_and_drops_their_foreign_key(state_url: str):
    engine = at_revision_with_foreign_key(state_url, "0004", "sync_members", "sync_audiences")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO sync_members (audience_id, user_id) VALUES (1, 'u1'), (1, 'u2')")
        )
    upgrade(engine)
    assert schema_is_current(engine)
    inspector = sa.inspect(engine)
    assert inspector.get_foreign_keys("sync_members") == []
    assert inspector.get_pk_constraint("sync_members")["constrained_columns"] == [
        "audience_id",
        "user_id",
    ]
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT audience_id, user_id FROM sync_members")).all()
        assert sorted(tuple(r) for r in rows) == [(1, "u1"), (1, "u2")]
        with pytest.raises(sa.exc.IntegrityError):  # still one row per member
            conn.execute(
                sa.text("INSERT INTO sync_members (audience_id, user_id) VALUES (1, 'u1')")
            )
    engine.dispose()


def test_upgrading_to_0009_keeps_audiences_as_they_were_and_takes_trait_values(state_url: str):
    """Issue 11: existing audiences stay audiences with their members, retry rows and log; the
    new columns take a computed trait's values; and the downgrade drops them again."""
    engine = connect(state_url)
    upgrade(engine, "0008")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sync_audiences (id, destination, audience_key, audience_name, "
                "created_at) VALUES (1, 'jsonl', 'vip', 'VIP', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(sa.text("INSERT INTO sync_members (audience_id, user_id) VALUES (1, 'u1')"))
        conn.execute(
            sa.text(
                "INSERT INTO sync_pending (audience_id, user_id, value, status, retryable, "
                "input_hash, message_id, attempts, first_run_id, last_run_id, first_at, last_at) "
                "VALUES (1, 'u2', TRUE, 'failed', TRUE, 'h', 'm', 1, 1, 1, CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine)
    assert schema_is_current(engine)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT kind FROM sync_audiences")).scalar_one() == "audience"
        assert conn.execute(sa.text("SELECT user_id, value FROM sync_members")).one() == (
            "u1",
            None,
        )
        assert conn.execute(sa.text("SELECT data FROM sync_pending")).scalar_one() is None
        conn.execute(
            sa.text(
                "INSERT INTO sync_audiences (id, destination, audience_key, audience_name, "
                "created_at, kind) VALUES (2, 'jsonl', 'ltv', 'LTV', CURRENT_TIMESTAMP, 'trait')"
            )
        )
        conn.execute(
            sa.text("INSERT INTO sync_members (audience_id, user_id, value) VALUES (2, 'u1', '7')")
        )
    downgrade(engine, "0008")
    columns = {c["name"] for c in sa.inspect(engine).get_columns("sync_members")}
    assert columns == {"audience_id", "user_id"}
    engine.dispose()


def _has_rowid(engine: sa.Engine, table: str) -> bool:
    with engine.connect() as conn:
        try:
            conn.execute(sa.text(f"SELECT rowid FROM {table}"))
        except sa.exc.OperationalError:  # "no such column": a WITHOUT ROWID table
            return False
    return True


def test_upgrading_to_0012_keeps_the_members_in_one_tree_on_sqlite(state_url: str):
    """On SQLite the members table is rebuilt WITHOUT ROWID with every row, value and the key
    kept; PostgreSQL's is untouched. The downgrade rebuilds it with its rowid."""
    engine = connect(state_url)
    upgrade(engine, "0011")
    rows = [(1, "u1", None), (1, "u2", None), (2, "u1", '"gold"'), (2, "ü \u2028", "7.5")]
    with engine.begin() as conn:
        for audience_id, name in ((1, "vip"), (2, "plan")):
            conn.execute(
                sa.text(
                    "INSERT INTO sync_audiences (id, destination, audience_key, audience_name, "
                    "created_at) VALUES (:id, 'jsonl', :key, :key, CURRENT_TIMESTAMP)"
                ),
                {"id": audience_id, "key": name},
            )
        conn.execute(
            sa.text("INSERT INTO sync_members (audience_id, user_id, value) VALUES (:a, :u, :v)"),
            [{"a": a, "u": u, "v": v} for a, u, v in rows],
        )
    sqlite = engine.dialect.name == "sqlite"
    assert _has_rowid(engine, "sync_members") if sqlite else True
    upgrade(engine)
    assert schema_is_current(engine)
    if sqlite:
        assert not _has_rowid(engine, "sync_members")

    def members() -> list[tuple[int, str, str | None]]:
        with engine.connect() as conn:
            found = conn.execute(sa.text("SELECT audience_id, user_id, value FROM sync_members"))
            return sorted(tuple(r) for r in found)  # type: ignore[misc]

    assert members() == sorted(rows)
    with engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):  # still one per member
        conn.execute(sa.text("INSERT INTO sync_members (audience_id, user_id) VALUES (1, 'u1')"))
    downgrade(engine, "0011")
    assert members() == sorted(rows)
    if sqlite:
        assert _has_rowid(engine, "sync_members")
    engine.dispose()


def test_0013_keeps_the_change_log_on_one_index_by_run_and_user_and_downgrades(state_url: str):
    def indexes() -> set[str]:
        return {i["name"] for i in sa.inspect(engine).get_indexes("sync_changes")}

    def log() -> list[tuple[int, str]]:
        with engine.connect() as conn:
            found = conn.execute(sa.text("SELECT run_id, user_id FROM sync_changes"))
            return sorted(tuple(r) for r in found)  # type: ignore[misc]

    engine = connect(state_url)
    upgrade(engine, "0012")
    rows = [(1, "u2"), (1, "u1"), (2, "u1"), (3, "ü 3")]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sync_changes (run_id, user_id, trait_key, value, outcome, at) "
                "VALUES (:r, :u, 'vip', TRUE, 'delivered', CURRENT_TIMESTAMP)"
            ),
            [{"r": r, "u": u} for r, u in rows],
        )
    assert indexes() == {"ix_sync_changes_user", "ix_sync_changes_run"}
    upgrade(engine)
    assert indexes() == {"ix_sync_changes_run_user"}
    assert log() == sorted(rows)
    downgrade(engine, "0012")
    assert indexes() == {"ix_sync_changes_user", "ix_sync_changes_run"}
    assert log() == sorted(rows)
    engine.dispose()
