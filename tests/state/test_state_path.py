"""The state database cannot silently re-send everyone (issue 13.1, 13.3).

A relative SQLite path is relative to the config file's folder, an old database left at the
working directory stops the run (exit 9), a dry run creates nothing, and a large initial sync
from an empty state to a destination that was synced before is refused unless ``--initial``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sqlalchemy as sa
from conftest import cli, read_jsonl, write_config, write_csv

from audience_sync import load_config
from audience_sync.destinations.crisp.destination import CrispDestination
from audience_sync.state import connect, upgrade


def members(path: Path, n: int) -> Path:
    return write_csv(path, "user_id\n" + "".join(f"u{i:04}\n" for i in range(n)))


def prod(folder: Path, *, url: str = "sqlite:///audience_sync.db", extra: str = "") -> Path:
    """A production-like config in ``folder``: relative state path, 5 + 3 members."""
    folder.mkdir(parents=True, exist_ok=True)
    members(folder / "vip.csv", 5)
    members(folder / "churn.csv", 3)
    return write_config(
        folder / "prod.toml",
        state_url=url,
        destination={"type": "jsonl", "path": "out/identify.jsonl"},
        audiences=[{"name": "VIP", "source": "vip.csv"}, {"name": "Churn", "source": "churn.csv"}],
        extra=extra,
    )


def sent(folder: Path) -> list[dict[str, object]]:
    return read_jsonl(folder / "out/identify.jsonl")


def test_relative_sqlite_state_follows_the_config_not_the_working_directory(tmp_path: Path):
    """The issue's scenario: `run --config /abs/path/prod.toml` from another directory."""
    etc, home, elsewhere = tmp_path / "etc", tmp_path / "home", tmp_path / "elsewhere"
    config = prod(etc)
    home.mkdir()
    elsewhere.mkdir()
    first = cli("run", "--config", str(config), cwd=home)
    assert first.returncode == 0, first.stderr
    assert (etc / "audience_sync.db").exists()
    assert not (home / "audience_sync.db").exists()
    assert len(sent(etc)) == 8

    # From anywhere else, the same state: an incremental run that sends nothing.
    dry = cli("run", "--config", str(config), "--dry-run", "--json", cwd=elsewhere)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)["audiences"]
    assert [(a["mode"], a["status"], a["pending"]) for a in planned] == [
        ("incremental", "planned", 0),
        ("incremental", "planned", 0),
    ]
    again = cli("run", "--config", str(config), "--json", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert [a["mode"] for a in json.loads(again.stdout)["audiences"]] == ["incremental"] * 2
    assert len(sent(etc)) == 8
    assert list(elsewhere.iterdir()) == []  # nothing was created in the working directory
    # Snapshot paths and the history follow the config the same way.
    history = cli("history", "--config", str(config), "--json", cwd=elsewhere)
    assert [r["mode"] for r in json.loads(history.stdout)] == ["incremental"] * 2 + ["initial"] * 2


def test_a_database_left_at_the_old_location_stops_every_command(tmp_path: Path):
    """Before 0.2 the path was relative to the working directory: say so, send nothing."""
    etc, home = tmp_path / "etc", tmp_path / "home"
    config = prod(etc)
    # Yesterday's run, made the old way: from `home`, whose audience_sync.db holds the state.
    old = prod(home, url=f"sqlite:///{home / 'audience_sync.db'}")
    assert cli("run", "--config", str(old)).returncode == 0
    assert (home / "audience_sync.db").exists()

    for command in (["run"], ["run", "--dry-run"], ["status"], ["history"]):
        moved = cli(*command, "--config", str(config), cwd=home)
        assert moved.returncode == 9, (command, moved.stdout, moved.stderr)
        assert "does not exist; but" in moved.stderr
        assert f"mv {home / 'audience_sync.db'} {etc / 'audience_sync.db'}" in moved.stderr
    assert not (etc / "audience_sync.db").exists()
    assert sent(etc) == []

    # The documented fix: move it next to the config; the next run is incremental.
    for f in home.glob("audience_sync.db*"):
        shutil.move(f, etc / f.name)
    shutil.copytree(home / "out", etc / "out")
    fixed = cli("run", "--config", str(config), "--json", cwd=home)
    assert fixed.returncode == 0, fixed.stderr
    assert [a["mode"] for a in json.loads(fixed.stdout)["audiences"]] == ["incremental"] * 2


def test_dry_run_creates_no_database(tmp_path: Path):
    config = prod(tmp_path / "etc")
    dry = cli("run", "--config", str(config), "--dry-run", "--json", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert [(a["mode"], a["status"], a["pending"]) for a in report["audiences"]] == [
        ("initial", "planned", 5),
        ("initial", "planned", 3),
    ]
    # Reading commands on a state that does not exist yet: nothing to show, nothing created.
    history = cli("history", "--config", str(config), "--json", cwd=tmp_path)
    assert (history.returncode, json.loads(history.stdout)) == (0, [])
    assert cli("history", "1", "--config", str(config)).returncode == 2
    assert cli("status", "--config", str(config)).returncode == 0
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == [
        "churn.csv",
        "prod.toml",
        "vip.csv",
    ]


def guarded(folder: Path, state_url: str, limit: int = 6) -> Path:
    return prod(folder, url=state_url, extra=f"\n[safeguards]\nmax_initial_sync = {limit}\n")


def test_initial_sync_from_an_empty_state_to_a_used_destination_is_refused(
    tmp_path: Path, state_url: str
):
    """The JSONL file shows earlier syncs; the state holds nothing: refuse 8 > 6 memberships."""
    config = guarded(tmp_path, state_url)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/identify.jsonl").write_text('{"type":"identify","userId":"u0000"}\n')

    dry = cli("run", "--config", str(config), "--dry-run", "--json")
    assert dry.returncode == 9, dry.stdout + dry.stderr
    report = json.loads(dry.stdout)
    assert [a["status"] for a in report["audiences"]] == ["refused", "refused"]
    assert "holds 37 bytes of earlier messages" in report["audiences"][0]["error"]
    table = cli("run", "--config", str(config), "--dry-run")
    assert "refused" in table.stdout and "--initial" in table.stdout

    refused = cli("run", "--config", str(config))
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert "initial sync of 8 memberships, more than [safeguards] max_initial_sync = 6" in (
        refused.stdout
    )
    assert len(sent(tmp_path)) == 1  # nothing was sent
    # Refused again next time: the refusal left no member and no delivered change behind.
    assert cli("run", "--config", str(config)).returncode == 9

    allowed = cli("run", "--config", str(config), "--initial", "--json")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert len(sent(tmp_path)) == 1 + 8
    history = json.loads(cli("history", "--config", str(config), "--json").stdout)
    assert [r["status"] for r in history] == ["succeeded"] * 2 + ["failed"] * 4


def test_the_guard_lets_a_first_sync_and_small_syncs_through(tmp_path: Path, state_url: str):
    config = guarded(tmp_path / "a", state_url, limit=6)
    first = cli("run", "--config", str(config))  # no earlier messages: a real first sync
    assert first.returncode == 0, first.stdout + first.stderr
    small = guarded(tmp_path / "b", state_url, limit=8)
    (tmp_path / "b/out").mkdir()
    (tmp_path / "b/out/identify.jsonl").write_text("{}\n")
    # Another destination name has no state; 8 memberships is within the limit.
    text = small.read_text().replace('type = "jsonl"', 'type = "jsonl"\nname = "second"')
    small.write_text(text)
    assert cli("run", "--config", str(small)).returncode == 0


def test_the_operator_can_mark_a_destination_as_synced_before(tmp_path: Path, state_url: str):
    config = prod(
        tmp_path,
        url=state_url,
        extra="\n[safeguards]\nmax_initial_sync = 2\ndestination_synced_before = true\n",
    )
    refused = cli("run", "--config", str(config), "--json")
    assert refused.returncode == 9
    assert "destination_synced_before = true" in json.loads(refused.stdout)["audiences"][0]["error"]
    assert cli("run", "--config", str(config), "--force").returncode == 0


def test_crisp_shows_earlier_syncs_from_its_own_tables(tmp_path: Path, state_url: str):
    members(tmp_path / "vip.csv", 1)
    config = load_config(
        write_config(
            tmp_path / "c.toml",
            state_url=state_url,
            destination={"type": "crisp", "website_id": "w1"},
            audiences=[{"name": "VIP", "source": "vip.csv"}],
        ),
        env={},
    )
    engine = connect(state_url)
    try:
        upgrade(engine)
        dest = CrispDestination(
            config.destination.settings, name="crisp:w1", state=engine, config_dir=tmp_path
        )
        assert dest.previous_sync() is None
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "insert into destination_requests (destination, day, used, updated_at) "
                    "values ('crisp:w1', '2026-11-30', 4200, '2026-11-30 10:00:00')"
                )
            )
        assert dest.previous_sync() == "destination_requests counts 4,200 requests made to it"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "insert into crisp_people (destination, user_id, people_id, updated_at) "
                    "values ('crisp:w1', 'u1', 'p1', '2026-11-30 10:00:00')"
                )
            )
        assert dest.previous_sync() == "crisp_people knows 1 of its profiles"
    finally:
        engine.dispose()


def test_dry_run_says_a_safeguard_would_refuse(tmp_path: Path, state_url: str):
    """13.3: the plan names the refusal and why; the JSON says `planned` like the table."""
    config = prod(tmp_path, url=state_url)
    assert cli("run", "--config", str(config)).returncode == 0
    members(tmp_path / "vip.csv", 1)  # 4 of 5 VIP members would be set to false
    dry = cli("run", "--config", str(config), "--dry-run", "--json")
    assert dry.returncode == 4, dry.stdout + dry.stderr
    vip, churn = json.loads(dry.stdout)["audiences"]
    assert (vip["status"], vip["exited"]) == ("refused", 4)
    assert "would set 4 of 5 current members (80%) to false" in vip["error"]
    assert (churn["status"], churn["error"]) == ("planned", None)
    table = cli("run", "--config", str(config), "--dry-run")
    assert "refused" in table.stdout and "more than max_exit_ratio" in table.stdout
    forced = cli("run", "--config", str(config), "--dry-run", "--force", "--json")
    assert [a["status"] for a in json.loads(forced.stdout)["audiences"]] == ["planned"] * 2
