"""The real `audience-sync` command, as a subprocess: the bundled example and broken input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, cli, kill_when_written, read_jsonl, write_config, write_csv

EXAMPLE = REPO / "config"


@pytest.fixture
def example(tmp_path: Path, state_url: str) -> Path:
    """A copy of the bundled example config, its day-1 snapshots current, state at ``state_url``."""
    shutil.copytree(EXAMPLE, tmp_path / "config")
    for f in (tmp_path / "config/examples/day1").iterdir():
        shutil.copy(f, tmp_path / "config/examples/current" / f.name)
    config = tmp_path / "config/audience-sync.toml"
    example_url = 'url = "sqlite:///../audience_sync.db"'
    text = config.read_text().replace(example_url, f'url = "{state_url}"')
    assert state_url in text
    config.write_text(text)
    return config


def test_example_day1_then_day2_sends_only_changes(example: Path):
    out = example.parent.parent / "out/identify.jsonl"
    first = cli("run", "--config", str(example))
    assert first.returncode == 0, first.stderr
    assert "Order Completed Last 30days" in first.stdout
    day1 = read_jsonl(out)
    memberships = [m for m in day1 if "lifetime_value" not in m["traits"]]
    assert len(memberships) == 8  # 5 + 3 members, every one `true`
    assert all(True in m["traits"].values() for m in memberships)
    # The computed trait: every user with a value is sent it.
    assert {m["userId"]: m["traits"]["lifetime_value"] for m in day1 if m not in memberships} == {
        "007": 523.4,
        "u-1002": 112,
        "u-1003": 89.9,
        "u-1005": 12,
    }

    again = cli("run", "--config", str(example))
    assert again.returncode == 0
    assert len(read_jsonl(out)) == 12

    for f in (example.parent / "examples/day2").iterdir():
        shutil.copy(f, example.parent / "examples/current" / f.name)
    day2 = cli("run", "--config", str(example), "--json")
    assert day2.returncode == 0, day2.stderr
    report = json.loads(day2.stdout)
    assert [(a["key"], a["entered"], a["exited"], a["delivered"]) for a in report["audiences"]] == [
        ("order_completed_last_30days", 1, 1, 2),
        ("high_value_customers", 1, 1, 2),
        ("lifetime_value", 2, 1, 3),
    ]
    sent = sorted(
        (m["userId"], k, v)
        for m in read_jsonl(out)[12:]
        for k, v in m["traits"].items()
        if k not in ("email", "name", "phone")
    )
    # u-1002's value is spelt 112.0 on day 2: the same number, not sent again.
    assert sent == [
        ("007", "lifetime_value", 600),
        ("u-1002", "order_completed_last_30days", False),
        ("u-1003", "high_value_customers", False),
        ("u-1003", "lifetime_value", None),
        ("u-1007", "high_value_customers", True),
        ("u-1007", "lifetime_value", 42.5),
        ("u-1007", "order_completed_last_30days", True),
    ]

    history = cli("history", "--config", str(example), "--json")
    assert history.returncode == 0
    rows = json.loads(history.stdout)
    assert [
        (r["audience_key"], r["mode"], r["status"], r["entered"], r["exited"]) for r in rows
    ] == [
        ("lifetime_value", "incremental", "succeeded", 2, 1),
        ("high_value_customers", "incremental", "succeeded", 1, 1),
        ("order_completed_last_30days", "incremental", "succeeded", 1, 1),
        ("lifetime_value", "incremental", "succeeded", 0, 0),
        ("high_value_customers", "incremental", "succeeded", 0, 0),
        ("order_completed_last_30days", "incremental", "succeeded", 0, 0),
        ("lifetime_value", "initial", "succeeded", 4, 0),
        ("high_value_customers", "initial", "succeeded", 3, 0),
        ("order_completed_last_30days", "initial", "succeeded", 5, 0),
    ]
    table = cli(
        "history", "--config", str(example), "--audience", "High Value Customers", "--limit", "1"
    )
    assert "High Value Customers" in table.stdout and "Order Completed" not in table.stdout
    assert "succeeded" in table.stdout


def test_dry_run_prints_the_plan_and_sends_nothing(example: Path):
    result = cli("run", "--config", str(example), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    assert 'would send {"user_id": "007", "order_completed_last_30days": true}' in result.stdout
    assert not (example.parent.parent / "out/identify.jsonl").exists()


def test_key_command():
    assert cli("key", "Order Completed Last 30days").stdout.strip() == "order_completed_last_30days"
    cafe = cli("key", "Café Visitors")
    assert cafe.stdout.strip() == "caf_visitors"
    assert "non-ASCII" in cafe.stderr
    party = cli("key", "🎉")
    assert party.returncode == 2
    assert "explicit `key`" in party.stderr


def test_db_upgrade_creates_the_tables(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = cli("db", "upgrade", "--url", url)
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(url)
    assert {"sync_runs", "sync_members", "sync_pending", "sync_changes", "sync_locks"} <= set(
        sa.inspect(engine).get_table_names()
    )
    engine.dispose()


def test_config_error_exit_code_names_file_and_key(tmp_path: Path):
    write_csv(tmp_path / "a.csv", "user_id\n1\n")
    path = write_config(
        tmp_path / "bad.toml",
        state_url=f"sqlite:///{tmp_path / 's.db'}",
        audiences=[{"name": "A", "source": "a.csv", "schedule": "every tuesday"}],
    )
    result = cli("run", "--config", str(path))
    assert result.returncode == 3
    assert f"{path}: audiences[0].schedule (audience 'A'):" in result.stderr
    assert "not a valid cron expression" in result.stderr
    assert not (tmp_path / "s.db").exists()
    missing = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 3 and "config file not found" in missing.stderr


def test_snapshot_error_exit_code(tmp_path: Path, state_url: str):
    write_csv(tmp_path / "a.csv", "id,email\n1,a@b.c\n")
    path = write_config(
        tmp_path / "c.toml", state_url=state_url, audiences=[{"name": "A", "source": "a.csv"}]
    )
    result = cli("run", "--config", str(path))
    assert result.returncode == 4
    assert "no `user_id` column (columns found: 'id', 'email')" in result.stdout


def test_kill_9_mid_run_loses_nothing(tmp_path: Path, state_url: str):
    """SIGKILL while the file is being written: the next run completes the audience; users are
    re-sent only within the last uncommitted window (at-least-once), none is missing."""
    users = [f"user-{i:06d}" for i in range(60_000)]
    write_csv(tmp_path / "big.csv", "user_id\n" + "\n".join(users) + "\n")
    out = tmp_path / "out.jsonl"
    path = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "Big", "source": "big.csv"}],
        destination={"type": "jsonl", "path": "out.jsonl", "flush_every": 20},
    )
    # The kill may cut the last line short; the next run drops that unconfirmed fragment.
    killed_at = kill_when_written(path, out)
    assert 0 < killed_at < len(users), "the kill should land mid-run"
    killed = json.loads(cli("history", "--config", str(path), "--json").stdout)[0]
    assert killed["status"] == "running"
    # The row of a killed run adds up (issue 15.5): committed outcomes moved out of pending.
    assert killed["delivered"] > 0
    assert sum(killed[c] for c in ("delivered", "failed", "skipped", "pending")) == len(users)

    finish = cli("run", "--config", str(path), "--json", timeout=900)  # 3,000 commits
    assert finish.returncode == 0, finish.stderr
    sent = [m["userId"] for m in read_jsonl(out)]
    assert set(sent) == set(users)
    duplicates = len(sent) - len(set(sent))
    assert duplicates <= 1000 + 20  # at most one uncommitted window is re-sent
    report = json.loads(finish.stdout)["audiences"][0]
    assert report["entered"] == len(users) - (killed_at - duplicates)
    history = json.loads(cli("history", "--config", str(path), "--json").stdout)
    assert [r["status"] for r in history] == ["succeeded", "interrupted"]
    interrupted = history[1]
    assert (
        sum(interrupted[c] for c in ("delivered", "failed", "skipped", "pending"))
        == (interrupted["entered"])
    )
    # What the interrupted run left pending is exactly what the next run had to send.
    assert interrupted["pending"] == report["entered"] == report["delivered"]
