"""End to end: the real ``audience-sync`` command against the loopback Crisp server.

Each test runs the installed console script in a subprocess (real process, real sockets, real
state database on SQLite and PostgreSQL), including a kill in the middle of a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import (
    CRISP_IDENTIFIER,
    CRISP_KEY,
    cli,
    crisp_destination,
    crisp_env,
    query,
    runs,
    write_config,
)
from crisp_server import CrispServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def users(n: int, start: int = 0, email: bool = True) -> list[str]:
    return [f"u{i:03},{f'u{i:03}@example.com' if email else ''}" for i in range(start, start + n)]


def snapshot(path: Path, rows: list[str]) -> None:
    path.write_text("\n".join(["user_id,email", *rows]) + "\n")


def setup(tmp_path: Path, state_url: str, crisp: CrispServer, **options: Any) -> Path:
    snapshot(tmp_path / "vip.csv", [])
    snapshot(tmp_path / "churn.csv", [])
    return write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        destination=crisp_destination(crisp, **options),
        audiences=[
            {"name": "VIP Users", "source": "vip.csv"},
            {"name": "Churn Risk", "source": "churn.csv"},
        ],
    )


def data(crisp: CrispServer, email: str) -> dict[str, Any]:
    profile = crisp.profile_by_email(email)
    assert profile is not None, email
    return dict(profile["data"])


def run(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cli("run", "--config", str(config), *args, env=env or crisp_env())


def test_initial_incremental_and_exits(tmp_path: Path, state_url: str, crisp: CrispServer) -> None:
    config = setup(tmp_path, state_url, crisp)
    snapshot(tmp_path / "vip.csv", users(8))
    snapshot(tmp_path / "churn.csv", users(4, start=6))
    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout and "crisp:website-1" in done.stdout
    assert crisp.count() == 10 * 2  # 10 new users: create + one data update each
    assert data(crisp, "u007@example.com") == {"vip_users": True, "churn_risk": True}

    # day 2: u006, u007 leave VIP (u007 also leaves Churn Risk); u008 enters VIP
    crisp.reset_counts()
    snapshot(tmp_path / "vip.csv", users(6) + users(1, start=8))
    snapshot(tmp_path / "churn.csv", users(2, start=8) + users(1, start=6))
    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert crisp.count("PATCH", "/people/data/") == 3 and crisp.count() == 3
    assert data(crisp, "u006@example.com") == {"vip_users": False, "churn_risk": True}
    assert data(crisp, "u007@example.com") == {"vip_users": False, "churn_risk": False}
    assert data(crisp, "u008@example.com") == {"vip_users": True, "churn_risk": True}

    shown = cli("history", "--config", str(config), "--json")
    assert shown.returncode == 0
    history = json.loads(shown.stdout)
    assert [(h["audience_key"], h["mode"], h["status"]) for h in history[:2]] == [
        ("churn_risk", "incremental", "succeeded"),
        ("vip_users", "incremental", "succeeded"),
    ]
    assert history[1]["entered"] == 1 and history[1]["exited"] == 2


def test_no_email_users_are_skipped_then_synced_once_an_email_appears(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = setup(tmp_path, state_url, crisp)
    snapshot(tmp_path / "vip.csv", users(2) + users(2, start=2, email=False))
    done = run(config)
    assert done.returncode == 5, done.stdout + done.stderr  # partial
    assert "2 users skipped" in done.stdout
    failed = cli("history", "--config", str(config), "--failed", "--json")
    reasons = {(r["user_id"], r["status"], r["reason"]) for r in json.loads(failed.stdout)}
    assert reasons == {
        ("u002", "skipped", "email required to create a Crisp profile"),
        ("u003", "skipped", "email required to create a Crisp profile"),
    }
    snapshot(tmp_path / "vip.csv", users(4))
    crisp.reset_counts()
    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert crisp.count() == 4  # only the two new emails: create + data each
    assert data(crisp, "u003@example.com") == {"vip_users": True}


@pytest.mark.parametrize("email_as_people_id", [True, False])
def test_existing_crisp_profiles_are_resolved(
    tmp_path: Path, state_url: str, crisp: CrispServer, email_as_people_id: bool
) -> None:
    crisp.email_as_people_id = email_as_people_id
    crisp.add_profile("u001@example.com", data={"from_widget": "yes"})
    config = setup(tmp_path, state_url, crisp)
    snapshot(tmp_path / "vip.csv", users(3))
    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(crisp.profiles) == 3
    assert data(crisp, "u001@example.com") == {"from_widget": "yes", "vip_users": True}


def test_track_calls_and_unknown_users_dropped(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = setup(tmp_path, state_url, crisp)
    snapshot(tmp_path / "vip.csv", users(1))
    assert run(config).returncode == 0
    done = cli(
        "track",
        "--config",
        str(config),
        "--user-id",
        "u000",
        "--event",
        "Completed Purchase",
        "--properties",
        '{"revenue": 42.99}',
        env=crisp_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 delivered" in done.stdout
    profile = crisp.profile_by_email("u000@example.com")
    assert profile is not None
    assert [(e["text"], e["data"]) for e in profile["events"]] == [
        ("Completed Purchase", {"revenue": 42.99})
    ]

    calls = tmp_path / "calls.jsonl"
    messages = [
        {"type": "track", "userId": "stranger", "event": "Viewed Page"},
        {"type": "identify", "userId": "u500", "traits": {"email": "u500@example.com"}},
        {"type": "track", "userId": "u500", "event": "Signed Up", "properties": {"plan": "pro"}},
        {"type": "track", "userId": "ghost", "event": "Viewed Page"},
    ]
    calls.write_text("\n".join(json.dumps(m) for m in messages) + "\n")
    crisp.reset_counts()
    done = cli("track", "--config", str(config), "--file", str(calls), env=crisp_env())
    assert done.returncode == 5, done.stdout + done.stderr
    assert "2 delivered, 0 failed, 2 skipped" in done.stdout
    assert "2 x dropped: no known Crisp profile for this user" in done.stdout
    assert crisp.count() == 2  # create u500, its event; dropped calls cost nothing
    created = crisp.profile_by_email("u500@example.com")
    assert created is not None and [e["text"] for e in created["events"]] == ["Signed Up"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "track", "event": "X"}\n')
    before = crisp.count()
    done = cli("track", "--config", str(config), "--file", str(bad), env=crisp_env())
    # An anonymous call cannot reach Crisp: its line is reported and skipped (exit 5), as
    # Segment skips it, and costs no request.
    assert done.returncode == 5, done.stdout + done.stderr
    assert f"{bad}:1: skipped: `userId` is missing" in " ".join(done.stdout.split())
    assert crisp.count() == before


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_mid_run_then_the_next_run_completes_with_no_loss(
    tmp_path: Path, state_url: str, crisp: CrispServer, how: str
) -> None:
    crisp.latency = 0.05
    n, concurrency = 120, 4
    config = setup(tmp_path, state_url, crisp, max_concurrency=concurrency)
    snapshot(tmp_path / "vip.csv", users(n))
    snapshot(tmp_path / "churn.csv", users(n // 2))
    exe = str(Path(sys.executable).parent / "audience-sync")
    proc = subprocess.Popen(
        [exe, "run", "--config", str(config)],
        env={**os.environ, **crisp_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while crisp.count("PATCH", "/people/data/") < n // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(getattr(signal, how))
    proc.communicate(timeout=60)
    before = len(crisp.requests)
    assert 0 < sum(1 for r in query(state_url, "SELECT user_id FROM sync_members")) < n + n // 2

    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(crisp.profiles) == n  # nobody created twice
    for i in range(n):
        expected = {"vip_users": True} | ({"churn_risk": True} if i < n // 2 else {})
        assert data(crisp, f"u{i:03}@example.com") == expected

    # the second run re-sent at most the calls that were in flight when the first one died
    writes = [r for r in crisp.requests if r.method in ("POST", "PATCH") and r.status in (200, 201)]
    per_target = Counter(r.path for r in writes if "/people/data/" in r.path)
    assert sum(per_target.values()) - len(per_target) <= concurrency
    resent = [r for r in crisp.requests[before:] if r.status == 409]
    assert len(resent) <= concurrency
    history = runs(state_url)[::-1]
    assert [h["status"] for h in history] == ["interrupted"] * 2 + ["succeeded"] * 2
    # 15.5: the stopped runs' counters add up, and their pending is what the next run sent.
    for stopped, next_run in zip(history[:2], history[2:], strict=True):
        outcomes = ("delivered", "failed", "skipped", "pending")
        assert sum(stopped[c] for c in outcomes) == stopped["entered"]
        assert stopped["pending"] == next_run["entered"] == next_run["delivered"]


@pytest.mark.parametrize("problem", ["rejected", "missing"])
def test_bad_credentials_are_one_clear_error_and_change_nothing(
    tmp_path: Path, state_url: str, crisp: CrispServer, problem: str
) -> None:
    config = setup(tmp_path, state_url, crisp)
    snapshot(tmp_path / "vip.csv", users(5))
    snapshot(tmp_path / "churn.csv", users(5))
    env = {**crisp_env(), "CRISP_KEY": "not-the-key"} if problem == "rejected" else {}
    if problem == "missing":
        env = {"CRISP_IDENTIFIER": "", "CRISP_KEY": ""}
    done = run(config, env=env)
    assert done.returncode == 6, done.stdout + done.stderr
    output = done.stdout + done.stderr
    if problem == "rejected":
        assert output.count("Crisp rejected the credentials (HTTP 401 unauthorized") == 1
        assert query(state_url, "SELECT * FROM sync_members") == []
        assert query(state_url, "SELECT * FROM sync_pending") == []
    else:
        assert "error: Crisp credentials missing: set $CRISP_IDENTIFIER and $CRISP_KEY" in output
        assert crisp.count() == 0
    for secret in (CRISP_KEY, CRISP_IDENTIFIER, "not-the-key"):
        assert secret not in output
    assert "Traceback" not in output


def test_quota_runs_out_mid_sync_and_the_next_run_finishes(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = setup(tmp_path, state_url, crisp, daily_request_budget=21, max_concurrency=2)
    snapshot(tmp_path / "vip.csv", users(20))
    done = run(config)
    assert done.returncode == 5, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "quota: 20 of 21 requests used today (UTC)" in text  # 10 users finished
    assert "users pending, about 1 more day at this budget" in text
    assert crisp.count() == 20 and "10 users deferred, not started" in text
    shown = json.loads(cli("history", "--config", str(config), "--json").stdout)
    vip = next(h for h in shown if h["audience_key"] == "vip_users")
    assert vip["status"] == "partial" and vip["pending"] > 0 and vip["failed"] == 0
    table = cli("history", "--config", str(config)).stdout
    assert "crisp:website-1: 20 of 21 requests used today (UTC)" in table

    engine = sa.create_engine(state_url)  # the UTC day turns
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE destination_requests SET day = '2000-01-01'"))
    engine.dispose()
    done = run(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(crisp.profiles) == 20
    assert all(data(crisp, f"u{i:03}@example.com") == {"vip_users": True} for i in range(20))
    assert crisp.count() <= 40 + 2  # what was not confirmed, plus at most the calls in flight
