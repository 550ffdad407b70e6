"""``audience-sync serve`` and the run lock, driven as real processes on SQLite and PostgreSQL.

Slow runs use the test-only ``slow_jsonl`` destination (tests/slow_destination.py): the JSONL
destination sleeping a few milliseconds per user, so a run can be stopped or killed midway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import LAUNCHER, read_jsonl, write_config, write_csv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def launch(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start the real CLI (with the test destinations) in the background, logs to ``log``."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, str(LAUNCHER), *args], stdout=sink, stderr=subprocess.STDOUT
        )


def run_cli(*args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=timeout
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def db(state_url: str) -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """Run a SQL query on the state database (no tables yet -> no rows)."""
    engine = sa.create_engine(state_url)

    def query(sql: str) -> list[dict[str, Any]]:
        try:
            with engine.connect() as conn:
                return [dict(r) for r in conn.execute(sa.text(sql)).mappings()]
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            return []

    yield query
    engine.dispose()


def users_csv(path: Path, n: int) -> Path:
    rows = "\n".join(f"u{i:04d},u{i}@example.com" for i in range(n))
    return write_csv(path, "user_id,email\n" + rows + "\n")


def sent_user_ids(path: Path) -> list[str]:
    return [m["userId"] for m in read_jsonl(path)]


def slow_config(
    tmp_path: Path,
    state_url: str,
    *,
    name: str = "c.toml",
    delay: float = 0.01,
    audiences: list[dict[str, Any]],
    service: str = "",
    stalled: dict[str, Any] | None = None,
) -> Path:
    return write_config(
        tmp_path / name,
        state_url=state_url,
        destination={
            "type": "slow_jsonl",
            "name": "test-out",
            "path": "out.jsonl",
            "delay": delay,
            "flush_every": 10,
            **(stalled or {}),
        },
        audiences=audiences,
        extra=f"\n[service]\n{service}\n",
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_serve_runs_each_audience_on_its_interval(tmp_path: Path, state_url: str, db: Any) -> None:
    users_csv(tmp_path / "a.csv", 5)
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "Aud A", "source": "a.csv", "interval": "1s"}],
    )
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)
    try:
        runs = wait_for(
            "two scheduled runs",
            lambda: [
                r
                for r in db("select * from sync_runs where status = 'succeeded' order by id")
                if r["trigger"] == "schedule"
            ][1:],
        )
        assert runs
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "audience=aud_a schedule='every 1s' next_run=" in text
    assert "stopped" in text
    first, second = db("select * from sync_runs order by id")[:2]
    assert (first["mode"], first["delivered"]) == ("initial", 5)
    assert (second["mode"], second["delivered"]) == ("incremental", 0)
    assert sorted(sent_user_ids(tmp_path / "out.jsonl")) == [f"u{i:04d}" for i in range(5)]


def test_sigterm_mid_run_interrupts_and_the_next_run_loses_nothing(
    tmp_path: Path, state_url: str, db: Any
) -> None:
    users_csv(tmp_path / "a.csv", 400)
    config = slow_config(
        tmp_path, state_url, audiences=[{"name": "Aud A", "source": "a.csv", "interval": "1s"}]
    )
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)
    out = tmp_path / "out.jsonl"
    try:
        wait_for("the run to be under way", lambda: len(sent_user_ids(out)) >= 30)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    (run,) = db("select * from sync_runs")
    assert run["status"] == "interrupted", run
    assert 0 < run["delivered"] < 400
    sent = sent_user_ids(out)
    assert len(sent) == run["delivered"]  # every confirmed change was committed
    members = db("select count(*) as n from sync_members")[0]["n"]
    assert members == run["delivered"]

    fast = slow_config(
        tmp_path,
        state_url,
        name="fast.toml",
        delay=0,
        audiences=[{"name": "Aud A", "source": "a.csv"}],
    )
    done = run_cli("run", "--config", str(fast))
    assert done.returncode == 0, done.stdout + done.stderr
    sent = sent_user_ids(out)
    assert sorted(sent) == [f"u{i:04d}" for i in range(400)]  # all sent, none twice
    assert db("select count(*) as n from sync_members")[0]["n"] == 400
    last = db("select * from sync_runs order by id desc")[0]
    assert (last["status"], last["delivered"]) == ("succeeded", 400 - run["delivered"])


def test_manual_run_is_refused_or_waits_while_another_process_runs(
    tmp_path: Path, state_url: str, db: Any
) -> None:
    users_csv(tmp_path / "a.csv", 200)
    # The first run hangs after 25 users until the test releases it: it is certainly still
    # running when the second starts, however slow the machine.
    slow = slow_config(
        tmp_path,
        state_url,
        audiences=[{"name": "Aud A", "source": "a.csv"}],
        stalled={"stall_after": 25, "stall": 600},
    )
    out = tmp_path / "out.jsonl"
    log = tmp_path / "slow.log"
    first = launch("run", "--config", str(slow), log=log)
    try:
        wait_for("the first run to stall", (tmp_path / "out.jsonl.stalled").exists, timeout=300)
        refused = run_cli("run", "--config", str(slow), timeout=300)
        assert refused.returncode == 7, refused.stdout + refused.stderr
        assert "is already running since" in refused.stdout + refused.stderr
        assert f":{first.pid}" in refused.stdout + refused.stderr  # held by host:pid
        waiting = launch("run", "--config", str(slow), "--wait", "600", log=tmp_path / "w.log")
        (tmp_path / "out.jsonl.release").touch()
        assert waiting.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()
    finally:
        (tmp_path / "out.jsonl.release").touch()
        try:
            first.wait(timeout=300)  # it ends on its own once its 200 users are sent
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0, log.read_text()
    assert len(sent_user_ids(out)) == 200
    a, b = db("select * from sync_runs order by id")
    assert (a["status"], a["delivered"]) == ("succeeded", 200)
    assert (b["status"], b["delivered"], b["unchanged"]) == ("succeeded", 0, 200)
    assert b["started_at"] >= a["finished_at"]


def test_a_killed_process_lock_is_taken_over(tmp_path: Path, state_url: str, db: Any) -> None:
    users_csv(tmp_path / "a.csv", 400)
    slow = slow_config(
        tmp_path,
        state_url,
        audiences=[{"name": "Aud A", "source": "a.csv"}],
        service='lock_ttl = "4s"',
    )
    log = tmp_path / "killed.log"
    victim = launch("run", "--config", str(slow), log=log)
    out = tmp_path / "out.jsonl"
    wait_for("the run to send", lambda: len(sent_user_ids(out)) >= 30)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    fast = slow_config(
        tmp_path,
        state_url,
        name="fast.toml",
        delay=0,
        audiences=[{"name": "Aud A", "source": "a.csv"}],
        service='lock_ttl = "4s"',
    )
    # The lease is still valid, but its holder is a dead process on this host: taken over at
    # once. (A holder on another host is judged by its lease: see test_engine's lock test.)
    done = run_cli("run", "--config", str(fast))
    assert done.returncode == 0, done.stdout + done.stderr
    killed, finished = db("select * from sync_runs order by id")
    assert killed["status"] == "interrupted"
    assert "stopped (crash or kill)" in killed["error"]
    assert finished["status"] == "succeeded"
    assert db("select count(*) as n from sync_members")[0]["n"] == 400
    sent = sent_user_ids(out)
    assert set(sent) == {f"u{i:04d}" for i in range(400)}
    # The killed run's committed changes are not sent again by the run that took over; what is
    # sent twice is only what the killed process wrote but had not committed yet.
    assert killed["delivered"] + finished["delivered"] == 400


def test_sighup_adds_an_audience_and_a_bad_config_keeps_the_old_one(
    tmp_path: Path, state_url: str, db: Any
) -> None:
    users_csv(tmp_path / "a.csv", 3)
    users_csv(tmp_path / "b.csv", 4)
    a = {"name": "Aud A", "source": "a.csv", "interval": "1s"}
    b = {"name": "Aud B", "source": "b.csv", "interval": "1s"}
    config = write_config(tmp_path / "c.toml", state_url=state_url, audiences=[a])
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)

    def runs_of(key: str) -> int:
        rows = db(f"select id from sync_runs where audience_key = '{key}' and status = 'succeeded'")
        return len(rows)

    try:
        wait_for("a run of A", lambda: runs_of("aud_a") >= 1)
        write_config(tmp_path / "c.toml", state_url=state_url, audiences=[a, b])
        proc.send_signal(signal.SIGHUP)
        wait_for("a run of B after the reload", lambda: runs_of("aud_b") >= 1)
        assert "config reloaded" in log.read_text()

        config.write_text(config.read_text() + "\n[service]\ntimezone = 'Mars/Olympus'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for("the rejection", lambda: "config reload rejected" in log.read_text())
        before = runs_of("aud_b")
        wait_for("B to keep running", lambda: runs_of("aud_b") > before)
    finally:
        code = stop(proc)
    assert code == 0
    text = log.read_text()
    assert "service.timezone: 'Mars/Olympus' is not a known time zone" in text


def test_a_stuck_request_is_cancelled_after_stop_timeout(
    tmp_path: Path, state_url: str, db: Any
) -> None:
    users_csv(tmp_path / "a.csv", 100)
    config = slow_config(
        tmp_path,
        state_url,
        audiences=[{"name": "Aud A", "source": "a.csv", "interval": "1s"}],
        service='stop_timeout = "1s"',
        stalled={"stall_after": 25, "stall": 120},
    )
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)
    out = tmp_path / "out.jsonl"
    wait_for("the run to stall", (tmp_path / "out.jsonl.stalled").exists)
    assert stop(proc) == 0, log.read_text()
    assert "in-flight deliveries still running 1s after the stop; cancelling" in log.read_text()
    (run,) = db("select * from sync_runs")
    assert run["status"] == "interrupted"
    assert len(sent_user_ids(out)) == run["delivered"] == len(db_ids(db))


def test_second_signal_exits_at_once(tmp_path: Path, state_url: str, db: Any) -> None:
    users_csv(tmp_path / "a.csv", 100)
    config = slow_config(
        tmp_path,
        state_url,
        audiences=[{"name": "Aud A", "source": "a.csv", "interval": "1s"}],
        service='stop_timeout = "120s"',
        stalled={"stall_after": 25, "stall": 120},
    )
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)
    out = tmp_path / "out.jsonl"
    wait_for("the run to stall", (tmp_path / "out.jsonl.stalled").exists)
    proc.send_signal(signal.SIGTERM)
    wait_for("the first stop", lambda: "stopping: no new runs" in log.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert "second SIGTERM: exiting now" in log.read_text()
    # Nothing in the state that the destination did not confirm.
    assert set(db_ids(db)) <= set(sent_user_ids(out))


def db_ids(db: Callable[[str], list[dict[str, Any]]]) -> list[str]:
    return [r["user_id"] for r in db("select user_id from sync_members")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals")
def test_run_stops_cleanly_on_sigterm(tmp_path: Path, state_url: str, db: Any) -> None:
    users_csv(tmp_path / "a.csv", 300)
    slow = slow_config(tmp_path, state_url, audiences=[{"name": "Aud A", "source": "a.csv"}])
    log = tmp_path / "run.log"
    proc = launch("run", "--config", str(slow), log=log)
    out = tmp_path / "out.jsonl"
    wait_for("the run to send", lambda: len(sent_user_ids(out)) >= 20)
    code = stop(proc)
    assert code == 5, log.read_text()  # interrupted: see `history`
    (run,) = db("select * from sync_runs")
    assert run["status"] == "interrupted"
    assert len(sent_user_ids(out)) == run["delivered"] == len(db_ids(db))


def test_serve_writes_prometheus_textfile(tmp_path: Path, state_url: str, db: Any) -> None:
    users_csv(tmp_path / "a.csv", 5)
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "Aud A", "source": "a.csv", "interval": "1s"}],
        extra='\n[service]\nmetrics_textfile = "metrics/audience_sync.prom"\n',
    )
    log = tmp_path / "serve.log"
    proc = launch("serve", "--config", str(config), log=log)
    prom = tmp_path / "metrics" / "audience_sync.prom"
    try:
        wait_for("metrics", lambda: prom.exists() and "succeeded" in prom.read_text())
    finally:
        assert stop(proc) == 0
    text = prom.read_text()
    assert (
        'audience_sync_runs_total{audience="aud_a",destination="jsonl",status="succeeded"}' in text
    )
    assert 'audience_sync_changes_delivered_total{audience="aud_a",destination="jsonl"} 5.0' in text
    assert "audience_sync_last_run_duration_seconds" in text
