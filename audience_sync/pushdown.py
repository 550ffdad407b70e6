"""The diff pushed down into the database: for an audience whose SQL query runs in the state
database itself, entered and exited users are computed there with anti-joins, and only the
changes (not both sides of the diff) travel to Python.

It validates like ``sources/validate.py`` (ids trimmed, empty ids rejected, identical duplicate
rows collapsed, users with conflicting rows held and all their rows rejected) so it plans exactly
what the in-memory path plans; the property tests in ``tests/diff/test_diff_paths.py`` hold it
to that. Computed traits are not pushed down: their values are made canonical in DuckDB
(``sources/values.py``), so a trait's query runs through the in-memory path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.schema import DropTable
from sqlalchemy.sql.elements import ColumnElement

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
from audience_sync.state.schema import sync_members

__all__ = ["applies", "plan_in_database", "plan_on_connection"]

#: The materialised, cleaned query result (a temporary table: private to the connection).
_SRC = "audience_sync_pushdown_src"
#: The whitespace Python's ``str.strip`` removes from ASCII text.
_BLANKS = " \t\n\r\x0b\x0c"
#: Control characters as ``validate`` rejects them, less NUL (which PostgreSQL text cannot
#: hold and SQLite's GLOB would read as the pattern's end); regex escapes PostgreSQL and RE2 read.
_CONTROL_REGEX = r"[\x01-\x1f\x7f-\x9f]"
#: The state dialects the engine pushes down into (``applies``).
_STATE_DIALECTS = ("postgresql", "sqlite")

Text = ColumnElement[str]


@dataclass(frozen=True)
class _Dialect:
    """What Core cannot hide: how a database trims given characters, finds a control character,
    and whether the temporary table wants an index (row stores do; column stores have none)."""

    trim: Callable[[Text], Text]
    has_control: Callable[[Text], ColumnElement[bool]]
    index: bool


_DIALECTS = {
    "postgresql": _Dialect(
        trim=lambda c: sa.func.btrim(c, sa.literal(_BLANKS)),
        has_control=lambda c: c.regexp_match(_CONTROL_REGEX),
        index=True,
    ),
    "sqlite": _Dialect(  # no regular expressions without a Python callback per row: GLOB
        trim=lambda c: sa.func.trim(c, sa.literal(_BLANKS)),
        has_control=lambda c: c.op("GLOB", is_comparison=True)("*[\x01-\x1f\x7f-\x9f]*"),
        index=True,
    ),
    "duckdb": _Dialect(  # its own function, which finds a match anywhere in the text
        trim=lambda c: sa.func.trim(c, sa.literal(_BLANKS)),
        has_control=lambda c: sa.func.regexp_matches(c, _CONTROL_REGEX, type_=sa.Boolean),
        index=False,
    ),
}


def applies(audience: AudienceConfig, state: sa.Engine) -> bool:
    """Whether the audience's query runs in the state database (same URL, same credentials)."""
    if audience.query is None or audience.source_url is None or audience.computed:
        return False
    if state.dialect.name not in _STATE_DIALECTS:
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

    Returns what ``planning.load_and_plan``'s in-memory path returns: the plan with the rows of
    the users it sends ``true`` (``Plan.sent``, with their identity traits: all the engine
    needs to build the updates) and the snapshot's counts and rejected rows, no members in
    memory.
    """
    assert audience.query is not None
    where = f"query for {audience.name!r}"
    try:
        with state.connect() as conn:
            result = plan_on_connection(conn, audience.query, audience_id, full=full, where=where)
            conn.commit()
    except sa.exc.DBAPIError as exc:
        detail = str(exc.orig).strip().splitlines()[0]
        where_db = state.url.render_as_string(hide_password=True)
        raise SnapshotError(f"{where} on {where_db} failed: {detail}") from None
    return result


def plan_on_connection(
    conn: sa.Connection, query: str, audience_id: int, *, full: bool, where: str
) -> tuple[Snapshot, Plan]:
    """``plan_in_database`` on an open connection that sees both the query's tables and a
    ``sync_members`` table (``state.schema``): SQLite, PostgreSQL or DuckDB.

    Leaves the connection's transaction open (the caller commits or rolls back).
    """
    dialect = _DIALECTS.get(conn.dialect.name)
    if dialect is None:
        raise SnapshotError(f"{where}: cannot diff in a {conn.dialect.name} database")
    src = _materialise(conn, dialect, wrappable(query), where)
    result = _diff(conn, dialect, src, audience_id, where, full=full)
    conn.execute(DropTable(src))
    return result


def _materialise(conn: sa.Connection, dialect: _Dialect, query: str, where: str) -> sa.Table:
    """Run the query once into a temporary table of trimmed text columns (ids and identity
    traits), each row numbered in the order the database returned them."""
    star = sa.literal_column("*", sa.Text)
    header = conn.execute(sa.select(star).select_from(_wrap(query, [])).limit(0))
    raw = list(map(str, header.keys()))
    columns = [c.strip() for c in raw]
    require_user_id(columns, where)
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise SnapshotError(f"{where}: duplicate column names {dupes}")
    kept = ["user_id", *(k for k in IDENTITY_TRAITS if k in columns)]
    src = sa.Table(
        _SRC,
        sa.MetaData(),
        sa.Column("row_", sa.BigInteger),
        *(sa.Column(c, sa.Text) for c in kept),
        prefixes=["TEMPORARY"],
    )
    conn.execute(DropTable(src, if_exists=True))  # left by a failed run on a pooled connection
    src.create(conn)
    q = _wrap(query, raw)
    # Each column as text, blanks trimmed, empty as NULL (``validate._clean``).
    cleaned = [
        sa.func.nullif(dialect.trim(sa.cast(q.c[raw[columns.index(c)]], sa.Text)), "") for c in kept
    ]
    numbered = sa.select(sa.func.row_number().over(), *cleaned)
    conn.execute(src.insert().from_select(["row_", *kept], numbered))
    if dialect.index:
        sa.Index(f"{_SRC}_user", src.c.user_id).create(conn)
    return src


def _wrap(query: str, columns: list[str]) -> sa.Subquery:
    """The query as ``(query) AS q`` with the given columns; the newline ends a ``--`` comment."""
    return sa.text(query + "\n").columns(*(sa.column(c) for c in columns)).subquery("q")


def _unusable_why(user_id: str | None) -> tuple[str | None, str]:
    if user_id is None:
        return None, "empty user_id"
    return printable(user_id), CONTROL_REASON


def _diff(
    conn: sa.Connection,
    dialect: _Dialect,
    src: sa.Table,
    audience_id: int,
    where: str,
    *,
    full: bool,
) -> tuple[Snapshot, Plan]:
    traits = [c.name for c in src.c if c.name not in ("row_", "user_id")]
    cols = [src.c.user_id, *(src.c[t] for t in traits)]
    # Rejected rows: no user_id, or one with a control character (as ``validate``).
    unusable = sa.or_(src.c.user_id.is_(None), dialect.has_control(src.c.user_id))
    usable = sa.not_(unusable)
    # Distinct rows per user: one means a member, more means conflicting rows (held).
    distinct = sa.select(*cols).where(usable).distinct().subquery("d")
    per_user = (
        sa.select(distinct.c.user_id, sa.func.count().label("n"))
        .group_by(distinct.c.user_id)
        .subquery("u")
    )
    conflict = per_user.c.user_id == src.c.user_id
    members_table = sync_members.alias("m")
    in_audience = members_table.c.audience_id == audience_id

    total, missing = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((unusable, 1), else_=0)), 0),
        ).select_from(src)
    ).one()
    # Every row of a held user is rejected, identical repeats included (as ``validate``).
    conflicting = conn.execute(
        sa.select(per_user.c.user_id, sa.func.count().label("n"))
        .join_from(per_user, src, conflict)
        .where(per_user.c.n > 1)
        .group_by(per_user.c.user_id)
    ).all()
    held = frozenset(str(r.user_id) for r in conflicting)
    first_rejected = sa.select(src.c.row_, src.c.user_id).order_by(src.c.row_)
    rejected = [
        RejectedRow(int(r.row_), *_unusable_why(r.user_id))
        for r in conn.execute(first_rejected.where(unusable).limit(MAX_REPORTED_ROWS))
    ]
    if conflicting:
        reason = (
            "conflicting duplicate: the same user_id appears with different "
            f"{', '.join(traits)}; fix the export so each user has one row"
        )
        held_rows = first_rejected.join_from(src, per_user, conflict).where(per_user.c.n > 1)
        rejected += [
            RejectedRow(int(r.row_), str(r.user_id), reason)
            for r in conn.execute(held_rows.limit(MAX_REPORTED_ROWS))
        ]
    rejected = sorted(rejected, key=lambda r: r.row)[:MAX_REPORTED_ROWS]
    # A member's row: its first occurrence, for users with exactly one distinct row.
    first_rows = (
        sa.select(sa.func.min(src.c.row_).label("row_"), *cols)
        .where(usable)
        .group_by(*cols)
        .subquery("s")
    )
    members = (
        sa.select(*first_rows.c)
        .join_from(first_rows, per_user, per_user.c.user_id == first_rows.c.user_id)
        .where(per_user.c.n == 1)
        .subquery("t")
    )
    in_state = (
        sa.exists()
        .where(in_audience, members_table.c.user_id == members.c.user_id)
        .correlate(members)
    )
    sends_query = sa.select(*members.c, sa.case((in_state, 0), else_=1).label("entered_")).order_by(
        members.c.row_
    )
    if not full:
        sends_query = sends_query.where(sa.not_(in_state))
    sends = pd.DataFrame(
        [tuple(r) for r in conn.execute(sends_query)],
        columns=["row_", "user_id", *traits, "entered_"],
    )
    # A rejected row is no member: its user exits like one without a row (as in memory).
    in_snapshot = sa.exists().where(usable, src.c.user_id == members_table.c.user_id)
    exited = [
        str(user_id)
        for user_id in conn.execute(
            sa.select(members_table.c.user_id)
            .where(in_audience, sa.not_(in_snapshot))
            .order_by(members_table.c.user_id)
        ).scalars()
    ]
    synced = conn.execute(
        sa.select(sa.func.count()).select_from(members_table).where(in_audience)
    ).scalar_one()
    entered_mask = sends["entered_"].to_numpy(dtype=bool)
    frame = sends.drop(columns=["row_", "entered_"]).astype(
        {c: "string[pyarrow]" for c in ["user_id", *traits]}
    )
    frame = frame.set_index("user_id")
    # The rows of the users sent `true`, entered then resend, as the in-memory diff gives them.
    sent = pd.concat([frame[entered_mask], frame[~entered_mask]]) if full else frame
    entered = int(entered_mask.sum())
    the_plan = Plan(
        entered=sent.index[:entered],
        exited=pd.Index(pd.array(exited, dtype="string[pyarrow]"), name="user_id"),
        resend=sent.index[entered:] if full else pd.Index([], dtype="string[pyarrow]"),
        unchanged=int(synced) - len(exited),
        sent=sent,
    )
    snapshot = Snapshot(  # its members stay in the database: as planning's, none in memory
        source=f"{where} (diffed in the database)",
        members=frame.iloc[:0],
        rows=int(total),
        rejected=tuple(rejected),
        held=held,
        rejected_count=int(missing) + sum(int(r.n) for r in conflicting),
    )
    return snapshot, the_plan
