"""``history RUN_ID``, ``history prune`` and ``status``, through the real CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from conftest import cli, execute, write_config, write_csv

from audience_sync.config import load_config
from audience_sync.errors import ExitCode
from audience_sync.history import status


def scalar(url: str, sql: str) -> object:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(sa.text(sql)).scalar()
    engine.dispose()
    return value


def setup(tmp_path: Path, state_url: str, **audience: object) -> Path:
    write_csv(tmp_path / "a.csv", "user_id,email\nu1,a@x.io\nu2,b@x.io\nu3,c@x.io\n")
    return write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "Aud A", "source": "a.csv", **audience}],
    )


def test_history_run_id_shows_one_run_with_error_samples(tmp_path: Path, state_url: str) -> None:
    config = setup(tmp_path, state_url)
    assert cli("run", "--config", str(config)).returncode == 0
    # A change log with failures, as a destination that refused two users would leave it.
    for user, reason in (("u8", "invalid email"), ("u9", "invalid email")):
        execute(
            state_url,
            "insert into sync_changes (run_id, user_id, trait_key, value, outcome, reason, at) "
            "values (1, :u, 'aud_a', true, 'failed', :r, :at)",
            u=user,
            r=reason,
            at=datetime.now(UTC),
        )
    shown = cli("history", "--config", str(config), "1")
    assert shown.returncode == 0, shown.stderr
    assert "Run 1" in shown.stdout
    assert "change log: 3 delivered, 2 failed" in shown.stdout
    assert "invalid email" in shown.stdout
    assert "u8" in shown.stdout
    as_json = json.loads(cli("history", "1", "--json", "--config", str(config)).stdout)
    assert as_json["reasons"] == [{"outcome": "failed", "reason": "invalid email", "users": 2}]
    assert as_json["run"]["delivered"] == 3
    missing = cli("history", "--config", str(config), "99")
    assert missing.returncode == 2  # what the command line names does not exist; 1 is for bugs
    assert "no run 99" in missing.stderr
    assert "`audience-sync history` lists the recent runs" in missing.stderr


def test_prune_deletes_old_runs_and_changes_but_keeps_the_latest(
    tmp_path: Path, state_url: str
) -> None:
    config = setup(tmp_path, state_url)
    for _ in range(2):
        assert cli("run", "--config", str(config)).returncode == 0
    write_csv(tmp_path / "a.csv", "user_id\n")
    assert cli("run", "--config", str(config)).returncode == 4  # refused: run 3 failed
    old = datetime.now(UTC) - timedelta(days=100)
    execute(state_url, "update sync_runs set started_at = :t, finished_at = :t", t=old)
    execute(state_url, "update sync_changes set at = :t", t=old)
    dry = cli("history", "--config", str(config), "prune", "--older-than", "90d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 3 change-log rows and 1 runs" in dry.stdout
    done = cli("history", "prune", "--older-than", "90d", "--config", str(config))
    assert "deleted 3 change-log rows and 1 runs" in done.stdout
    # Kept: run 3 (the latest) and run 2 (the latest that succeeded).
    assert scalar(state_url, "select count(*) from sync_runs") == 2
    assert scalar(state_url, "select min(id) from sync_runs") == 2
    bad = cli("history", "prune", "--older-than", "ninety days", "--config", str(config))
    assert bad.returncode == 2
    assert "is not a duration" in bad.stderr


def test_status_exit_codes(tmp_path: Path, state_url: str) -> None:
    config = setup(tmp_path, state_url, interval="1h")
    never = cli("status", "--config", str(config))
    assert never.returncode == 0, never.stdout + never.stderr
    assert "never" in never.stdout

    assert cli("run", "--config", str(config)).returncode == 0
    ok = cli("status", "--config", str(config))
    assert ok.returncode == 0, ok.stdout
    assert "every 1h" in ok.stdout
    assert "succeeded" in ok.stdout

    # A wiped snapshot makes the last run fail.
    write_csv(tmp_path / "a.csv", "user_id\n")
    assert cli("run", "--config", str(config)).returncode == 4
    failed = cli("status", "--config", str(config))
    assert failed.returncode == ExitCode.UNHEALTHY
    assert "last run 2 failed" in failed.stdout
    assert "UNHEALTHY" in failed.stdout

    # Back to healthy, then overdue: the last run started 3 hours ago for an hourly audience.
    write_csv(tmp_path / "a.csv", "user_id,email\nu1,a@x.io\nu2,b@x.io\nu3,c@x.io\n")
    assert cli("run", "--config", str(config)).returncode == 0
    assert cli("status", "--config", str(config)).returncode == 0
    three_hours_ago = datetime.now(UTC) - timedelta(hours=3)
    execute(state_url, "update sync_runs set started_at = :t", t=three_hours_ago)
    overdue = cli("status", "--config", str(config), "--json")
    assert overdue.returncode == ExitCode.UNHEALTHY
    report = json.loads(overdue.stdout)
    (entry,) = report["audiences"]
    assert entry["problems"][0].startswith("overdue: a run was due at")
    assert entry["retry_waiting"] == 0


def test_status_library_counts_the_retry_queue_and_a_run_in_progress(
    tmp_path: Path, state_url: str
) -> None:
    config_path = setup(tmp_path, state_url, schedule="0 * * * *")
    assert cli("run", "--config", str(config_path)).returncode == 0
    now = datetime.now(UTC)
    execute(
        state_url,
        "insert into sync_pending (audience_id, user_id, value, status, reason, retryable, "
        "input_hash, message_id, attempts, first_run_id, last_run_id, first_at, last_at) "
        "values (1, 'u7', true, 'failed', 'HTTP 503', true, 'h', 'm', 1, 1, 1, :t, :t)",
        t=now,
    )
    execute(
        state_url,
        "insert into sync_locks (audience_id, run_id, holder, acquired_at, expires_at) "
        "values (1, 2, 'otherhost:42', :t, :e)",
        t=now,
        e=now + timedelta(minutes=1),
    )
    engine = sa.create_engine(state_url)
    try:
        report = status(load_config(config_path), engine, now=now + timedelta(hours=5))
    finally:
        engine.dispose()
    (entry,) = report.audiences
    assert entry.retry_waiting == 1
    assert entry.running_holder is None  # the lease had expired by then
    assert not entry.healthy  # and hours of runs were missed
    engine = sa.create_engine(state_url)
    try:
        report = status(load_config(config_path), engine, now=now)
    finally:
        engine.dispose()
    (entry,) = report.audiences
    assert entry.running_holder == "otherhost:42"
    assert entry.healthy
    assert entry.next_run is not None and entry.next_run.minute == 0


def test_history_shows_the_configs_destination_unless_told_otherwise(
    tmp_path: Path, state_url: str
) -> None:
    """13.11: two destinations share a state database; `history` no longer mixes them."""
    write_csv(tmp_path / "a.csv", "user_id\nu1\nu2\n")
    configs = {
        name: write_config(
            tmp_path / f"{name}.toml",
            state_url=state_url,
            destination={"type": "jsonl", "name": name, "path": f"{name}.jsonl"},
            audiences=[{"name": "A", "source": "a.csv"}],
        )
        for name in ("first", "second")
    }
    assert cli("run", "--config", str(configs["first"])).returncode == 0
    assert cli("run", "--config", str(configs["second"])).returncode == 0
    assert cli("run", "--config", str(configs["second"])).returncode == 0

    def destinations(*args: str) -> list[str]:
        shown = cli("history", *args, "--json")
        assert shown.returncode == 0, shown.stderr
        return [r["destination"] for r in json.loads(shown.stdout)]

    assert destinations("--config", str(configs["first"])) == ["first"]
    assert destinations("--config", str(configs["second"])) == ["second", "second"]
    assert destinations("--config", str(configs["first"]), "--destination", "second") == [
        "second",
        "second",
    ]
    assert sorted(destinations("--url", state_url)) == ["first", "second", "second"]
    changes = cli("history", "--config", str(configs["first"]), "--user", "u1", "--json")
    assert [r["destination"] for r in json.loads(changes.stdout)] == ["first"]
