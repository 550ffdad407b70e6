"""The state database itself: opening it (SQLite in WAL mode, or PostgreSQL; read-only for the
history pages), migrating it (Alembic), and reading its rows back uniformly (UTC datetimes,
plain dicts). Every other module of ``state/`` reads and writes its tables through an engine
made here.
"""

from __future__ import annotations

import importlib.resources
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.drivers import url_error
from audience_sync.errors import StateError

if TYPE_CHECKING:  # Alembic loads when used: `status` needs none
    from alembic.config import Config as AlembicConfig

__all__ = [
    "SCHEMA_HEAD",
    "as_dict",
    "as_utc",
    "chunks",
    "connect",
    "describe",
    "schema_is_current",
    "scoped",
    "upgrade",
]

# Keeps each IN (...) list well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 900


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def connect(url: str, *, create: bool = True, read_only: bool = False) -> sa.Engine:
    """An engine for the state database; SQLite gets WAL and write-intent transactions.

    ``BEGIN IMMEDIATE`` makes a SQLite transaction take the write lock up front, so two
    processes serialise cleanly (waiting up to 30 s) instead of failing mid-transaction.
    Without ``create``, a SQLite file that does not exist is not created: an empty in-memory
    database stands in for it (for commands that only read: a dry run, ``history``).
    ``read_only`` engines (the history pages) are refused every write by the database itself.
    """
    if not create:
        from audience_sync.config import sqlite_path  # where the config resolves the path

        database = sqlite_path(url)
        if database is not None and not database.exists():
            return sa.create_engine("sqlite://")
    try:
        engine = sa.create_engine(_read_only_url(url) if read_only else url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise StateError(url_error("[state] url", exc)) from None
    if read_only:
        _refuse_writes(engine)
        return engine
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout = 30000")
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        _check_sqlite_file(engine)
    return engine


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock.

    Switching a new database to WAL can answer "database is locked" at once, without waiting
    on ``busy_timeout`` (SQLite does so to avoid deadlocks), when several processes or threads
    open it together; that is a wait, not an unusable database.
    """
    import sqlite3

    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _check_sqlite_file(engine: sa.Engine) -> None:
    """A ``StateError`` naming the file when an existing file is not a SQLite database.

    Checked once up front: SQLite only finds out at the first statement, deep in a run.
    """
    path = engine.url.database
    if not path or path == ":memory:" or not os.path.exists(path):
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA schema_version")
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise StateError(
            f"the state database {path} cannot be used: {exc.orig} (is it a SQLite database "
            "written by audience-sync? restore it from a backup or point [state] url elsewhere)"
        ) from None


def _read_only_url(url: str) -> sa.URL:
    """SQLite: the file opened as a ``mode=ro`` URI, so not even a journal is written to it."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return parsed
    path = Path(parsed.database).resolve()
    if not path.is_file():
        raise StateError(f"no state database at {path} (nothing has been synced yet?)")
    return parsed.set(
        database=f"file:{urllib.parse.quote(str(path))}",
        query={**parsed.query, "mode": "ro", "uri": "true"},
    )


def _refuse_writes(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA busy_timeout = 30000")
            dbapi_conn.execute("PRAGMA query_only = ON")

    elif engine.dialect.name == "postgresql":

        @sa.event.listens_for(engine, "connect")
        def _postgres_connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_conn.commit()


def describe(engine: sa.Engine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    # The scripts ship as the audience_sync.migrations package (from the top-level migrations/
    # folder), so ask the import system where it is rather than assuming a folder layout.
    try:
        scripts = str(importlib.resources.files("audience_sync.migrations"))
    except ModuleNotFoundError:
        # Imported from a source checkout (Python started in the repository's root puts its
        # audience_sync/ folder ahead of the installed package), where they are not mapped in.
        scripts = str(Path(__file__).resolve().parents[2] / "migrations")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", scripts)
    return cfg


#: The newest migration's revision (migrations/versions/): a database stamped with it is current.
#: Known here so a run's check reads one row instead of loading every migration script through
#: Alembic (~0.5 s of CPU); tests/state/test_migrations.py holds it equal to Alembic's head.
SCHEMA_HEAD = "0013"

#: Alembic's ``context`` is one module-level object: two migrations at once in one process
#: corrupt it (``KeyError: 'config'``), so they take turns.
_MIGRATING = threading.Lock()
#: The PostgreSQL advisory lock key that serialises migrations across processes ("audsync").
_MIGRATION_LOCK_KEY = 0x61756473796E63


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (Alembic); safe to run on a current database.

    Safe to call from several threads and processes at once: one migrates while the others
    wait (a PostgreSQL advisory lock, SQLite's write lock taken by ``BEGIN IMMEDIATE``), then
    find the schema current.
    """
    try:
        if revision == "head" and _at_head(engine):
            return  # current: Alembic would load every migration script to find that out
        _migrate(engine, revision)
    except sa.exc.OperationalError as exc:
        raise StateError(
            f"cannot migrate the state database {describe(engine)}: {exc.orig}"
        ) from None


def _migrate(engine: sa.Engine, revision: str) -> None:
    """Alembic's upgrade to ``revision``, one migration at a time (see ``upgrade``)."""
    import alembic.util
    from alembic import command

    cfg = _alembic_config()
    try:
        with _MIGRATING, engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Held until the transaction ends, so until this migration is committed.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except alembic.util.CommandError as exc:  # e.g. stamped by a newer audience-sync
        raise StateError(
            f"cannot migrate the state database {describe(engine)}: {exc}; was it written by "
            "another version of audience-sync?"
        ) from None


def _at_head(engine: sa.Engine) -> bool:
    """Whether Alembic's version table holds exactly one revision, ``SCHEMA_HEAD`` (read
    without Alembic, as Alembic reads it: the table ``alembic_version`` on the search path)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return False
        stamped = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        return list(stamped) == [SCHEMA_HEAD]


def schema_is_current(engine: sa.Engine) -> bool:
    """Whether the database is at the newest migration."""
    try:
        if _at_head(engine):
            return True
    except sa.exc.OperationalError as exc:
        raise StateError(f"cannot open the state database {describe(engine)}: {exc.orig}") from None
    # Not current: Alembic's own answer (and its errors, e.g. several revisions stamped).
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise StateError(f"cannot open the state database {describe(engine)}: {exc.orig}") from None
    return current == head


def as_dict(row: sa.RowMapping) -> dict[str, Any]:
    """A row as a dict, its datetimes in UTC (as ``as_utc``)."""
    return {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}


def scoped(
    query: sa.Select[Any], columns: Any, destination: str | None, audience_keys: Iterable[str]
) -> sa.Select[Any]:
    """``query`` narrowed to one destination and some audiences (by key), when given."""
    if destination is not None:
        query = query.where(columns.destination == destination)
    keys = list(audience_keys)
    if keys:
        query = query.where(columns.audience_key.in_(keys))
    return query


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    """``items`` in slices short enough for one ``IN (...)`` list."""
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]
