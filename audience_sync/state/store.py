"""Read and write the synced state and the run history in SQL (SQLite or PostgreSQL).

The store uses an ``Engine`` it is given and a clock it can be given, so tests control both.
Writes for one batch of confirmed outcomes happen in one transaction: the members, the retry
queue, the change log and the run's counters move together or not at all.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import alembic.util
import pandas as pd
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from audience_sync.errors import StateError
from audience_sync.model import RunStatus
from audience_sync.state import bulk
from audience_sync.state.schema import (
    destination_requests,
    sync_audiences,
    sync_changes,
    sync_pending,
    sync_runs,
)

__all__ = [
    "COUNTERS",
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

Clock = Callable[[], datetime]

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

# Keeps each IN (...) list well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 900


def utc_now() -> datetime:
    return datetime.now(UTC)


def holder_id() -> str:
    """Who holds a lock or started a run: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def connect(url: str, *, read_only: bool = False) -> sa.Engine:
    """An engine for the state database; SQLite gets WAL and write-intent transactions.

    ``BEGIN IMMEDIATE`` makes a SQLite transaction take the write lock up front, so two
    processes serialise cleanly (waiting up to 30 s) instead of failing mid-transaction.
    ``read_only`` engines (the history pages) are refused every write by the database itself.
    """
    try:
        engine = sa.create_engine(_read_only_url(url) if read_only else url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise StateError(f"[state] url is not a usable SQLAlchemy URL: {exc}") from None
    if read_only:
        _refuse_writes(engine)
        return engine
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout = 30000")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


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
    # The scripts ship as the audience_sync.migrations package (from the top-level migrations/
    # folder), so ask the import system where it is rather than assuming a folder layout.
    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(importlib.resources.files("audience_sync.migrations"))
    )
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (Alembic); safe to run on a current database."""
    cfg = _alembic_config()
    try:
        with engine.begin() as conn:
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


@dataclass(slots=True)
class Applied:
    """Everything one batch of confirmed outcomes changes for one audience's run."""

    audience_id: int
    run_id: int
    trait_key: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    changes: bulk.ChangeRows = field(init=False)
    """The change log's rows (kept empty when the change log is off)."""
    delivered: int = 0
    failed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
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

    def audience(self, destination: str, key: str, name: str) -> AudienceRef:
        """The audience's row, created on first use; its name follows the config."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(sync_audiences.c.id, sync_audiences.c.audience_name).where(
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
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            else:
                audience_id = row.id
                if row.audience_name != name:
                    conn.execute(
                        sync_audiences.update()
                        .where(sync_audiences.c.id == audience_id)
                        .values(audience_name=name)
                    )
        return AudienceRef(int(audience_id), destination, key, name)

    def find_audience(self, destination: str, key: str) -> AudienceRef | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_audiences).where(
                    sync_audiences.c.destination == destination,
                    sync_audiences.c.audience_key == key,
                )
            ).first()
        if row is None:
            return None
        return AudienceRef(row.id, row.destination, row.audience_key, row.audience_name)

    def members(self, audience_id: int) -> pd.Index:
        """The user ids the destination was last confirmed to hold as members."""
        ids = bulk.read_members_arrow(self.engine.url, audience_id)
        if ids is None:
            with self.engine.connect() as conn:
                ids = bulk.read_members(conn, audience_id)
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index

    def retry_queue(self, audience_id: int) -> pd.DataFrame:
        """Users whose last change was not delivered, indexed by user id."""
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
        """Whether a run of the audience has ``succeeded`` (so it is past its initial sync)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_runs.c.id)
                .where(
                    sync_runs.c.audience_id == audience_id,
                    sync_runs.c.status == RunStatus.SUCCEEDED.value,
                )
                .limit(1)
            ).first()
        return row is not None

    # -- runs ----------------------------------------------------------------------------

    def start_run(self, audience: AudienceRef, *, mode: str, trigger: str) -> int:
        """Write the run's row as ``running`` (so a crash leaves a visible trace)."""
        with self.engine.begin() as conn:
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

    # -- applying confirmed outcomes --------------------------------------------------------

    def apply(
        self, batches: Sequence[Applied], on_commit: Callable[[sa.Connection], None] | None = None
    ) -> None:
        """Write the confirmed outcomes of one delivery batch, for all audiences, atomically."""
        now = self.clock()
        # One statement per table for all audiences: a commit's cost is its rows, not its
        # number of audiences (the engine commits every few hundred users).
        with self.engine.begin() as conn:
            bulk.add_members(conn, [(b.audience_id, u) for b in batches for u in b.added])
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
                    ),
                    [
                        {"run": b.run_id, "d": b.delivered, "f": b.failed, "s": b.skipped}
                        for b in counted
                    ],
                )
            if on_commit is not None:
                on_commit(conn)

    def drop_retries(self, audience_id: int, user_ids: Sequence[str]) -> None:
        """Forget retry rows that no longer match a planned change (the user moved on)."""
        with self.engine.begin() as conn:
            _delete_retries(conn, audience_id, user_ids)

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
            return [_row(r) for r in conn.execute(query).mappings()]

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

    def user_changes(self, user_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The change log of one user, newest first."""
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
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def requests_used(self, day: date) -> dict[str, int]:
        """Requests each destination counted on ``day`` (UTC) against its daily budget."""
        if not sa.inspect(self.engine).has_table("destination_requests"):
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(destination_requests.c.destination, destination_requests.c.used).where(
                    destination_requests.c.day == day
                )
            )
            return {r.destination: int(r.used) for r in rows}

    def requests_by_day(self, since: date) -> list[tuple[str, date, int]]:
        """``(destination, UTC day, requests)`` for each day from ``since``, oldest first."""
        if not sa.inspect(self.engine).has_table("destination_requests"):
            return []
        r = destination_requests.c
        query = (
            sa.select(r.destination, r.day, r.used)
            .where(r.day >= since)
            .order_by(r.destination, r.day)
        )
        with self.engine.connect() as conn:
            return [(row.destination, row.day, int(row.used)) for row in conn.execute(query)]


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


def _row(row: sa.RowMapping) -> dict[str, Any]:
    return {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
