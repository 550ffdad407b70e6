"""Read and write the synced state and the run history in SQL (SQLite or PostgreSQL).

The store uses an ``Engine`` it is given and a clock it can be given, so tests control both.
Writes for one batch of confirmed outcomes happen in one transaction: the members, the retry
queue, the change log and the run's counters move together or not at all.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.drivers import url_error
from audience_sync.errors import ConfigError, StateError
from audience_sync.model import MAX_REJECTED_ROWS, RejectedRow, RunMode, RunStatus, SyncKind
from audience_sync.state.schema import (
    sync_audiences,
    sync_changes,
    sync_members,
    sync_pending,
    sync_rejected_rows,
    sync_runs,
)

if TYPE_CHECKING:  # Alembic, pandas and the bulk paths load when used: `status` needs none
    import pandas as pd
    import pyarrow as pa
    from alembic.config import Config as AlembicConfig

    from audience_sync.state import bulk

__all__ = [
    "COUNTERS",
    "MAX_STORED_ROWS",
    "Applied",
    "AudienceRef",
    "Clock",
    "StateStore",
    "connect",
    "holder_id",
    "schema_is_current",
    "upgrade",
    "utc_now",
]

#: The per-run counters of ``sync_runs``.
COUNTERS = (
    "snapshot_rows",
    "rejected_rows",
    "entered",
    "exited",
    "unchanged",
    "delivered",
    "failed",
    "skipped",
    "pending",
)

#: Rejected snapshot rows stored per audience and run (``sync_runs.rejected_rows`` counts all).
MAX_STORED_ROWS = MAX_REJECTED_ROWS

# Keeps each IN (...) list well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 900


def holder_id() -> str:
    """Who holds a lock or started a run: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    except sa.exc.OperationalError as exc:
        raise StateError(
            f"cannot migrate the state database {describe(engine)}: {exc.orig}"
        ) from None
    except alembic.util.CommandError as exc:  # e.g. stamped by a newer audience-sync
        raise StateError(
            f"cannot migrate the state database {describe(engine)}: {exc}; was it written by "
            "another version of audience-sync?"
        ) from None


def schema_is_current(engine: sa.Engine) -> bool:
    """Whether the database is at the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise StateError(f"cannot open the state database {describe(engine)}: {exc.orig}") from None
    return current == head


@dataclass(frozen=True, slots=True)
class AudienceRef:
    """An audience as the state knows it: its number per destination."""

    id: int
    destination: str
    key: str
    name: str
    kind: SyncKind = SyncKind.AUDIENCE


@dataclass(slots=True)
class Applied:
    """Everything one batch of confirmed outcomes changes for one audience's run."""

    audience_id: int
    run_id: int
    trait_key: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    values: list[tuple[str, str]] = field(default_factory=list)
    """A computed trait's ``(user_id, value)`` set (inserted or replaced) in the state."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    changes: bulk.ChangeRows = field(init=False)
    """The change log's rows (kept empty when the change log is off)."""
    delivered: int = 0
    failed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        from audience_sync.state import bulk

        self.changes = bulk.ChangeRows(self.run_id, self.trait_key)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


class StateStore:
    """The state tables behind a small API."""

    def __init__(self, engine: sa.Engine, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock

    # -- audiences and members ------------------------------------------------------------

    def audience(
        self, destination: str, key: str, name: str, kind: SyncKind = SyncKind.AUDIENCE
    ) -> AudienceRef:
        """The audience's (or computed trait's) row, created on first use; its name follows the
        config. A ``ConfigError`` when the key was the other kind: its state cannot serve."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(
                    sync_audiences.c.id, sync_audiences.c.audience_name, sync_audiences.c.kind
                ).where(
                    sync_audiences.c.destination == destination,
                    sync_audiences.c.audience_key == key,
                )
            ).first()
            if row is None:
                audience_id = conn.execute(
                    sync_audiences.insert().values(
                        destination=destination,
                        audience_key=key,
                        audience_name=name,
                        created_at=self.clock(),
                        kind=kind.value,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            else:
                audience_id = row.id
                if row.kind != kind.value:
                    raise kind_changed(destination, key, name, SyncKind(row.kind))
                if row.audience_name != name:
                    conn.execute(
                        sync_audiences.update()
                        .where(sync_audiences.c.id == audience_id)
                        .values(audience_name=name)
                    )
        return AudienceRef(int(audience_id), destination, key, name, kind)

    def find_audience(
        self, destination: str, key: str, *, by_name: bool = False
    ) -> AudienceRef | None:
        """The audience with trait key ``key`` (or, ``by_name``, that display name too)."""
        matches = sync_audiences.c.audience_key == key
        if by_name:
            matches = matches | (sync_audiences.c.audience_name == key)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_audiences)
                .where(sync_audiences.c.destination == destination, matches)
                .order_by((sync_audiences.c.audience_key != key), sync_audiences.c.id)
            ).first()
        if row is None:
            return None
        return _ref(row)

    def members(self, audience_id: int) -> pd.Index:
        """The user ids the destination was last confirmed to hold as members."""
        import pandas as pd

        from audience_sync.state import bulk

        ids = bulk.read_members_arrow(self.engine.url, audience_id)
        if ids is None:
            with self.engine.connect() as conn:
                ids = bulk.read_members(conn, audience_id)
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index

    def values(self, audience_id: int) -> tuple[pd.Index, pa.Array]:
        """A computed trait's users with a confirmed value, and those values (canonical JSON)."""
        import pandas as pd

        from audience_sync.state import bulk

        with self.engine.connect() as conn:
            table = bulk.read_values(conn, audience_id)
        ids = table.column("user_id").combine_chunks()
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index, table.column("value").combine_chunks()

    def with_members(self, destination: str) -> list[AudienceRef]:
        """The destination's audiences that have at least one member in the state."""
        if not sa.inspect(self.engine).has_table("sync_audiences"):
            return []
        member = sa.exists().where(sync_members.c.audience_id == sync_audiences.c.id)
        query = (
            sa.select(sync_audiences)
            .where(sync_audiences.c.destination == destination, member)
            .order_by(sync_audiences.c.id)
        )
        with self.engine.connect() as conn:
            return [_ref(r) for r in conn.execute(query)]

    def has_history(self) -> bool:
        """Whether the database has the run history's table (a run or ``db upgrade`` made it)."""
        return sa.inspect(self.engine).has_table("sync_runs")

    def holds_nothing(self, destination: str) -> bool:
        """Whether the state holds no member and no delivered change for ``destination``."""
        if not sa.inspect(self.engine).has_table("sync_audiences"):
            return True
        audiences = sa.select(sync_audiences.c.id).where(
            sync_audiences.c.destination == destination
        )
        with self.engine.connect() as conn:
            member = conn.execute(
                sa.select(sync_members.c.user_id)
                .where(sync_members.c.audience_id.in_(audiences))
                .limit(1)
            ).first()
            delivered = conn.execute(
                sa.select(sync_runs.c.id)
                .where(sync_runs.c.destination == destination, sync_runs.c.delivered > 0)
                .limit(1)
            ).first()
        return member is None and delivered is None

    def member_count(self, audience_id: int) -> int:
        """How many members the state holds for the audience (counted by the database)."""
        query = sa.select(sa.func.count()).where(sync_members.c.audience_id == audience_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def retry_queue(self, audience_id: int) -> pd.DataFrame:
        """Users whose last change was not delivered, indexed by user id."""
        import pandas as pd

        with self.engine.connect() as conn:
            frame = pd.DataFrame(
                conn.execute(
                    sa.select(sync_pending).where(sync_pending.c.audience_id == audience_id)
                )
                .mappings()
                .all(),
                columns=[c.name for c in sync_pending.columns],
            )
        return frame.set_index("user_id")

    def has_succeeded(self, audience_id: int) -> bool:
        """Whether a run of the audience has ``succeeded`` since it was last retired (so it is
        past its initial sync)."""
        retired = (
            sa.select(sa.func.coalesce(sa.func.max(sync_runs.c.id), 0))
            .where(sync_runs.c.audience_id == audience_id, sync_runs.c.mode == RunMode.RETIRE.value)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_runs.c.id)
                .where(
                    sync_runs.c.audience_id == audience_id,
                    sync_runs.c.status == RunStatus.SUCCEEDED.value,
                    sync_runs.c.id > retired,
                )
                .limit(1)
            ).first()
        return row is not None

    def retire_done(self, audience_id: int) -> bool:
        """Whether the audience holds no member and no retry row: nothing left to retire."""
        with self.engine.connect() as conn:
            left = conn.execute(
                sa.select(sync_members.c.user_id)
                .where(sync_members.c.audience_id == audience_id)
                .union_all(
                    sa.select(sync_pending.c.user_id).where(
                        sync_pending.c.audience_id == audience_id
                    )
                )
                .limit(1)
            ).first()
        return left is None

    def drop_audience_state(self, audience_id: int) -> None:
        """Forget a retired audience's members and retry queue (its history stays)."""
        with self.engine.begin() as conn:
            conn.execute(sync_members.delete().where(sync_members.c.audience_id == audience_id))
            conn.execute(sync_pending.delete().where(sync_pending.c.audience_id == audience_id))

    # -- runs ----------------------------------------------------------------------------

    def start_run(self, audience: AudienceRef, *, mode: str, trigger: str) -> int:
        """Write the run's row as ``running`` (so a crash leaves a visible trace), and forget
        the audience's snapshot fingerprint in the same transaction."""
        from audience_sync.state import fingerprints

        with self.engine.begin() as conn:
            fingerprints.clear(conn, audience.id)
            run_id = conn.execute(
                sync_runs.insert().values(
                    audience_id=audience.id,
                    destination=audience.destination,
                    audience_key=audience.key,
                    audience_name=audience.name,
                    mode=mode,
                    trigger=trigger,
                    status=RunStatus.RUNNING.value,
                    started_at=self.clock(),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        return int(run_id)

    def update_run(self, run_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sync_runs.update().where(sync_runs.c.id == run_id).values(**values))

    def finish_run(
        self, run_id: int, status: RunStatus, error: str | None = None, **counts: int
    ) -> None:
        self.update_run(
            run_id, status=status.value, finished_at=self.clock(), error=error, **counts
        )

    def run(self, run_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id))
                .mappings()
                .first()
            )
        return _row(row) if row is not None else None

    def runs(
        self,
        *,
        destination: str | None = None,
        audience_keys: Iterable[str] = (),
        limit: int = 20,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The newest runs first; only those started at ``since`` or later, when given."""
        query = sa.select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
        query = _scoped(query, sync_runs.c, destination, audience_keys)
        if since is not None:
            query = query.where(sync_runs.c.started_at >= since)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def mark_interrupted(self, audience_id: int, *, reason: str) -> int:
        """Mark the audience's runs still ``running`` (by a process now gone) as interrupted."""
        query = (
            sync_runs.update()
            .where(
                sync_runs.c.audience_id == audience_id,
                sync_runs.c.status == RunStatus.RUNNING.value,
            )
            .values(status=RunStatus.INTERRUPTED.value, finished_at=self.clock(), error=reason)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount

    def add_rejected(self, run_id: int, audience_key: str, rows: Sequence[RejectedRow]) -> None:
        """Keep a run's rejected snapshot rows (the first ``MAX_STORED_ROWS``)."""
        if not rows:
            return
        at = self.clock()
        width = sync_rejected_rows.c.user_id.type.length or 255  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            conn.execute(
                sync_rejected_rows.insert(),
                [
                    {
                        "run_id": run_id,
                        "audience_key": audience_key,
                        "row_number": r.row,
                        "user_id": None if r.user_id is None else r.user_id[:width],
                        "reason": r.reason,
                        "at": at,
                    }
                    for r in rows[:MAX_STORED_ROWS]
                ],
            )

    def rejected_rows(
        self,
        *,
        run_id: int | None = None,
        audience_keys: Iterable[str] = (),
        destination: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored rejected snapshot rows, newest run first, in row order within a run.

        Each row: ``run_id``, ``audience_key``, ``row_number``, ``user_id``, ``reason``, ``at``
        and the run's ``destination``, ``audience_name`` and ``rejected_rows`` (all it counted).
        None are listed from a database older than the table (migration 0006).
        """
        if not sa.inspect(self.engine).has_table("sync_rejected_rows"):
            return []
        r = sync_rejected_rows.c
        query = (
            sa.select(
                sync_rejected_rows,
                sync_runs.c.destination,
                sync_runs.c.audience_name,
                sync_runs.c.rejected_rows,
            )
            .join(sync_runs, sync_runs.c.id == r.run_id)
            .order_by(r.run_id.desc(), r.row_number, r.id)
            .limit(limit)
        )
        if run_id is not None:
            query = query.where(r.run_id == run_id)
        query = _scoped(query, sync_runs.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return [_row(row) for row in conn.execute(query).mappings()]

    # -- applying confirmed outcomes --------------------------------------------------------

    def apply(
        self, batches: Sequence[Applied], on_commit: Callable[[sa.Connection], None] | None = None
    ) -> None:
        """Write the confirmed outcomes of one delivery batch, for all audiences, atomically."""
        from audience_sync.state import bulk

        now = self.clock()
        # One statement per table for all audiences: a commit's cost is its rows, not its
        # number of audiences (the engine commits every few hundred users).
        with self.engine.begin() as conn:
            bulk.add_members(conn, [(b.audience_id, u) for b in batches for u in b.added])
            bulk.set_values(conn, [(b.audience_id, u, v) for b in batches for u, v in b.values])
            bulk.remove_members(conn, [(b.audience_id, u) for b in batches for u in b.removed])
            for b in batches:
                _delete_retries(conn, b.audience_id, b.cleared + [p["user_id"] for p in b.pending])
                if b.pending:
                    conn.execute(
                        sync_pending.insert(),
                        [
                            {
                                "audience_id": b.audience_id,
                                "last_run_id": b.run_id,
                                "last_at": now,
                                **p,
                            }
                            for p in b.pending
                        ],
                    )
            bulk.log_changes(conn, now, [b.changes for b in batches])
            counted = [b for b in batches if b.delivered or b.failed or b.skipped]
            if counted:
                runs = sync_runs.c
                conn.execute(
                    sync_runs.update()
                    .where(runs.id == sa.bindparam("run"))
                    .values(
                        delivered=runs.delivered + sa.bindparam("d"),
                        failed=runs.failed + sa.bindparam("f"),
                        skipped=runs.skipped + sa.bindparam("s"),
                        # In the same statement, so a killed run's row still adds up: pending,
                        # delivered, failed and skipped always sum to what was planned.
                        pending=runs.pending - sa.bindparam("n"),
                    ),
                    [
                        {
                            "run": b.run_id,
                            "d": b.delivered,
                            "f": b.failed,
                            "s": b.skipped,
                            "n": b.delivered + b.failed + b.skipped,
                        }
                        for b in counted
                    ],
                )
            if on_commit is not None:
                on_commit(conn)

    def drop_retries(self, audience_id: int, user_ids: Sequence[str]) -> None:
        """Forget retry rows that no longer match a planned change (the user moved on)."""
        with self.engine.begin() as conn:
            _delete_retries(conn, audience_id, user_ids)

    def retry_counts(self, destination: str, audience_keys: Sequence[str]) -> dict[str, int]:
        """Users waiting in the retry queue, by audience key (audiences with none: absent)."""
        query = (
            sa.select(sync_audiences.c.audience_key, sa.func.count())
            .join(sync_pending, sync_pending.c.audience_id == sync_audiences.c.id)
            .group_by(sync_audiences.c.audience_key)
        )
        query = _scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return {key: int(n) for key, n in conn.execute(query)}

    def retry_rows(
        self, *, destination: str | None = None, audience_keys: Iterable[str] = (), limit: int = 100
    ) -> list[dict[str, Any]]:
        """Users waiting for retry, with the destination's reason, oldest first."""
        query = (
            sa.select(sync_audiences.c.audience_key, sync_audiences.c.destination, sync_pending)
            .join(sync_audiences, sync_audiences.c.id == sync_pending.c.audience_id)
            .order_by(sync_pending.c.first_at, sync_pending.c.user_id)
            .limit(limit)
        )
        query = _scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            rows = [_row(r) for r in conn.execute(query).mappings()]
        for row in rows:  # a computed trait's value to send (JSON; null: a clear)
            if row.get("data") is not None:
                row["value"] = row["data"]
        return rows

    def retry_reasons(
        self, *, destination: str | None = None, audience_keys: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """The retry queue grouped by audience, status, reason and status code, largest first."""
        p = sync_pending.c
        groups = (sync_audiences.c.audience_key, p.status, p.reason, p.status_code)
        query = (
            sa.select(
                *groups,
                sa.func.count().label("users"),
                sa.func.max(p.attempts).label("max_attempts"),
                sa.func.min(p.first_at).label("first_at"),
                sa.func.max(p.last_at).label("last_at"),
            )
            .join(sync_audiences, sync_audiences.c.id == p.audience_id)
            .group_by(*groups)
            .order_by(sa.func.count().desc(), *groups)
        )
        query = _scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def user_changes(
        self, user_id: str, *, destination: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The change log of one user (for one destination, when given), newest first."""
        query = (
            sa.select(
                sync_changes,
                sync_runs.c.destination,
                sync_runs.c.audience_name,
                sync_runs.c.mode,
            )
            .join(sync_runs, sync_runs.c.id == sync_changes.c.run_id)
            .where(sync_changes.c.user_id == user_id)
            .order_by(sync_changes.c.id.desc())
            .limit(limit)
        )
        query = _scoped(query, sync_runs.c, destination, ())
        with self.engine.connect() as conn:
            rows = [_row(r) for r in conn.execute(query).mappings()]
        for row in rows:
            # A computed trait's row: its value before and after, as JSON (audiences: true/false).
            old, new = row.pop("old_value", None), row.pop("new_value", None)
            if old is not None or new is not None:
                row["value"] = (new if new is not None else "cleared") + (
                    f" (was {old})" if old is not None else ""
                )
        return rows


def _scoped(
    query: sa.Select[Any], columns: Any, destination: str | None, audience_keys: Iterable[str]
) -> sa.Select[Any]:
    """``query`` narrowed to one destination and some audiences (by key), when given."""
    if destination is not None:
        query = query.where(columns.destination == destination)
    keys = list(audience_keys)
    if keys:
        query = query.where(columns.audience_key.in_(keys))
    return query


def _delete_retries(conn: sa.Connection, audience_id: int, user_ids: Sequence[str]) -> None:
    for chunk in _chunks(user_ids):
        conn.execute(
            sync_pending.delete().where(
                sync_pending.c.audience_id == audience_id,
                sync_pending.c.user_id.in_(chunk),
            )
        )


def kind_changed(destination: str, key: str, name: str, was: SyncKind) -> ConfigError:
    """The error for a key the state holds as the other kind (audience or computed trait)."""
    what = "a computed trait" if was is SyncKind.TRAIT else "an audience"
    return ConfigError(
        f"trait key {key!r} ({name!r}) was synced to {destination!r} as {what}; the state of "
        f"one kind cannot serve the other. Retire it first (`audience-sync retire {key}`, with "
        "it removed from the config) or give this one another `key`"
    )


def _ref(row: sa.Row[Any]) -> AudienceRef:
    return AudienceRef(
        row.id, row.destination, row.audience_key, row.audience_name, SyncKind(row.kind)
    )


def _row(row: sa.RowMapping) -> dict[str, Any]:
    return {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
