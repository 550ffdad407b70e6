"""A run history to look at: real syncs of two audiences over three days (with a test
destination that fails some users), plus the rows no file destination produces (a hostile
reason, requests against a daily budget, rejected rows in ``sync_rejected_rows``).

Shared by the history pages' tests with and without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import execute, write_config, write_csv
from recording_destination import RecordingDestination

from audience_sync import sync
from audience_sync.config import Config, load_config

EVIL = '<script>alert("x")</script>'
EVIL_USER = "u-<img src=x onerror=alert(1)>"


@dataclass(frozen=True)
class Seeded:
    config_path: Path
    config: Config
    runs: dict[str, int]
    """Audience key -> runs seeded."""
    run_ids: dict[str, list[int]]
    failed_run: int
    """A run with a failed change whose reason is ``EVIL``."""
    rejected_run: int
    """A run that rejected a snapshot row (listed in ``sync_rejected_rows`` when made)."""
    user: str
    """A user with three changes: delivered, failed (HTTP 503), delivered."""


def seed_history(tmp_path: Path, state_url: str, *, rejected_table: bool = True) -> Seeded:
    members = "user_id,email\n" + "".join(f"u-{1000 + i},u{i}@x.io\n" for i in range(10))
    write_csv(tmp_path / "a.csv", members)
    write_csv(tmp_path / "b.csv", members.replace("u-100", "u-200"))
    path = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[
            {"name": "Paying Customers", "source": "a.csv", "interval": "6h"},
            {"name": "Churn Risk", "source": "b.csv", "schedule": "0 */6 * * *"},
        ],
    )
    config = load_config(path)
    name = config.destination.name
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    runs: dict[str, list[int]] = {"paying_customers": [], "churn_risk": []}

    def run(hours: int, audience: str, **faults: set[str]) -> int:
        at = start + timedelta(hours=hours)
        result = sync(
            config,
            audiences=[audience],
            clock=lambda: at,
            destination=RecordingDestination(name, **faults),  # type: ignore[arg-type]
        )
        (r,) = result.audiences
        assert r.run_id is not None
        runs[audience].append(r.run_id)
        return r.run_id

    run(0, "paying_customers")
    run(1, "churn_risk")
    # u-1002 and u-1003 leave; the destination refuses u-1002 (503) and skips u-1004's entry.
    write_csv(
        tmp_path / "a.csv",
        members.replace("u-1002,u2@x.io\n", "").replace("u-1003,u3@x.io\n", "")
        + "u-1010,u10@x.io\n",
    )
    failed_run = run(6, "paying_customers", fail={"u-1002"}, skip={"u-1010"})
    # A snapshot row without a user_id is rejected.
    write_csv(tmp_path / "b.csv", members.replace("u-100", "u-200") + ",nobody@x.io\n")
    rejected_run = run(7, "churn_risk", permanent={"u-2009"})
    run(12, "paying_customers")  # the retry delivers u-1002's exit
    run(13, "churn_risk")
    write_csv(tmp_path / "a.csv", "user_id,email\n")  # an empty snapshot: refused, run failed
    run(18, "paying_customers")
    run(60, "churn_risk")  # 12 hours ago: the only run of the last 24 hours

    execute(
        state_url,
        "INSERT INTO sync_changes (run_id, user_id, trait_key, value, outcome, reason, at) "
        "VALUES (:run, :user, 'paying_customers', true, 'failed', :reason, :at)",
        [{"run": failed_run, "user": EVIL_USER, "reason": EVIL, "at": start}],
    )
    execute(
        state_url,
        "INSERT INTO sync_pending (audience_id, user_id, value, status, reason, status_code, "
        "retryable, input_hash, message_id, attempts, first_run_id, last_run_id, first_at, "
        "last_at) VALUES (1, :user, true, 'failed', :reason, 422, false, 'h', 'm', 2, :run, "
        ":run, :at, :at)",
        [{"user": EVIL_USER, "reason": EVIL, "run": failed_run, "at": start}],
    )
    if not rejected_table:  # a database from before migration 0006 recorded rejected rows
        execute(state_url, "DROP TABLE sync_rejected_rows")
    else:
        execute(
            state_url,
            "INSERT INTO sync_rejected_rows (run_id, audience_key, row_number, user_id, reason, "
            "at) VALUES (:run, 'churn_risk', 11, NULL, :reason, :at)",
            [{"run": rejected_run, "reason": "user_id is empty " + EVIL, "at": start}],
        )
    return Seeded(
        path,
        config,
        {k: len(v) for k, v in runs.items()},
        runs,
        failed_run,
        rejected_run,
        "u-1002",
    )
