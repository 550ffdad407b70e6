"""Every diff path plans the same changes: the in-memory DuckDB diff, the engine's file path
(repeated ids found by the diff), the one fed by the bulk state reads, and the one pushed down
into the state database (SQLite and PostgreSQL), and that pushed-down SQL on DuckDB through its
SQLAlchemy dialect (a stand-in for a column-store warehouse).

Each is checked against a plain set-based model of the rules (trim ids, reject empty ones and
ones with a control character, collapse identical rows, hold users with conflicting rows) on
generated data.
"""

from __future__ import annotations

import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from audience_sync.config import AudienceConfig
from audience_sync.diff import Plan, plan
from audience_sync.errors import SnapshotError
from audience_sync.model import Snapshot
from audience_sync.planning import load_and_plan
from audience_sync.pushdown import applies, plan_in_database, plan_on_connection
from audience_sync.sources.sql import read_query
from audience_sync.sources.validate import validate
from audience_sync.state import StateStore, connect, upgrade
from audience_sync.state.bulk import add_members
from audience_sync.state.schema import sync_members

# Ids with the characters that break naive CSV/COPY handling, padded with blanks to trim.
_ID_CHARS = st.sampled_from(list("abc019,\"'\\\n\t é"))
_ids = st.text(_ID_CHARS, min_size=1, max_size=4).map(str.strip).filter(bool)
_padded = st.tuples(st.sampled_from(["", " ", "\t"]), _ids, st.sampled_from(["", " "])).map("".join)
_email = st.one_of(st.none(), st.sampled_from(["a@x", "b@x", " b@x "]))
_SCHEMA = pa.schema([("user_id", pa.string()), ("email", pa.string())])
_rows = st.lists(
    st.tuples(st.one_of(_padded, st.sampled_from(["", "  "]), st.none()), _email), max_size=30
)


@dataclass(frozen=True)
class Expected:
    entered: set[str]
    exited: set[str]
    resend: set[str]
    held: set[str]
    unchanged: int
    rejected: int
    emails: dict[str, str | None]


def expected(rows: list[tuple[str | None, str | None]], state: set[str], full: bool) -> Expected:
    """The rules, written the slow and obvious way."""

    def clean(v: str | None) -> str | None:
        v = v.strip() if v is not None else None
        return v or None

    def usable(v: str | None) -> str | None:  # ids with a control character are rejected
        return None if v is None or any(unicodedata.category(c) == "Cc" for c in v) else v

    cleaned = [(usable(clean(u)), clean(e)) for u, e in rows]
    missing = sum(1 for u, _ in cleaned if u is None)
    distinct = {(u, e) for u, e in cleaned if u is not None}
    per_user: dict[str, int] = {}
    for u, _ in distinct:
        per_user[u] = per_user.get(u, 0) + 1
    held = {u for u, n in per_user.items() if n > 1}
    members = {u for u, n in per_user.items() if n == 1}
    exited = state - members - held
    return Expected(
        entered=members - state,
        exited=exited,
        resend=members & state if full else set(),
        held=held,
        unchanged=len(state) - len(exited),
        rejected=missing + sum(1 for u, _ in cleaned if u in held),
        emails={u: e for u, e in distinct if u in members},
    )


def assert_plans(
    want: Expected, got: Plan, snap: Snapshot, rows: int, *, held_exits: bool = False
) -> None:
    """``got`` and ``snap`` plan what the model says (``held_exits``: the engine's plan holds
    every exit while the snapshot has rejected rows)."""
    assert set(got.entered) == want.entered
    assert set(got.exited) == (set() if held_exits else want.exited)
    assert set(got.resend) == want.resend
    assert got.unchanged == want.unchanged + (len(want.exited) if held_exits else 0)
    assert set(snap.held) == want.held
    assert snap.rejected_count == want.rejected
    assert snap.rows == rows


def assert_sends(want: Expected, got: Plan) -> None:
    """The plan carries the rows of users it sends ``true`` (entered, then resend), with their
    email, whichever path made it."""
    assert set(got.sent.index) == want.entered | want.resend
    assert list(got.sent.index) == [*got.entered, *got.resend]
    for user_id in got.sent.index:
        email = got.sent.at[user_id, "email"]
        assert (None if pd.isna(email) else email) == want.emails[user_id]


@pytest.fixture
def sandbox(state_url: str) -> Iterator[tuple[StateStore, int, str]]:
    engine = connect(state_url)
    upgrade(engine)
    store = StateStore(engine)
    ref = store.audience("jsonl", "diff_paths", "Diff paths")
    yield store, ref.id, state_url
    engine.dispose()


_example = count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=_rows, state=st.sets(_ids, max_size=15), full=st.booleans())
# Found by hypothesis on PostgreSQL: a member whose only row is rejected (a control character)
# exits; the pushed-down diff had counted the rejected row as the member's.
@example(rows=[("0\n0 ", None)], state={"0\n0"}, full=False)
def test_in_memory_and_pushed_down_diffs_agree(
    sandbox: tuple[StateStore, int, str],
    rows: list[tuple[str | None, str | None]],
    state: set[str],
    full: bool,
) -> None:
    store, audience_id, url = sandbox
    table = f"src_{next(_example)}"
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM sync_members WHERE audience_id = :a"), {"a": audience_id})
        add_members(conn, [(audience_id, sorted(state))])
        conn.execute(sa.text(f"CREATE TABLE {table} (user_id TEXT, email TEXT)"))
        if rows:
            conn.execute(
                sa.text(f"INSERT INTO {table} VALUES (:u, :e)"),
                [{"u": u, "e": e} for u, e in rows],
            )
    want = expected(rows, state, full)
    audience = AudienceConfig(
        name="Diff paths", query=f"SELECT user_id, email FROM {table}", source_url=url
    )
    assert applies(audience, store.engine)

    # In memory: the query's rows pulled into pandas, the state read in bulk, DuckDB's diff.
    synced = store.members(audience_id)
    assert set(synced) == state  # the bulk read round-trips every id
    snapshot = validate(read_query(url, audience.query or ""), "test")
    memory = plan(snapshot.members, synced, full=full, held=snapshot.held)

    # Pushed down: the same diff as SQL inside the state database.
    pushed_snapshot, pushed = plan_in_database(store.engine, audience, audience_id, full=full)

    # The engine's path for a file: read and validated once (repeated ids too), diffed once.
    with tempfile.TemporaryDirectory() as folder:
        parquet = Path(folder) / "snapshot.parquet"
        columns = {"user_id": [u for u, _ in rows], "email": [e for _, e in rows]}
        pq.write_table(pa.table(columns, schema=_SCHEMA), parquet)
        engine_snapshot, engine_plan = load_and_plan(
            AudienceConfig(name="Diff paths", source=parquet), store, audience_id, full=full
        )

    assert_plans(want, memory, snapshot, len(rows))
    assert_plans(want, pushed, pushed_snapshot, len(rows))
    assert_plans(want, engine_plan, engine_snapshot, len(rows), held_exits=want.rejected > 0)
    for got in (memory, pushed, engine_plan):
        assert_sends(want, got)
    # Planned either way, the snapshot means the same: no member rows (the plan has those sent).
    assert len(pushed_snapshot.members) == len(engine_snapshot.members) == 0
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {table}"))


@settings(max_examples=40, deadline=None)
@given(rows=_rows, state=st.sets(_ids, max_size=15), full=st.booleans())
def test_pushed_down_diff_on_duckdb(
    rows: list[tuple[str | None, str | None]], state: set[str], full: bool
) -> None:
    """The portable SQL layer on DuckDB, on the cases above: the state schema does not run there
    (Alembic has no DuckDB dialect), so only ``sync_members`` is created, from ``state.schema``."""
    engine = sa.create_engine("duckdb:///:memory:")
    with engine.connect() as conn:
        sync_members.create(conn)
        if state:
            conn.execute(sync_members.insert(), [{"audience_id": 7, "user_id": u} for u in state])
        conn.execute(sa.text("CREATE TABLE src (user_id TEXT, email TEXT)"))
        if rows:
            conn.execute(
                sa.text("INSERT INTO src VALUES (:u, :e)"), [{"u": u, "e": e} for u, e in rows]
            )
        query = "SELECT user_id, email FROM src -- a trailing comment;"
        snap, got = plan_on_connection(conn, query, 7, full=full, where="duckdb")
    engine.dispose()
    want = expected(rows, state, full)
    assert_plans(want, got, snap, len(rows))
    assert_sends(want, got)


@settings(max_examples=200, deadline=None)
@given(
    members=st.sets(_ids, max_size=40),
    state=st.sets(_ids, max_size=40),
    held=st.sets(_ids, max_size=5),
    full=st.booleans(),
)
def test_plan_matches_set_model(
    members: set[str], state: set[str], held: set[str], full: bool
) -> None:
    members -= held  # a held user has no member row
    as_index = lambda ids: pd.Index(sorted(ids), dtype="string[pyarrow]", name="user_id")  # noqa: E731
    got = plan(as_index(members), as_index(state), full=full, held=held)
    assert set(got.entered) == members - state
    assert set(got.exited) == state - members - held
    assert set(got.resend) == (members & state if full else set())
    assert got.unchanged == len(state) - len(state - members - held)
    # Input order is kept: the plan is deterministic, whatever order DuckDB joins in.
    assert list(got.entered) == sorted(members - state)
    assert list(got.exited) == sorted(state - members - held)


def test_pushdown_only_for_the_state_database(tmp_path: pytest.TempPathFactory) -> None:
    engine = connect(f"sqlite:///{tmp_path}/state.db")
    same = AudienceConfig(name="A", query="select 1", source_url=f"sqlite:///{tmp_path}/state.db")
    other = AudienceConfig(name="A", query="select 1", source_url=f"sqlite:///{tmp_path}/other.db")
    assert applies(same, engine)
    assert not applies(other, engine)
    assert not applies(AudienceConfig(name="A", source=tmp_path / "a.csv"), engine)
    engine.dispose()


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("SELECT user_id FROM no_such_table", r"query for 'Broken' on .* failed: .*no_such_table"),
        ("SELECT 'a' AS id, 'b' AS email", r"query for 'Broken': no `user_id` column"),
        ("SELECT 'a' AS user_id, 'b' AS \"user_id \"", r"duplicate column names \['user_id'\]"),
    ],
)
def test_a_pushed_down_query_that_cannot_be_diffed_names_itself(
    sandbox: tuple[StateStore, int, str], query: str, error: str
) -> None:
    store, audience_id, url = sandbox
    audience = AudienceConfig(name="Broken", query=query, source_url=url)
    with pytest.raises(SnapshotError, match=error):
        plan_in_database(store.engine, audience, audience_id, full=False)
    # The connection is usable again: the next diff starts from a clean temporary table.
    fine = AudienceConfig(name="Fine", query="SELECT 'u1' AS user_id", source_url=url)
    _, the_plan = plan_in_database(store.engine, fine, audience_id, full=False)
    assert list(the_plan.entered) == ["u1"]
