"""`audience-sync retire NAME` (issue 13.6): ``false`` to exactly the members the state holds,
within the quota and resumable, then the audience's state dropped and the retirement recorded.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import cli, crisp_destination, crisp_env, read_jsonl, write_config, write_csv
from crisp_server import CrispServer

from audience_sync import load_config, retire
from audience_sync.model import RunStatus


def snapshot(path: Path, ids: list[str], email: bool = False) -> None:
    header = "user_id,email\n" if email else "user_id\n"
    rows = "".join(f"{u},{u}@example.com\n" if email else f"{u}\n" for u in ids)
    write_csv(path, header + rows)


def configure(
    folder: Path, state_url: str, names: list[str], destination: dict[str, Any] | None = None
) -> Path:
    return write_config(
        folder / "c.toml",
        state_url=state_url,
        destination=destination or {"type": "jsonl", "path": "out.jsonl", "flush_every": 2},
        audiences=[{"name": n, "source": f"{n.lower()}.csv"} for n in names],
    )


def falses(folder: Path, key: str) -> list[str]:
    return [m["userId"] for m in read_jsonl(folder / "out.jsonl") if m["traits"].get(key) is False]


def state(state_url: str, query: str) -> list[Any]:
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(query))]
    finally:
        engine.dispose()


def test_retire_sends_false_to_the_members_then_drops_the_state(tmp_path: Path, state_url: str):
    snapshot(tmp_path / "vip.csv", ["u1", "u2"])
    snapshot(tmp_path / "churn.csv", ["u1", "u3", "u4"])
    config = configure(tmp_path, state_url, ["VIP", "Churn"])
    assert cli("run", "--config", str(config)).returncode == 0
    snapshot(tmp_path / "churn.csv", ["u1", "u3"])  # u4 left: not a member any more
    assert cli("run", "--config", str(config)).returncode == 0

    kept = cli("retire", "Churn", "--config", str(config))
    assert kept.returncode == 3 and "is still configured" in kept.stderr

    config = configure(tmp_path, state_url, ["VIP"])  # marketing dropped Churn
    run = cli("run", "--config", str(config), "--json")
    assert run.returncode == 0
    assert "`audience-sync retire churn`" in run.stderr
    assert "no longer in" in json.loads(run.stdout)["warnings"][0]

    plan = cli("retire", "Churn", "--config", str(config), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    [planned] = json.loads(plan.stdout)["audiences"]
    assert (planned["mode"], planned["status"], planned["pending"]) == ("retire", "planned", 2)
    assert falses(tmp_path, "churn") == ["u4"]  # the dry run sent nothing

    done = cli("retire", "Churn", "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(done.stdout)["audiences"]
    assert (result["mode"], result["status"], result["exited"], result["delivered"]) == (
        "retire",
        "succeeded",
        2,
        2,
    )
    assert sorted(falses(tmp_path, "churn")) == ["u1", "u3", "u4"]  # u1, u3 once each
    assert state(
        state_url,
        "select count(*) from sync_members m join sync_audiences a "
        "on a.id = m.audience_id where a.audience_key = 'churn'",
    ) == [(0,)]
    history = json.loads(cli("history", "--config", str(config), "--json").stdout)
    assert (history[0]["audience_key"], history[0]["mode"]) == ("churn", "retire")

    again = cli("retire", "churn", "--config", str(config))
    assert again.returncode == 2 and "retired already" in again.stderr
    quiet = cli("run", "--config", str(config))
    assert quiet.returncode == 0 and "retire" not in quiet.stderr
    unknown = cli("retire", "Nope", "--config", str(config))
    assert unknown.returncode == 2 and "no audience 'Nope'" in unknown.stderr

    # Configured again later, the audience starts over with an initial sync.
    config = configure(tmp_path, state_url, ["VIP", "Churn"])
    back = json.loads(cli("run", "--config", str(config), "--json").stdout)["audiences"]
    assert [(a["key"], a["mode"], a["entered"]) for a in back] == [
        ("vip", "incremental", 0),
        ("churn", "initial", 2),
    ]


def stop_once_delivering(
    stop: threading.Event,
) -> Callable[[str, str | None, int, int | None], None]:
    """A progress callback that asks the run to stop once some users are confirmed."""

    def progress(phase: str, _audience: str | None, done: int, _total: int | None) -> None:
        if phase == "delivering" and done > 0:
            stop.set()

    return progress


def test_a_stopped_retire_is_finished_by_the_next(tmp_path: Path, state_url: str):
    users = [f"u{i}" for i in range(7)]
    snapshot(tmp_path / "old.csv", users)
    snapshot(tmp_path / "vip.csv", ["u0"])
    config = configure(tmp_path, state_url, ["VIP", "Old"])
    assert cli("run", "--config", str(config)).returncode == 0
    config = configure(tmp_path, state_url, ["VIP"])

    stop = threading.Event()
    result = retire(
        load_config(config), "Old", should_stop=stop.is_set, progress=stop_once_delivering(stop)
    )
    [first] = result.audiences
    assert first.status is RunStatus.INTERRUPTED and result.exit_code == 5
    counts = first.counts
    assert 0 < counts["delivered"] < 7
    assert counts["delivered"] + counts["pending"] == 7  # counters add up
    assert len(falses(tmp_path, "old")) == counts["delivered"]

    finish = retire(load_config(config), "Old")
    assert finish.exit_code == 0
    assert finish.audiences[0].counts["delivered"] == 7 - counts["delivered"]
    assert sorted(falses(tmp_path, "old")) == users  # each member exactly once
    modes = state(state_url, "select mode, status from sync_runs order by id")
    assert modes[-2:] == [("retire", "interrupted"), ("retire", "succeeded")]


@pytest.mark.timeout(300)
def test_retire_against_crisp_within_the_quota(tmp_path: Path, state_url: str, crisp: CrispServer):
    """Crisp: one data update per member, the quota stops it, the next retire finishes it."""
    old = [f"u{i}" for i in range(6)]
    snapshot(tmp_path / "old.csv", old, email=True)
    snapshot(tmp_path / "vip.csv", ["u0"], email=True)
    config = configure(tmp_path, state_url, ["VIP", "Old"], crisp_destination(crisp))
    first = cli("run", "--config", str(config), env=crisp_env())
    assert first.returncode == 0, first.stdout + first.stderr
    used = crisp.quota_used  # 6 creates + 6 data updates

    crisp.reset_counts()
    tight = crisp_destination(crisp, daily_request_budget=used + 3)
    config = configure(tmp_path, state_url, ["VIP"], tight)
    partial = cli("retire", "Old", "--config", str(config), "--json", env=crisp_env())
    assert partial.returncode == 5, partial.stdout + partial.stderr
    [stopped] = json.loads(partial.stdout)["audiences"]
    assert stopped["status"] == "partial" and "daily_request_budget" in stopped["error"]
    assert 0 < stopped["delivered"] < 6
    assert stopped["delivered"] + stopped["pending"] == 6

    config = configure(tmp_path, state_url, ["VIP"], crisp_destination(crisp))
    done = cli("retire", "Old", "--config", str(config), "--json", env=crisp_env())
    assert done.returncode == 0, done.stdout + done.stderr
    patched = Counter(r.path for r in crisp.requests if r.method == "PATCH")
    assert len(patched) == 6 and set(patched.values()) == {1}  # no member was sent twice
    assert crisp.count() == 6  # no lookups, no creates: the state knows every profile
    for user in old:
        profile = crisp.profile_by_email(f"{user}@example.com")
        assert profile is not None
        assert profile["data"]["old"] is False
    assert crisp.profile_by_email("u0@example.com")["data"]["vip"] is True  # type: ignore[index]
