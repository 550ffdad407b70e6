"""The diff pushed down into the database: for an audience whose SQL query runs in the state
database itself, entered and exited users are computed there with anti-joins, and only the
changes (not both sides of the diff) travel to Python.

It validates like ``sources/validate.py`` (ids trimmed, empty ids rejected, identical duplicate
rows collapsed, users with conflicting rows held and all their rows rejected) so it plans exactly
what the in-memory path plans; the property tests in ``tests/test_diff_paths.py`` hold it to that.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import sqlalchemy as sa

from audience_sync.config import AudienceConfig
from audience_sync.diff import Plan
from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS, RejectedRow, Snapshot
from audience_sync.sources.sql import wrappable
from audience_sync.sources.validate import (
    CONTROL_REASON,
    MAX_REPORTED_ROWS,
    printable,
    require_user_id,
)

__all__ = ["applies", "plan_in_database"]

#: The materialised, cleaned query result (a temporary table: private to the connection).
_SRC = "audience_sync_pushdown_src"
#: The whitespace Python's ``str.strip`` removes from ASCII text.
_BLANKS = " \t\n\r\x0b\x0c"


def applies(audience: AudienceConfig, state: sa.Engine) -> bool:
    """Whether the audience's query runs in the state database (same URL, same credentials)."""
    if audience.query is None or audience.source_url is None:
        return False
    if state.dialect.name not in ("postgresql", "sqlite"):
        return False
    try:
        source = sa.make_url(audience.source_url)
    except sa.exc.ArgumentError:
        return False
    return source == state.url


def plan_in_database(
    state: sa.Engine, audience: AudienceConfig, audience_id: int, *, full: bool
) -> tuple[Snapshot, Plan]:
    """Validate and diff the audience's query against its synced state, in the database.

    The returned snapshot holds only the rows of users sent ``true`` (with their identity
    traits), which is all the engine needs to build the updates.
    """
    assert audience.query is not None
    where = f"query for {audience.name!r}"
    query = wrappable(audience.query)
    try:
        with state.connect() as conn:
            traits = _materialise(conn, query, where)
            snapshot, the_plan = _diff(conn, audience_id, traits, where, full=full)
            conn.exec_driver_sql(f"DROP TABLE {_SRC}")
            conn.commit()
    except sa.exc.DBAPIError as exc:
        detail = str(exc.orig).strip().splitlines()[0]
        where_db = state.url.render_as_string(hide_password=True)
        raise SnapshotError(f"{where} on {where_db} failed: {detail}") from None
    return snapshot, the_plan


def _materialise(conn: sa.Connection, query: str, where: str) -> list[str]:
    """Run the query once into a temporary table of trimmed text columns; its identity traits."""
    raw = list(conn.execute(sa.text(f"SELECT * FROM ({query}\n) q LIMIT 0")).keys())
    columns = [str(c).strip() for c in raw]
    require_user_id(columns, where)
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise SnapshotError(f"{where}: duplicate column names {dupes}")
    traits = [k for k in IDENTITY_TRAITS if k in columns]
    quote = conn.dialect.identifier_preparer.quote
    cleaned = ", ".join(
        f"{_clean(conn, 'q.' + quote(raw[columns.index(c)]))} AS {quote(c)}"
        for c in ("user_id", *traits)
    )
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_SRC}")
    conn.execute(
        sa.text(
            f"CREATE TEMPORARY TABLE {_SRC} AS "
            f"SELECT ROW_NUMBER() OVER () AS row_, {cleaned} FROM ({query}\n) q"
        )
    )
    conn.exec_driver_sql(f"CREATE INDEX {_SRC}_user ON {_SRC} (user_id)")
    return traits


def _clean(conn: sa.Connection, column: str) -> str:
    """SQL for: the column as text, blanks trimmed, empty as NULL (``validate._clean``)."""
    if conn.dialect.name == "postgresql":
        blanks = "E' \\t\\n\\r\\x0b\\x0c'"
        return f"NULLIF(BTRIM(CAST({column} AS TEXT), {blanks}), '')"
    blanks = "char(" + ",".join(str(ord(c)) for c in _BLANKS) + ")"
    return f"NULLIF(TRIM(CAST({column} AS TEXT), {blanks}), '')"


def _unusable(conn: sa.Connection) -> str:
    """SQL for: the row's user_id is missing or holds a control character (as ``validate``)."""
    if conn.dialect.name == "postgresql":  # PostgreSQL text never holds NUL
        control = "user_id ~ '[\\x01-\\x1f\\x7f-\\x9f]'"
    else:
        ranges = "char(1) || '-' || char(31) || char(127) || '-' || char(159)"
        control = f"user_id GLOB '*[' || {ranges} || ']*'"
    return f"(user_id IS NULL OR {control})"


def _unusable_why(user_id: str | None) -> tuple[str | None, str]:
    if user_id is None:
        return None, "empty user_id"
    return printable(user_id), CONTROL_REASON


def _diff(
    conn: sa.Connection, audience_id: int, traits: list[str], where: str, *, full: bool
) -> tuple[Snapshot, Plan]:
    cols = ", ".join(["user_id", *traits])
    # Distinct rows per user: one means a member, more means conflicting rows (held).
    unusable = _unusable(conn)  # rejected rows: no user_id, or one with a control character
    per_user = (
        f"SELECT user_id, COUNT(*) AS n FROM (SELECT DISTINCT {cols} FROM {_SRC} "
        f"WHERE NOT {unusable}) d GROUP BY user_id"
    )
    in_state = (
        "EXISTS (SELECT 1 FROM sync_members m WHERE m.audience_id = :aid AND m.user_id = s.user_id)"
    )
    first_rows = (
        f"SELECT MIN(row_) AS row_, {cols} FROM {_SRC} s WHERE NOT {unusable} GROUP BY {cols}"
    )
    params = {"aid": audience_id}

    def rows(sql: str) -> list[Any]:
        return list(conn.execute(sa.text(sql), params))

    total, missing = rows(
        f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN {unusable} THEN 1 ELSE 0 END), 0) FROM {_SRC}"
    )[0]
    # Every row of a held user is rejected, identical repeats included (as ``validate``).
    conflicting = rows(
        f"SELECT u.user_id, COUNT(*) AS n FROM ({per_user}) u JOIN {_SRC} s "
        "ON s.user_id = u.user_id WHERE u.n > 1 GROUP BY u.user_id"
    )
    held = frozenset(str(r.user_id) for r in conflicting)
    rejected = [
        RejectedRow(int(r.row_), *_unusable_why(r.user_id))
        for r in rows(
            f"SELECT row_, user_id FROM {_SRC} WHERE {unusable} "
            f"ORDER BY row_ LIMIT {MAX_REPORTED_ROWS}"
        )
    ]
    if conflicting:
        reason = (
            "conflicting duplicate: the same user_id appears with different "
            f"{', '.join(traits)}; fix the export so each user has one row"
        )
        rejected += [
            RejectedRow(int(r.row_), str(r.user_id), reason)
            for r in rows(
                f"SELECT s.row_, s.user_id FROM {_SRC} s "
                f"JOIN ({per_user}) u ON u.user_id = s.user_id WHERE u.n > 1 "
                f"ORDER BY s.row_ LIMIT {MAX_REPORTED_ROWS}"
            )
        ]
    rejected = sorted(rejected, key=lambda r: r.row)[:MAX_REPORTED_ROWS]
    # A member's row: its first occurrence, for users with exactly one distinct row.
    members = (
        f"SELECT s.row_, s.user_id{''.join(', s.' + t for t in traits)} FROM ({first_rows}) s "
        f"JOIN ({per_user}) u ON u.user_id = s.user_id WHERE u.n = 1"
    )
    flag = f"CASE WHEN {in_state} THEN 0 ELSE 1 END AS entered_"
    only_entered = "" if full else "WHERE t.entered_ = 1"
    sends = pd.DataFrame(
        [
            tuple(r)
            for r in rows(
                f"SELECT t.* FROM (SELECT s.*, {flag} FROM ({members}) s) t {only_entered} "
                "ORDER BY t.row_"
            )
        ],
        columns=["row_", "user_id", *traits, "entered_"],
    )
    exited = [
        str(r.user_id)
        for r in rows(
            "SELECT m.user_id FROM sync_members m WHERE m.audience_id = :aid AND NOT EXISTS "
            f"(SELECT 1 FROM {_SRC} s WHERE s.user_id = m.user_id) ORDER BY m.user_id"
        )
    ]
    synced = rows("SELECT COUNT(*) FROM sync_members WHERE audience_id = :aid")[0][0]
    entered_mask = sends["entered_"].to_numpy(dtype=bool)
    frame = sends.drop(columns=["row_", "entered_"]).astype(
        {c: "string[pyarrow]" for c in ["user_id", *traits]}
    )
    frame = frame.set_index("user_id")
    index = frame.index
    the_plan = Plan(
        entered=index[entered_mask],
        exited=pd.Index(pd.array(exited, dtype="string[pyarrow]"), name="user_id"),
        resend=index[~entered_mask] if full else pd.Index([], dtype="string[pyarrow]"),
        unchanged=int(synced) - len(exited),
    )
    snapshot = Snapshot(
        source=f"{where} (diffed in the database)",
        members=frame,
        rows=int(total),
        rejected=tuple(rejected),
        held=held,
        rejected_count=int(missing) + sum(int(r.n) for r in conflicting),
    )
    return snapshot, the_plan
