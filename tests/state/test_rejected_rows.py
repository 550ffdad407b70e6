"""Issue 13, item 2: rejected snapshot rows are stored with their run and found again later
(``history RUN_ID``, ``history --rejected``), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli, write_config

from audience_sync import load_config, sync
from audience_sync.state import StateStore, connect
from audience_sync.state.runs import MAX_STORED_ROWS


def test_rejected_rows_are_stored_and_listed_by_history(tmp_path: Path, state_url: str) -> None:
    (tmp_path / "vip.csv").write_text(
        "user_id,email\nu1,a@x\n,b@x\nu2,c@x\nu3,d@x\nu3,e@x\nu\x004,f@x\n"
    )
    (tmp_path / "all.csv").write_text("user_id\nu1\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[
            {"name": "VIP", "source": "vip.csv"},
            {"name": "All", "source": "all.csv"},
        ],
    )
    result = sync(load_config(config))
    assert result.exit_code == 4
    run_id = result.audiences[0].run_id
    assert run_id is not None

    engine = connect(state_url)
    try:
        stored = StateStore(engine).rejected_rows(run_id=run_id)
        assert StateStore(engine).rejected_rows(run_id=result.audiences[1].run_id) == []
    finally:
        engine.dispose()
    assert [(r["row_number"], r["user_id"], r["audience_key"]) for r in stored] == [
        (2, None, "vip"),
        (4, "u3", "vip"),
        (5, "u3", "vip"),
        (6, "u\\x004", "vip"),
    ]
    assert "empty user_id" in stored[0]["reason"]
    assert "conflicting duplicate" in stored[1]["reason"]
    assert "control character" in stored[3]["reason"]
    assert all(r["at"] is not None and r["rejected_rows"] == 4 for r in stored)

    shown = cli("history", str(run_id), "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "Rejected snapshot rows" in shown.stdout
    assert "u\\x004" in shown.stdout and "conflicting duplicate" in shown.stdout

    listed = cli("history", "--rejected", "--audience", "VIP", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["run_id"], r["row_number"]) for r in json.loads(listed.stdout)] == [
        (run_id, 2),
        (run_id, 4),
        (run_id, 5),
        (run_id, 6),
    ]
    other = cli("history", "--rejected", "--audience", "All", "--config", str(config), "--json")
    assert json.loads(other.stdout) == []
    # Another destination's history holds none of these rows.
    elsewhere = cli(
        "history", "--rejected", "--destination", "crisp:w9", "--config", str(config), "--json"
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert json.loads(elsewhere.stdout) == []


def test_a_run_stores_the_first_rows_counts_all_and_points_to_them(
    tmp_path: Path, state_url: str
) -> None:
    total = MAX_STORED_ROWS + 200
    (tmp_path / "vip.csv").write_text("user_id,email\n" + ",x@y\n" * total + "u1,a@x\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    run = cli("run", "--config", str(config))
    assert run.returncode == 4, run.stderr
    engine = connect(state_url)
    try:
        store = StateStore(engine)
        (last,) = store.runs()
        stored = store.rejected_rows(run_id=last["id"], limit=10 * total)
    finally:
        engine.dispose()
    assert last["rejected_rows"] == total
    assert [r["row_number"] for r in stored] == list(range(1, MAX_STORED_ROWS + 1))
    assert f"... and {total - 10} more rejected rows: `audience-sync history {last['id']}`" in (
        run.stdout
    )
    assert f"the first {MAX_STORED_ROWS:,} are kept" in run.stdout
    assert f"see `audience-sync history {last['id']}`" in (last["error"] or "")
