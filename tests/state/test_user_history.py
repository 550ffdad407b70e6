"""A user's change log (``StateStore.user_changes``) on the log's one index, by (run_id, user_id)
(migration 0013): the rows a brute-force filter of the log gives, and found through the index
rather than by scanning the log, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience_sync.state import StateStore, connect, upgrade
from audience_sync.state.schema import sync_audiences, sync_changes, sync_runs

USERS = ("u1", "u2", "ü 3", "u1 ")  # a trailing space is another user
DESTINATIONS = ("jsonl", "crisp")
AT = datetime(2026, 12, 3, tzinfo=UTC)


def _fill(conn: sa.Connection, runs: list[str], changes: list[tuple[int, str, bool]]) -> None:
    """Runs by destination, and change rows ``(run index, user, value)`` in log order."""
    for table in (sync_changes, sync_runs, sync_audiences):
        conn.execute(table.delete())
    conn.execute(
        sa.insert(sync_audiences),
        [
            {
                "id": i + 1,
                "destination": d,
                "audience_key": "vip",
                "audience_name": "VIP",
                "created_at": AT,
            }
            for i, d in enumerate(DESTINATIONS)
        ],
    )
    if runs:
        conn.execute(
            sa.insert(sync_runs),
            [
                {
                    "id": i + 1,
                    "audience_id": DESTINATIONS.index(d) + 1,
                    "destination": d,
                    "audience_key": "vip",
                    "audience_name": "VIP",
                    "mode": "incremental",
                    "trigger": "manual",
                    "status": "succeeded",
                    "started_at": AT,
                }
                for i, d in enumerate(runs)
            ],
        )
    if changes:
        conn.execute(
            sa.insert(sync_changes),
            [
                {
                    "id": n + 1,
                    "run_id": run + 1,
                    "user_id": user,
                    "trait_key": "vip",
                    "value": value,
                    "outcome": "delivered",
                    "at": AT,
                }
                for n, (run, user, value) in enumerate(changes)
            ],
        )


logs = st.lists(st.sampled_from(DESTINATIONS), min_size=1, max_size=6).flatmap(
    lambda runs: st.tuples(
        st.just(runs),
        st.lists(
            st.tuples(st.integers(0, len(runs) - 1), st.sampled_from(USERS), st.booleans()),
            max_size=30,
        ),
    )
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    log=logs,
    user=st.sampled_from(USERS),
    destination=st.sampled_from((None, *DESTINATIONS)),
    limit=st.integers(1, 12),
)
def test_a_users_history_is_their_rows_of_the_log_newest_first(
    state_url: str,
    log: tuple[list[str], list[tuple[int, str, bool]]],
    user: str,
    destination: str | None,
    limit: int,
):
    runs, changes = log
    engine = connect(state_url)
    upgrade(engine)
    with engine.begin() as conn:
        _fill(conn, runs, changes)
    found = StateStore(engine).user_changes(user, destination=destination, limit=limit)
    engine.dispose()
    expected = [
        (n + 1, run + 1, value, runs[run])
        for n, (run, who, value) in enumerate(changes)
        if who == user and destination in (None, runs[run])
    ][::-1][:limit]
    assert [(r["id"], r["run_id"], r["value"], r["destination"]) for r in found] == expected
    assert all(r["user_id"] == user and r["audience_name"] == "VIP" for r in found)


def test_a_users_history_is_found_through_the_index_not_by_scanning_the_log(state_url: str):
    """With 60,000 logged rows over 20 runs (PostgreSQL with the statistics autovacuum would
    keep, SQLite without any, as a state has), the lookup searches the (run_id, user_id)
    index: it never reads the whole log."""
    engine = connect(state_url)
    upgrade(engine)
    with engine.begin() as conn:
        _fill(conn, ["jsonl"] * 20, [])
        # Rows made by the database itself: 60,000 inserts from Python would dominate the test.
        numbers = (
            # SQLite's generate_series is an extension: count with a recursive query instead.
            "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < 60000) "
            "SELECT g FROM n"
            if engine.dialect.name == "sqlite"
            else "SELECT g FROM generate_series(1, 60000) g"
        )
        conn.execute(
            sa.text(
                "INSERT INTO sync_changes (run_id, user_id, trait_key, value, outcome, at) "
                "SELECT 1 + g % 20, 'u' || g, 'vip', TRUE, 'delivered', CURRENT_TIMESTAMP "
                f"FROM ({numbers}) AS numbers"
            )
        )
        if engine.dialect.name == "postgresql":  # autovacuum's statistics (SQLite keeps none)
            conn.execute(sa.text("ANALYZE"))
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))  # also the connection's set-up

    store = StateStore(engine)
    sa.event.listen(engine, "before_cursor_execute", capture)
    rows = store.user_changes("u4242")
    sa.event.remove(engine, "before_cursor_execute", capture)
    assert [(r["user_id"], r["run_id"]) for r in rows] == [("u4242", 1 + 4242 % 20)]
    [(statement, parameters)] = [(s, p) for s, p in statements if "sync_changes" in s]
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        cursor.execute(explain + statement, parameters)
        plan = "\n".join(" ".join(str(v) for v in row) for row in cursor.fetchall())
    engine.dispose()
    assert "ix_sync_changes_run_user" in plan, plan
    if engine.dialect.name == "sqlite":
        assert "SCAN sync_changes" not in plan, plan
    else:
        assert "Seq Scan on sync_changes" not in plan, plan
