"""The bulk member reads: ADBC (PostgreSQL) and the drivers' own paths return the same ids."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from audience_sync.state import StateStore, connect, upgrade
from audience_sync.state.bulk import (
    _MEDIAN_USER_ID,
    ChangeRows,
    add_members,
    log_changes,
    read_members,
    read_members_arrow,
)

AWKWARD = ["plain", "com,ma", 'quo"te', "new\nline", "tab\tbed", "back\\slash", "é ü 漢", "  pad "]


def test_every_read_path_round_trips_awkward_ids(state_url: str) -> None:
    engine = connect(state_url)
    upgrade(engine)
    store = StateStore(engine)
    ref = store.audience("jsonl", "bulk", "Bulk")
    other = store.audience("jsonl", "other", "Other")
    with engine.begin() as conn:
        add_members(conn, [(ref.id, AWKWARD)])
        # The other audience shares the ids (so the median id PostgreSQL's statistics give is one
        # of them) and has one of its own.
        add_members(conn, [(other.id, [*AWKWARD, "not-this-audience"])])
    with engine.connect() as conn:
        by_driver = read_members(conn, ref.id).to_pylist()
    arrow = read_members_arrow(engine.url, ref.id)
    assert sorted(by_driver) == sorted(AWKWARD)
    if engine.dialect.name == "postgresql":
        assert arrow is not None, "ADBC should read PostgreSQL members"
        assert sorted(arrow.to_pylist()) == sorted(AWKWARD)
    else:
        assert arrow is None  # SQLite reads through its own driver
    assert sorted(store.members(ref.id)) == sorted(AWKWARD)
    empty = store.audience("jsonl", "empty", "Empty")
    with engine.connect() as conn:
        nothing = read_members(conn, empty.id)
    assert nothing.type == pa.large_string() and len(nothing) == 0
    if engine.dialect.name == "postgresql":
        # With statistics, ADBC reads two halves split at the median id, on two connections.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE sync_members"))
            middle = conn.execute(sa.text(_MEDIAN_USER_ID)).scalar_one()
        assert middle in AWKWARD  # the split path is the one taken, at one of the ids
        split = read_members_arrow(engine.url, ref.id)
        assert split is not None and sorted(split.to_pylist()) == sorted(AWKWARD)
    engine.dispose()


def test_a_failed_adbc_read_falls_back_and_never_logs_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = sa.make_url("postgresql+psycopg://sync:s3cret-pw@127.0.0.1:1/state")
    with caplog.at_level(logging.WARNING):
        assert read_members_arrow(url, 1) is None
    assert "using psycopg instead" in caplog.text
    assert "127.0.0.1" in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_the_change_log_round_trips_awkward_ids_reasons_and_nulls(state_url: str) -> None:
    engine = connect(state_url)
    upgrade(engine)
    store = StateStore(engine)
    ref = store.audience("jsonl", "bulk", "Bulk")
    run_id = store.start_run(ref, mode="initial", trigger="manual")
    at = datetime(2026, 11, 25, 12, 30, tzinfo=UTC)
    changes = ChangeRows(run_id, "bulk")
    reasons = ['a "quoted", reason', "", None] * 3
    for i, (u, r) in enumerate(zip(AWKWARD, reasons, strict=False)):
        changes.append(u, i % 2 == 0, "failed", r)
    changes.extend(["delivered-1", "cr\r, lf\n"], [True, False], "delivered")
    with engine.begin() as conn:
        log_changes(conn, at, [changes, ChangeRows(run_id, "nothing")])
        add_members(conn, [(ref.id, AWKWARD)])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT run_id, user_id, value, outcome, reason, at FROM sync_changes")
        ).all()
    engine.dispose()
    got = sorted((r.user_id, r.value, r.reason, r.run_id, r.outcome) for r in rows)
    want = sorted(
        zip(
            changes.user_ids,
            changes.values,
            changes.reasons,
            [run_id] * len(changes),
            changes.outcomes,
            strict=True,
        )
    )
    assert got == want  # an empty reason stays empty, a missing one stays NULL
    stamps = {pd.Timestamp(r.at) for r in rows}  # SQLite returns text, naive UTC
    assert {t.tz_convert(UTC) if t.tzinfo else t.tz_localize(UTC) for t in stamps} == {at}
