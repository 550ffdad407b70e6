"""The engine end to end through the library API, on SQLite and PostgreSQL: what is sent, what
the state and the history say afterwards, and that nothing unconfirmed ever advances the state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import read_jsonl, runs, state_members, write_config, write_csv
from recording_destination import BatchRecordingDestination, RecordingDestination

from audience_sync import (
    AudienceSyncError,
    DestinationError,
    QuotaExhausted,
    RunMode,
    RunStatus,
    load_config,
    sync,
)
from audience_sync.errors import AlreadyRunning, CredentialsError
from audience_sync.model import Outcome, UserUpdate
from audience_sync.state import RunLock, StateStore, connect, upgrade
from audience_sync.state.ledger import Ledger
from audience_sync.state.schema import sync_changes, sync_locks, sync_members, sync_pending

DAY1 = """
user_id,email,name
007,ada@example.com,Ada
u2,grace@example.com,Grace
u3,alan@example.com,Alan
"""
DAY2 = """
user_id,email,name
007,ada@example.com,Ada
u3,alan@example.com,Alan
u4,katherine@example.com,Katherine
"""


@pytest.fixture
def setup(tmp_path: Path, state_url: str):
    """A config with two audiences; returns (config_path, csv paths by key)."""
    orders = write_csv(tmp_path / "orders.csv", DAY1)
    vip = write_csv(
        tmp_path / "vip.csv", "user_id,email\nu3,alan@example.com\nu5,eve@example.com\n"
    )
    path = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[
            {"name": "Order Completed Last 30days", "source": "orders.csv"},
            {"name": "VIP Users (EU)", "source": "vip.csv"},
        ],
    )
    return path, {"orders": orders, "vip": vip}


def members(state_url: str, destination: str = "recording") -> dict[str, set[str]]:
    keys = ("order_completed_last_30days", "vip_users_eu")
    return {key: state_members(state_url, key, destination) for key in keys}


def test_first_sync_sends_every_member_true_and_a_repeat_sends_nothing(setup, state_url):
    path, _ = setup
    config = load_config(path)
    result = sync(config)
    assert result.exit_code == 0
    lines = read_jsonl(path.parent / "out.jsonl")
    sent = {(m["userId"], k) for m in lines for k, v in m["traits"].items() if v is True}
    assert sent == {
        ("007", "order_completed_last_30days"),
        ("u2", "order_completed_last_30days"),
        ("u3", "order_completed_last_30days"),
        ("u3", "vip_users_eu"),
        ("u5", "vip_users_eu"),
    }
    assert [r.mode for r in result.audiences] == [RunMode.INITIAL, RunMode.INITIAL]
    ada = next(m for m in lines if m["userId"] == "007")
    assert ada["traits"] == {
        "email": "ada@example.com",
        "name": "Ada",
        "order_completed_last_30days": True,
    }
    assert ada["type"] == "identify"
    assert ada["integrations"] == {"All": False, "Crisp": True}
    assert ada["context"]["personas"]["computation_class"] == "audience"
    assert ada["context"]["personas"]["computation_key"] == "order_completed_last_30days"
    assert len({m["messageId"] for m in lines}) == len(lines)

    again = sync(config)
    assert again.exit_code == 0
    assert len(read_jsonl(path.parent / "out.jsonl")) == len(lines)
    assert [
        (r.mode, r.counts["entered"], r.counts["exited"], r.counts["unchanged"])
        for r in again.audiences
    ] == [
        (RunMode.INCREMENTAL, 0, 0, 3),
        (RunMode.INCREMENTAL, 0, 0, 2),
    ]


def test_changed_snapshot_sends_exactly_the_entered_and_exited(setup, state_url):
    path, csvs = setup
    sync(load_config(path))
    before = len(read_jsonl(path.parent / "out.jsonl"))
    write_csv(csvs["orders"], DAY2)
    result = sync(load_config(path))
    new = read_jsonl(path.parent / "out.jsonl")[before:]
    assert sorted((m["userId"], m["traits"]["order_completed_last_30days"]) for m in new) == [
        ("u2", False),
        ("u4", True),
    ]
    orders = result.audiences[0]
    assert (orders.counts["entered"], orders.counts["exited"], orders.counts["unchanged"]) == (
        1,
        1,
        2,
    )
    assert orders.counts["delivered"] == 2
    exited = next(m for m in new if m["userId"] == "u2")
    assert "email" not in exited["traits"]  # a leaver is no longer in the snapshot

    history = runs(state_url)
    assert [
        (r["audience_key"], r["status"], r["entered"], r["exited"], r["delivered"])
        for r in history[:2]
    ] == [
        ("vip_users_eu", "succeeded", 0, 0, 0),
        ("order_completed_last_30days", "succeeded", 1, 1, 2),
    ]
    assert history[1]["snapshot_rows"] == 3
    assert history[1]["finished_at"] >= history[1]["started_at"]


def test_changes_for_one_user_across_audiences_are_one_update(setup, state_url):
    path, _ = setup
    dest = RecordingDestination()
    sync(load_config(path), destination=dest)
    by_user = {u.user_id: u for u in dest.updates}
    assert len(dest.updates) == len(by_user) == 4
    assert dict(by_user["u3"].traits) == {"order_completed_last_30days": True, "vip_users_eu": True}
    assert by_user["u3"].identity.email == "alan@example.com"


def test_state_does_not_move_for_failed_or_skipped_users_and_they_are_retried(setup, state_url):
    path, _ = setup
    first = RecordingDestination(fail={"u2"}, skip={"u5"})
    result = sync(load_config(path), destination=first)
    assert result.exit_code == 5
    orders, vip = result.audiences
    assert orders.status is RunStatus.PARTIAL
    assert (orders.counts["delivered"], orders.counts["failed"], orders.counts["skipped"]) == (
        2,
        1,
        0,
    )
    assert (vip.counts["delivered"], vip.counts["skipped"]) == (1, 1)
    assert members(state_url) == {
        "order_completed_last_30days": {"007", "u3"},
        "vip_users_eu": {"u3"},
    }
    engine = connect(state_url)
    with engine.connect() as conn:
        queued = {
            (r.user_id, r.status, r.reason, r.attempts)
            for r in conn.execute(sa.select(sync_pending))
        }
        logged = {
            (r.user_id, r.trait_key, r.outcome) for r in conn.execute(sa.select(sync_changes))
        }
    assert queued == {
        ("u2", "failed", "server_error", 1),
        ("u5", "skipped", "email required to create a profile", 1),
    }
    assert ("u2", "order_completed_last_30days", "failed") in logged
    first_ids = {u.user_id: u.changes[0].message_id for u in first.updates}

    second = RecordingDestination()
    result = sync(load_config(path), destination=second)
    assert result.exit_code == 0
    assert sorted(u.user_id for u in second.updates) == ["u2", "u5"]
    # The re-sent change keeps the first attempt's messageId, so a downstream dedup can drop it.
    assert {u.user_id: u.changes[0].message_id for u in second.updates} == {
        "u2": first_ids["u2"],
        "u5": first_ids["u5"],
    }
    assert members(state_url)["vip_users_eu"] == {"u3", "u5"}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sync_pending)).scalar() == 0
    engine.dispose()


def test_permanent_failure_is_held_until_input_changes_or_retry_failed(setup, state_url):
    path, csvs = setup
    sync(load_config(path), destination=RecordingDestination(permanent={"u2"}))
    held = RecordingDestination()
    result = sync(load_config(path), destination=held)
    assert [u.user_id for u in held.updates] == []
    assert result.audiences[0].counts["failed"] == 1
    assert "--retry-failed" in (result.audiences[0].error or "")
    # The held change is counted failed in the stored row as soon as it is held (15.5).
    engine = connect(state_url)
    stored = StateStore(engine).run(result.audiences[0].run_id or 0)
    engine.dispose()
    assert stored is not None
    assert (stored["entered"], stored["failed"], stored["pending"], stored["delivered"]) == (
        1,
        1,
        0,
        0,
    )

    forced = RecordingDestination()
    sync(load_config(path), destination=forced, retry_failed=True)
    assert [u.user_id for u in forced.updates] == ["u2"]

    # Held again after another permanent failure; a new email makes it worth another try.
    sync(load_config(path), destination=RecordingDestination(permanent={"u4"}))
    write_csv(csvs["orders"], DAY1 + "u4,bad-email,Kat\n")
    sync(load_config(path), destination=RecordingDestination(permanent={"u4"}))
    write_csv(csvs["orders"], DAY1 + "u4,kat@example.com,Kat\n")
    fixed = RecordingDestination()
    sync(load_config(path), destination=fixed)
    assert [u.user_id for u in fixed.updates] == ["u4"]


def test_a_second_destination_starts_with_its_own_initial_sync(setup, state_url):
    path, _ = setup
    sync(load_config(path), destination=RecordingDestination("crm-a"))
    other = RecordingDestination("crm-b")
    result = sync(load_config(path), destination=other)
    assert [r.mode for r in result.audiences] == [RunMode.INITIAL, RunMode.INITIAL]
    assert sorted(u.user_id for u in other.updates) == ["007", "u2", "u3", "u5"]
    again = RecordingDestination("crm-a")
    sync(load_config(path), destination=again)
    assert again.updates == []


def test_full_resync_resends_members_and_exits_leavers(setup, state_url):
    path, csvs = setup
    sync(load_config(path), destination=RecordingDestination())
    write_csv(csvs["orders"], DAY2)
    full = RecordingDestination()
    result = sync(
        load_config(path), destination=full, full=True, audiences=["order_completed_last_30days"]
    )
    assert result.audiences[0].mode is RunMode.FULL
    assert full.sent() == {
        "007": {"order_completed_last_30days": True},
        "u3": {"order_completed_last_30days": True},
        "u4": {"order_completed_last_30days": True},
        "u2": {"order_completed_last_30days": False},
    }
    assert members(state_url)["order_completed_last_30days"] == {"007", "u3", "u4"}
    assert result.audiences[0].counts["delivered"] == 4


def test_dry_run_changes_nothing(setup, state_url):
    path, csvs = setup
    result = sync(load_config(path), dry_run=True)
    assert result.dry_run and result.exit_code == 0
    assert result.audiences[0].counts["entered"] == 3
    assert not (path.parent / "out.jsonl").exists()
    engine = connect(state_url)
    assert not sa.inspect(engine).has_table("sync_runs")

    sync(load_config(path))
    write_csv(csvs["orders"], DAY2)
    runs_before = len(StateStore(engine).runs(limit=100))
    lines_before = len(read_jsonl(path.parent / "out.jsonl"))
    plan = sync(load_config(path), dry_run=True)
    assert {s["user_id"]: s["order_completed_last_30days"] for s in plan.audiences[0].sample} == {
        "u4": True,
        "u2": False,
    }
    assert len(StateStore(engine).runs(limit=100)) == runs_before
    assert len(read_jsonl(path.parent / "out.jsonl")) == lines_before
    assert members(state_url, "jsonl")["order_completed_last_30days"] == {"007", "u2", "u3"}
    engine.dispose()


class CommitCheckingDestination(RecordingDestination):
    """Each time the engine comes back for more, notes which users it confirmed so far are not
    in the state yet."""

    def __init__(self, state_url: str) -> None:
        super().__init__(batch=1)
        self.state_url = state_url
        self.unrecorded: list[set[str]] = []

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncIterator[list[Outcome]]:
        confirmed: set[str] = set()
        async for outcomes in super().deliver(updates):
            yield outcomes
            confirmed |= {o.user_id for o in outcomes}
            self.unrecorded.append(confirmed - set().union(*members(self.state_url).values()))


def test_a_per_user_destination_is_asked_for_more_only_once_its_outcomes_are_committed(
    setup, state_url, monkeypatch
):
    """So a per-user destination may start its next users knowing that a kill at that moment
    re-sends only its calls in flight (Crisp holds a permit per user until then)."""
    path, _ = setup
    commit = Ledger.commit

    def slow_commit(self: Ledger, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.2)  # a slow database: the destination must still find its users recorded
        commit(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "commit", slow_commit)
    dest = CommitCheckingDestination(state_url)
    sync(load_config(path), destination=dest)
    assert len(dest.unrecorded) == 4  # 007, u2, u3, u5: one check after each
    assert dest.unrecorded == [set()] * 4


def test_a_crash_mid_delivery_keeps_what_was_confirmed_and_the_next_run_finishes(setup, state_url):
    path, _ = setup
    crashing = RecordingDestination(stop_after=2, batch=1)
    with pytest.raises(AudienceSyncError, match="stopped on purpose"):
        sync(load_config(path), destination=crashing)
    confirmed = {u.user_id for u in crashing.updates}
    assert len(confirmed) == 2
    assert {r["status"] for r in runs(state_url)} == {"failed"}

    finishing = RecordingDestination()
    sync(load_config(path), destination=finishing)
    assert {u.user_id for u in finishing.updates} == {"007", "u2", "u3", "u5"} - confirmed
    assert members(state_url) == {
        "order_completed_last_30days": {"007", "u2", "u3"},
        "vip_users_eu": {"u3", "u5"},
    }


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (QuotaExhausted("quota: 5,000 of 5,000 requests used today"), RunStatus.PARTIAL, 5),
        (CredentialsError("Crisp rejected the credentials (401)"), RunStatus.FAILED, 6),
        (DestinationError("website not found"), RunStatus.FAILED, 6),
    ],
)
def test_a_destination_stopping_the_run_leaves_the_rest_pending(
    setup, state_url, error, status, code
):
    path, _ = setup
    dest = RecordingDestination(stop_after=1, stop_with=error, batch=1)
    result = sync(load_config(path), destination=dest)
    assert result.exit_code == code
    assert {r.status for r in result.audiences} == {status}
    assert str(error) in (result.audiences[0].error or "")
    total_pending = sum(r.counts["pending"] for r in result.audiences)
    assert total_pending == 5 - 1
    again = RecordingDestination()
    sync(load_config(path), destination=again)
    assert len(again.updates) == 3  # 4 users in all, 1 confirmed before the stop


def test_conflicting_rows_hold_a_member_instead_of_exiting_them(setup, state_url):
    path, csvs = setup
    sync(load_config(path), destination=RecordingDestination())
    write_csv(csvs["orders"], DAY1 + "u2,other@example.com,Grace\n")
    dest = RecordingDestination()
    result = sync(load_config(path), destination=dest)
    assert dest.updates == []
    orders = result.audiences[0]
    assert orders.counts["rejected_rows"] == 2
    assert {r.row for r in orders.rejected} == {2, 4}
    assert result.exit_code == 4
    assert "u2" in members(state_url)["order_completed_last_30days"]


def test_one_broken_snapshot_does_not_stop_the_other_audiences(setup, state_url):
    path, csvs = setup
    config = load_config(path)
    csvs["orders"].unlink()
    dest = RecordingDestination()
    result = sync(config, destination=dest)
    orders, vip = result.audiences
    assert orders.status is RunStatus.FAILED and "snapshot file not found" in (orders.error or "")
    assert vip.status is RunStatus.SUCCEEDED
    assert result.exit_code == 4
    assert sorted(u.user_id for u in dest.updates) == ["u3", "u5"]


def test_a_held_lock_refuses_the_run_and_an_expired_one_is_taken_over(setup, state_url):
    path, _ = setup
    config = load_config(path)
    engine = connect(state_url)
    upgrade(engine)
    store = StateStore(engine)
    ref = store.audience("recording", "vip_users_eu", "VIP Users (EU)")
    t0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    other = RunLock(engine, ttl=timedelta(seconds=60), clock=lambda: t0)
    lease = other.acquire(ref, "elsewhere:4242")
    dead_run = store.start_run(ref, mode="incremental", trigger="schedule")
    other.attach_run(lease, dead_run)

    result = sync(
        config, destination=RecordingDestination(), clock=lambda: t0 + timedelta(seconds=30)
    )
    orders, vip = result.audiences
    assert vip.error_type is AlreadyRunning
    assert "already running since 2026-11-25 12:00:00 UTC" in (vip.error or "")
    assert "elsewhere:4242" in (vip.error or "")
    assert orders.status is RunStatus.SUCCEEDED
    assert result.exit_code == 7

    later = RecordingDestination()
    result = sync(config, destination=later, clock=lambda: t0 + timedelta(minutes=5))
    assert result.exit_code == 0
    assert store.run(dead_run)["status"] == "interrupted"
    assert sorted(u.user_id for u in later.updates) == ["u3", "u5"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sync_locks)).scalar() == 0
    engine.dispose()


def test_sql_snapshot_source(tmp_path: Path, state_url: str):
    warehouse = tmp_path / "warehouse.db"
    wh = sa.create_engine(f"sqlite:///{warehouse}")
    with wh.begin() as conn:
        conn.execute(sa.text("create table orders (user_id integer, email text)"))
        conn.execute(sa.text("insert into orders values (7, 'a@x.io'), (8, null), (9, 'c@x.io')"))
    wh.dispose()
    path = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[
            {
                "name": "Recent Buyers",
                "query": "select user_id, email from orders",
                "source_url": f"sqlite:///{warehouse}",
            }
        ],
    )
    dest = RecordingDestination()
    assert sync(load_config(path), destination=dest).exit_code == 0
    assert sorted(u.user_id for u in dest.updates) == ["7", "8", "9"]
    engine = connect(state_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sync_members)).scalar() == 3
    engine.dispose()


def test_a_batch_destination_gets_whole_users_and_a_crash_keeps_the_confirmed_batches(
    setup, state_url
):
    path, _ = setup
    crashing = BatchRecordingDestination(users=1, stop_after=2)
    with pytest.raises(AudienceSyncError, match="stopped on purpose"):
        sync(load_config(path), destination=crashing)
    assert [b.users for b in crashing.batches] == [1, 1]
    confirmed = {u for u, _, _ in crashing.sent()}
    assert members(state_url) == {
        "order_completed_last_30days": confirmed & {"007", "u2", "u3"},
        "vip_users_eu": confirmed & {"u3", "u5"},
    }

    finishing = BatchRecordingDestination(users=3)
    result = sync(load_config(path), destination=finishing)
    assert result.exit_code == 0
    assert {u for u, _, _ in finishing.sent()} == {"007", "u2", "u3", "u5"} - confirmed
    assert members(state_url) == {
        "order_completed_last_30days": {"007", "u2", "u3"},
        "vip_users_eu": {"u3", "u5"},
    }
    # u3 is in both audiences: their two changes travel in one batch, next to each other.
    everything = crashing.sent() + finishing.sent()
    assert [(a, v) for u, a, v in everything if u == "u3"] == [
        ("order_completed_last_30days", True),
        ("vip_users_eu", True),
    ]
    assert sum(r.counts["delivered"] for r in result.audiences) == len(finishing.sent())


def test_per_user_and_batch_destinations_are_sent_the_same_changes(setup, state_url):
    path, csvs = setup

    def sent_per_user(dest: RecordingDestination) -> set[tuple]:
        return {
            (u.user_id, c.audience_key, c.value, u.identity)
            for u in dest.updates
            for c in u.changes
        }

    def sent_in_batches(dest: BatchRecordingDestination) -> set[tuple]:
        return {
            (u.user_id, c.audience_key, c.value, u.identity)
            for b in dest.batches
            for u in b.updates()
            for c in u.changes
        }

    for day in (DAY1, DAY2 + "u6,,Nameless\n"):
        write_csv(csvs["orders"], day)
        per_user = RecordingDestination("per-user")
        batches = BatchRecordingDestination("batches", users=2)
        assert sync(load_config(path), destination=per_user).exit_code == 0
        assert sync(load_config(path), destination=batches).exit_code == 0
        assert sent_per_user(per_user) == sent_in_batches(batches) != set()
        assert members(state_url, "per-user") == members(state_url, "batches")
