"""Safeguards: the pure check, and the real CLI refusing a wiped or stale snapshot."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, read_jsonl, runs, write_config, write_csv, write_users
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync.config import AudienceConfig, SafeguardConfig
from audience_sync.diff import plan
from audience_sync.errors import SafeguardError
from audience_sync.safeguards import check, limits_for

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def ids(*values: str) -> pd.Index:
    return pd.Index(list(values), dtype="string[pyarrow]")


def guard(members: pd.Index, synced: pd.Index, **overrides: object) -> None:
    audience = AudienceConfig.model_validate({"name": "Aud A", "source": "a.csv", **overrides})
    check(
        audience,
        plan(members, synced),
        source="a.csv",
        members=len(members),
        synced=len(synced),
        taken_at=NOW - timedelta(hours=2),
        now=NOW,
        limits=limits_for(audience, SafeguardConfig(max_snapshot_age=timedelta(days=1))),
    )


TEN = ids(*(f"u{i}" for i in range(10)))


@pytest.mark.parametrize(
    ("members", "overrides", "refused"),
    [
        (TEN, {}, None),
        (ids(), {}, "has no members, but 10 users are members now"),
        (ids(), {"allow_empty": True}, None),
        (TEN[:5], {}, None),  # exactly 50% leave: allowed
        (TEN[:4], {}, "would set 6 of 10 current members (60%) to false"),
        (TEN[:4], {"max_exit_ratio": 0.7}, None),
        (TEN[:4], {"max_snapshot_age": "1h"}, "2h ago, older than max_snapshot_age 1h"),
    ],
)
def test_check(members: pd.Index, overrides: dict[str, object], refused: str | None) -> None:
    if "max_snapshot_age" in overrides:
        overrides = {**overrides, "max_exit_ratio": 1.0}
    if refused is None:
        guard(members, TEN, **overrides)
        return
    with pytest.raises(SafeguardError) as exc:
        guard(members, TEN, **overrides)
    assert refused in str(exc.value)
    assert "--force" in str(exc.value)


@settings(max_examples=40, deadline=None)
@given(members=st.integers(0, 10), max_exit_ratio=st.floats(0, 0.99), allow_empty=st.booleans())
def test_first_sync_and_empty_state_are_never_refused(
    members: int, max_exit_ratio: float, allow_empty: bool
) -> None:
    """An empty state (a first sync) passes the empty and mass-exit safeguards at any limits,
    whatever the snapshot holds, empty included; the same limits refuse the same snapshot
    against a state whose members would all leave."""
    snapshot = TEN[:members]
    limits = {"max_exit_ratio": max_exit_ratio, "allow_empty": allow_empty}
    guard(snapshot, ids(), **limits)  # not refused: nothing to wipe, nobody to exit
    if members == 0 and allow_empty:
        return  # an allowed empty snapshot is not refused against any state
    with pytest.raises(SafeguardError, match="nothing was sent"):
        guard(snapshot, ids("x1", "x2"), **limits)


def test_a_wiped_snapshot_is_refused_and_force_overrides(tmp_path: Path, state_url: str) -> None:
    source = write_users(tmp_path / "a.csv", 10)
    config = write_config(
        tmp_path / "c.toml", state_url=state_url, audiences=[{"name": "Aud A", "source": "a.csv"}]
    )
    assert cli("run", "--config", str(config)).returncode == 0
    write_csv(source, "user_id,email\n")
    refused = cli("run", "--config", str(config))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "has no members, but 10 users are members now" in refused.stdout
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 10  # nothing sent
    last = runs(state_url)[0]
    assert last["status"] == "failed"
    assert (last["exited"], last["delivered"]) == (10, 0)
    assert "nothing was sent" in str(last["error"])

    forced = cli("run", "--config", str(config), "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    sent = read_jsonl(tmp_path / "out.jsonl")[10:]
    assert sorted(str(m["userId"]) for m in sent) == sorted(f"u{i}" for i in range(10))
    assert all(m["traits"]["aud_a"] is False for m in sent)  # type: ignore[index]


def test_mass_exit_is_refused_unless_the_audience_allows_it(tmp_path: Path, state_url: str) -> None:
    source = write_users(tmp_path / "a.csv", 10)
    audience = {"name": "Aud A", "source": "a.csv"}
    config = write_config(tmp_path / "c.toml", state_url=state_url, audiences=[audience])
    assert cli("run", "--config", str(config)).returncode == 0
    write_users(source, 4)
    refused = cli("run", "--config", str(config))
    assert refused.returncode == 4
    assert "would set 6 of 10 current members (60%) to false" in refused.stdout
    write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{**audience, "max_exit_ratio": 0.75}],
    )
    allowed = cli("run", "--config", str(config))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert runs(state_url)[0]["exited"] == 6


def test_a_stale_snapshot_is_refused(tmp_path: Path, state_url: str) -> None:
    source = write_users(tmp_path / "a.csv", 3)
    old = time.time() - 3 * 3600
    os.utime(source, (old, old))
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "Aud A", "source": "a.csv"}],
        extra='\n[safeguards]\nmax_snapshot_age = "1h"\n',
    )
    refused = cli("run", "--config", str(config))
    assert refused.returncode == 4
    assert "older than max_snapshot_age 1h" in refused.stdout
    assert "Check that the export still runs" in refused.stdout
    assert not (tmp_path / "out.jsonl").exists()

    # A snapshot_at column says when the data was taken, whatever the file's mtime.
    fresh = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_csv(source, f"user_id,snapshot_at\nu1,{fresh}\nu2,{fresh}\n")
    os.utime(source, (old, old))
    assert cli("run", "--config", str(config)).returncode == 0
