"""Bulk reads and writes of the large state tables (``sync_members``, ``sync_changes``).

PostgreSQL moves rows with ``COPY`` through psycopg 3 on the transaction's own connection,
and reads members through ADBC's PostgreSQL driver, which decodes binary ``COPY`` straight into
Arrow in C (psycopg hands ``COPY`` data to Python one row at a time: 2-3x slower). SQLite
unpacks each audience's member ids and change-log ids from one JSON array (``json_each``, in C;
a third of the CPU of the driver's ``executemany``, which binds a tuple per row), and uses
``executemany`` for computed traits' values. All are measured 10-50x faster than row-by-row ORM
reads or multi-row ``INSERT`` statements (see docs/scale.md).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

from audience_sync.state.schema import sync_changes, sync_members

__all__ = [
    "ChangeRows",
    "Members",
    "add_members",
    "log_changes",
    "read_members",
    "read_members_arrow",
    "read_values",
    "remove_members",
    "set_values",
]

log = logging.getLogger(__name__)


def _postgres(conn: sa.Connection) -> Any | None:
    """The psycopg 3 connection under ``conn`` when it is PostgreSQL through psycopg, else None."""
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        return None
    return conn.connection.dbapi_connection


def read_members(conn: sa.Connection, audience_id: int) -> pa.Array:
    """The audience's member ids as Arrow text, read in bulk."""
    pg = _postgres(conn)
    if pg is not None:
        query = "SELECT user_id FROM sync_members WHERE audience_id = %s"
        return _copy_out(pg, query, audience_id, ["user_id"]).column("user_id").combine_chunks()
    select = sa.select(sync_members.c.user_id).where(sync_members.c.audience_id == audience_id)
    if conn.dialect.name == "sqlite":
        # One JSON array built by SQLite in C and parsed by orjson: no tuple per row, and none
        # of SQLAlchemy's per-row result processing (2.5M ids: 0.43 s; fetchall 1.0 s).
        array = sa.func.json_group_array(sync_members.c.user_id)
        text = conn.execute(select.with_only_columns(array)).scalar_one()
        return pa.array(orjson.loads(text), pa.large_string())
    return pa.array(conn.execute(select).scalars().all(), pa.large_string())


def _copy_out(pg: Any, query: str, audience_id: int, columns: list[str]) -> pa.Table:
    """The text columns ``query`` selects, through ``COPY ... TO STDOUT`` parsed by Arrow."""
    # CSV (not text) format: its quoting round-trips any id, tabs and newlines included.
    buffer = io.BytesIO()
    with (
        pg.cursor() as cursor,
        cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT csv)", (audience_id,)) as copy,
    ):
        for block in copy:
            buffer.write(block)
    if buffer.tell() == 0:
        return pa.table({c: pa.array([], pa.large_string()) for c in columns})
    buffer.seek(0)
    return pacsv.read_csv(
        buffer,
        read_options=pacsv.ReadOptions(column_names=columns),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(columns, pa.large_string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def read_values(conn: sa.Connection, audience_id: int) -> pa.Table:
    """A computed trait's ``user_id`` and ``value`` (canonical JSON) columns, read in bulk."""
    pg = _postgres(conn)
    if pg is not None:
        query = "SELECT user_id, value FROM sync_members WHERE audience_id = %s"
        return _copy_out(pg, query, audience_id, ["user_id", "value"])
    m = sync_members.c
    select = sa.select(m.user_id, m.value).where(m.audience_id == audience_id)
    if conn.dialect.name == "sqlite":
        # As read_members: two JSON arrays built by SQLite in C (one scan feeds both in order).
        arrays = select.with_only_columns(
            sa.func.json_group_array(m.user_id), sa.func.json_group_array(m.value)
        )
        ids, values = conn.execute(arrays).one()
        return pa.table(
            {
                "user_id": pa.array(orjson.loads(ids), pa.large_string()),
                "value": pa.array(orjson.loads(values), pa.large_string()),
            }
        )
    rows = conn.execute(select).all()
    return pa.table(
        {
            "user_id": pa.array([r.user_id for r in rows], pa.large_string()),
            "value": pa.array([r.value for r in rows], pa.large_string()),
        }
    )


def read_members_arrow(url: sa.URL, audience_id: int) -> pa.Array | None:
    """The audience's member ids read through ADBC (PostgreSQL), or None to use ``read_members``.

    ADBC's PostgreSQL driver decodes binary ``COPY`` into Arrow in C (2-3x psycopg). It opens
    short-lived connections of its own: the read needs no transaction of the caller's, since the
    run lock keeps other writers off the audience's members. SQLite has no such path: ADBC's
    driver links a second copy of the SQLite library into the process, and two copies do not
    see each other's POSIX file locks, which SQLite documents as a way to corrupt a database
    (we saw "disk I/O error" in tests).
    """
    if url.get_backend_name() == "postgresql":
        return _read_postgres(url, audience_id)
    return None


def _read_postgres(url: sa.URL, audience_id: int) -> pa.Array | None:
    """The ids read as two halves split at the median of PostgreSQL's statistics for
    ``user_id``, on two connections at once: two server processes scan and send while this one
    decodes (2.5M ids: 0.40 s instead of 0.66 s). Any split point is correct; a good one only
    balances the halves."""
    try:
        import adbc_driver_postgresql.dbapi as adbc
    except ImportError:
        return None
    # libpq takes the same URL as psycopg without SQLAlchemy's "+driver" suffix.
    uri = url.set(drivername="postgresql").render_as_string(hide_password=False)
    select = "SELECT user_id FROM sync_members WHERE audience_id = $1"
    try:
        with adbc.connect(uri) as conn:
            pivot = _adbc_column(conn, _MEDIAN_USER_ID)
            if len(pivot) == 0 or pivot[0].as_py() is None:
                ids = _adbc_column(conn, select, audience_id)  # no statistics yet: one read
            else:
                with (
                    adbc.connect(uri) as other,
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-read") as pool,
                ):
                    middle = pivot[0].as_py()
                    below, above = f"{select} AND user_id < $2", f"{select} AND user_id >= $2"
                    upper = pool.submit(_adbc_column, other, above, audience_id, middle)
                    lower = _adbc_column(conn, below, audience_id, middle)
                    ids = pa.chunked_array([*lower.chunks, *upper.result().chunks], lower.type)
    except adbc.Error as exc:
        # libpq's messages name the host and user, never the password.
        log.warning("reading members through ADBC failed, using psycopg instead: %s", exc)
        return None
    return ids.cast(pa.large_string()).combine_chunks()


def _adbc_column(conn: Any, query: str, *params: object) -> pa.ChunkedArray:
    """The first column of ``query``'s result, as Arrow."""
    with conn.cursor() as cursor:
        cursor.execute(query, parameters=params or None)
        column: pa.ChunkedArray = cursor.fetch_arrow_table().column(0)
        return column


# A middle user_id from the statistics ANALYZE keeps for sync_members: the histogram's middle
# bound, or with no histogram (few distinct ids) the middle of the most common ids.
_MEDIAN_USER_ID = """
WITH s AS (
  SELECT histogram_bounds::text::text[] AS bounds, most_common_vals::text::text[] AS common
  FROM pg_stats
  WHERE schemaname = current_schema() AND tablename = 'sync_members' AND attname = 'user_id'
)
SELECT COALESCE(
  bounds[array_length(bounds, 1) / 2 + 1],
  (SELECT v FROM unnest(common) AS v ORDER BY v OFFSET array_length(common, 1) / 2 LIMIT 1)
) FROM s
"""


def _copy_csv(pg: Any, name: str, table: pa.Table) -> None:
    """``COPY`` an Arrow table into ``name`` as CSV written by Arrow in C.

    psycopg's ``write_row`` formats each row in Python (about 3 us a row, holding the GIL the
    delivery loop needs). Arrow quotes every string and leaves nulls unquoted and empty, which
    is PostgreSQL's CSV notation for text and NULL.
    """
    out = pa.BufferOutputStream()
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    pacsv.write_csv(table, out, write_options=options)
    columns = ", ".join(table.column_names)
    with (
        pg.cursor() as cursor,
        cursor.copy(f"COPY {name} ({columns}) FROM STDIN (FORMAT csv)") as copy,
    ):
        copy.write(out.getvalue())


Members = tuple[int, Sequence[str]]
"""An audience's id and user ids: rows ``(audience_id, user_id)`` of ``sync_members``."""


def add_members(conn: sa.Connection, members: Sequence[Members]) -> None:
    """Insert member rows, for any number of audiences, in one statement (SQLite: one per
    audience)."""
    members = [(a, users) for a, users in members if len(users)]
    if not members:
        return
    pg = _postgres(conn)
    if pg is not None:
        sizes = [len(users) for _, users in members]
        audience_ids = pa.array(np.repeat([a for a, _ in members], sizes), pa.int32())
        user_ids = _joined([users for _, users in members], pa.string())
        _copy_csv(pg, "sync_members", pa.table({"audience_id": audience_ids, "user_id": user_ids}))
    elif conn.dialect.name == "sqlite":
        for audience_id, users in members:
            _sqlite_each(
                conn,
                "INSERT INTO sync_members (audience_id, user_id) SELECT ?, value FROM json_each(?)",
                (audience_id,),
                users,
            )
    else:
        conn.execute(
            sync_members.insert(),
            [{"audience_id": a, "user_id": u} for a, users in members for u in users],
        )


def set_values(conn: sa.Connection, rows: Sequence[tuple[int, str, str]]) -> None:
    """Insert or replace computed-trait values: ``(audience_id, user_id, value)`` rows."""
    if not rows:
        return
    pg = _postgres(conn)
    upsert = " ON CONFLICT (audience_id, user_id) DO UPDATE SET value = excluded.value"
    if pg is not None:
        # One statement over three array parameters; COPY cannot replace a row.
        with pg.cursor() as cursor:
            cursor.execute(
                "INSERT INTO sync_members (audience_id, user_id, value) "
                "SELECT * FROM unnest(%s::int[], %s::text[], %s::text[])" + upsert,
                ([a for a, _, _ in rows], [u for _, u, _ in rows], [v for _, _, v in rows]),
            )
    elif conn.dialect.name == "sqlite":
        _sqlite_executemany(
            conn,
            "INSERT INTO sync_members (audience_id, user_id, value) VALUES (?, ?, ?)" + upsert,
            rows,
        )
    else:
        for a, u, v in rows:
            conn.execute(
                sync_members.delete().where(
                    sync_members.c.audience_id == a, sync_members.c.user_id == u
                )
            )
            conn.execute(sync_members.insert().values(audience_id=a, user_id=u, value=v))


def remove_members(conn: sa.Connection, members: Sequence[Members]) -> None:
    """Delete member rows, for any number of audiences, in one statement (SQLite: one per
    audience)."""
    members = [(a, users) for a, users in members if len(users)]
    if not members:
        return
    pg = _postgres(conn)
    if pg is not None:
        # One statement joining two array parameters: no per-row statements, no IN lists.
        with pg.cursor() as cursor:
            cursor.execute(
                "DELETE FROM sync_members m USING unnest(%s::int[], %s::text[]) AS d(a, u) "
                "WHERE m.audience_id = d.a AND m.user_id = d.u",
                ([a for a, users in members for _ in users], [u for _, us in members for u in us]),
            )
    elif conn.dialect.name == "sqlite":
        for audience_id, users in members:
            # SQLite looks each id of the list up in the primary key (the IN-operator plan).
            _sqlite_each(
                conn,
                "DELETE FROM sync_members WHERE audience_id = ? "
                "AND user_id IN (SELECT value FROM json_each(?))",
                (audience_id,),
                users,
            )
    else:
        c = sync_members.c
        conn.execute(
            sync_members.delete().where(
                c.audience_id == sa.bindparam("a"), c.user_id == sa.bindparam("u")
            ),
            [{"a": a, "u": u} for a, users in members for u in users],
        )


def _sqlite_executemany(conn: sa.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """``sql`` once per row through the driver's own ``executemany``: one prepared statement,
    none of SQLAlchemy's per-row parameter processing (5x faster at 100,000s of rows)."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    cursor: Any = driver.cursor()  # sqlite3's executemany takes any iterable, a generator too
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


def _sqlite_each(conn: sa.Connection, sql: str, params: Sequence[Any], ids: Sequence[str]) -> None:
    """Run ``sql`` with ``params`` and, last, ``ids`` as one JSON array, which the statement's
    ``json_each(?)`` unpacks in C into rows (column ``value``).

    For 1M ids in 50 commits, a third of the CPU of ``executemany`` (1.4 s against 4.4 s, member
    rows and change-log rows), which builds and binds a tuple per row in Python.
    """
    driver = conn.connection.dbapi_connection
    assert driver is not None
    # Text, not bytes: SQLite takes a BLOB argument for JSONB (or refuses it, before 3.45).
    driver.execute(sql, (*params, orjson.dumps(list(ids)).decode()))


@dataclass(slots=True)
class ChangeRows:
    """``sync_changes`` rows of one run (one trait), column by column: no dict per row."""

    run_id: int
    trait_key: str
    user_ids: list[str] = field(default_factory=list)
    values: list[bool] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    old_values: list[str | None] | None = None
    """A computed trait's ``old_value`` / ``new_value`` columns (None for an audience's log,
    whose rows leave them NULL)."""
    new_values: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def append(
        self,
        user_id: str,
        value: bool,
        outcome: str,
        reason: str | None,
        values: tuple[str | None, str | None] | None = None,
    ) -> None:
        """One row; ``values``: a computed trait's ``(old, new)`` values."""
        self.user_ids.append(user_id)
        self.values.append(value)
        self.outcomes.append(outcome)
        self.reasons.append(reason)
        if values is not None:
            self._trait_values(values[0:1], values[1:2])

    def _trait_values(self, old: Sequence[str | None], new: Sequence[str | None]) -> None:
        if self.old_values is None or self.new_values is None:
            self.old_values, self.new_values = [], []
        self.old_values.extend(old)
        self.new_values.extend(new)

    def rows(self) -> Iterator[tuple[str, bool, str, str | None]]:
        """``(user_id, value, outcome, reason)`` per row."""
        return zip(self.user_ids, self.values, self.outcomes, self.reasons, strict=True)

    def extend(
        self,
        user_ids: list[str],
        values: list[bool],
        outcome: str,
        trait_values: tuple[list[str | None], list[str | None]] | None = None,
    ) -> None:
        """Many rows with the same outcome and no reason (a confirmed batch)."""
        self.user_ids.extend(user_ids)
        self.values.extend(values)
        self.outcomes.extend([outcome] * len(user_ids))
        self.reasons.extend([None] * len(user_ids))
        if trait_values is not None:
            self._trait_values(*trait_values)


def log_changes(conn: sa.Connection, at: datetime, logs: Sequence[ChangeRows]) -> None:
    """Append ``sync_changes`` rows, for any number of runs, in one statement (two when some
    are a computed trait's, which also fill ``old_value`` and ``new_value``)."""
    logs = [log for log in logs if len(log)]
    for part, values in (
        ([log for log in logs if log.new_values is None], False),
        ([log for log in logs if log.new_values is not None], True),
    ):
        if part:
            _log(conn, at, part, values)


def _log(conn: sa.Connection, at: datetime, logs: Sequence[ChangeRows], values: bool) -> None:
    extra = ("old_value", "new_value") if values else ()
    pg = _postgres(conn)
    if pg is not None:
        sizes = [len(log) for log in logs]
        columns: dict[str, Any] = {
            "run_id": pa.array(np.repeat([log.run_id for log in logs], sizes), pa.int32()),
            "user_id": _joined([log.user_ids for log in logs], pa.string()),
            "trait_key": pa.array(np.repeat([log.trait_key for log in logs], sizes)),
            "value": _joined([log.values for log in logs], pa.bool_()),
            "outcome": _joined([log.outcomes for log in logs], pa.string()),
            "reason": _joined([log.reasons for log in logs], pa.string()),
            "at": pa.repeat(pa.scalar(at.isoformat()), sum(sizes)),
        }
        if values:
            columns["old_value"] = _joined([log.old_values or () for log in logs], pa.string())
            columns["new_value"] = _joined([log.new_values or () for log in logs], pa.string())
        _copy_csv(pg, "sync_changes", pa.table(columns))
        return

    def rows(log: ChangeRows) -> Iterable[tuple[Any, ...]]:
        if not values:
            return log.rows()
        return (
            (*row, old, new)
            for row, old, new in zip(
                log.rows(), log.old_values or (), log.new_values or (), strict=True
            )
        )

    if conn.dialect.name == "sqlite":
        # The timestamp as SQLAlchemy stores it in SQLite, converted once rather than per row.
        stamp = sync_changes.c.at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        at_value = stamp(at) if stamp is not None else at
        if not values:  # an audience's rows: one statement per run, value, outcome and reason
            for log in logs:
                groups: dict[tuple[bool, str, str | None], list[str]] = {}
                for user_id, value, outcome, reason in log.rows():
                    groups.setdefault((value, outcome, reason), []).append(user_id)
                for same, users in groups.items():
                    _sqlite_each(
                        conn,
                        "INSERT INTO sync_changes (run_id, trait_key, value, outcome, reason, "
                        "at, user_id) SELECT ?, ?, ?, ?, ?, ?, value FROM json_each(?)",
                        (log.run_id, log.trait_key, *same, at_value),
                        users,
                    )
            return
        names = ", ".join(("user_id", "value", "outcome", "reason", *extra))
        marks = ", ".join("?" * (6 + len(extra)))
        _sqlite_executemany(
            conn,
            f"INSERT INTO sync_changes (run_id, trait_key, {names}, at) VALUES ({marks}, ?)",
            ((log.run_id, log.trait_key, *row, at_value) for log in logs for row in rows(log)),
        )
        return
    keys = ("user_id", "value", "outcome", "reason", *extra)
    conn.execute(
        sync_changes.insert(),
        [
            {
                "run_id": log.run_id,
                "trait_key": log.trait_key,
                "at": at,
                **dict(zip(keys, row, strict=True)),
            }
            for log in logs
            for row in rows(log)
        ],
    )


def _joined(lists: Sequence[Sequence[Any]], type_: pa.DataType) -> pa.Array:
    """One Arrow array of ``type_`` from several Python lists, each converted in C."""
    return pa.concat_arrays([pa.array(values, type_) for values in lists])
