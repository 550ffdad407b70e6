"""Issue 11: computed traits, a value per user sent only when it changes, beside audiences.

On SQLite and PostgreSQL (``state_url``): value equality across spellings and formats, clears,
rejected values held, the change log's old and new values, the retry queue, Crisp's one data
``PATCH`` per user and its clears, and a property test that every run sends exactly the users
whose canonical value differs from the state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from conftest import cli, crisp_destination, crisp_env, kill_when_written, read_jsonl, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recording_destination import BatchRecordingDestination, RecordingDestination

from audience_sync import load_config, sync
from audience_sync.errors import ConfigError
from audience_sync.history import user_changes
from audience_sync.model import RunMode
from audience_sync.state import StateStore, connect

# -- helpers ---------------------------------------------------------------------------------


def state_values(url: str, key: str = "ltv") -> dict[str, Any]:
    """user_id -> the value the state holds (parsed JSON) for trait ``key``."""
    engine = connect(url)
    try:
        store = StateStore(engine)
        ref = store.find_audience("jsonl", key) or store.find_audience("recording", key)
        if ref is None:
            return {}
        ids, values = store.values(ref.id)
        return {u: json.loads(v) for u, v in zip(ids.tolist(), values.to_pylist(), strict=True)}
    finally:
        engine.dispose()


def trait_config(
    tmp_path: Path, url: str, *, source: str = "ltv.csv", extra: str = "", **options: Any
) -> Path:
    return write_config(
        tmp_path / "audience-sync.toml",
        state_url=url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        computed_traits=[
            {"name": "Lifetime Value", "key": "ltv", "source": source, "column": "value", **options}
        ],
        extra=extra,
    )


# -- the walk-through: day 1, a repeat, day 2 (JSONL) -----------------------------------------


def test_day_one_repeat_and_day_two_send_only_changed_values(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id,email\nu1,a@x.io\n")
    (tmp_path / "ltv.csv").write_text(
        "user_id,email,value\nu1,a@x.io,523.4\nu2,b@x.io,112\nu3,c@x.io,\nu4,d@x.io,gold\n"
    )
    config = load_config(trait_config(tmp_path, state_url))
    out = tmp_path / "out.jsonl"

    first = sync(config)
    assert first.exit_code == 0
    sent = [m for m in read_jsonl(out) if "ltv" in m["traits"]]
    assert {m["userId"]: m["traits"]["ltv"] for m in sent} == {
        "u1": 523.4,
        "u2": 112,
        "u4": "gold",
    }
    personas = sent[0]["context"]["personas"]
    assert personas["computation_class"] == "trait"
    assert personas["computation_key"] == "ltv"
    assert personas["computation_id"].startswith("tra_")
    assert sent[0]["traits"]["email"] == "a@x.io"
    audience = next(m for m in read_jsonl(out) if "vip" in m["traits"])
    assert audience["context"]["personas"]["computation_class"] == "audience"

    # The same values spelt differently, and a stable snapshot: nothing is sent.
    (tmp_path / "ltv.csv").write_text(
        "user_id,email,value\nu1,a@x.io,523.40\nu2,b@x.io,112.0\nu3,c@x.io, \nu4,d@x.io, gold\n"
    )
    before = len(read_jsonl(out))
    repeat = sync(config)
    assert repeat.exit_code == 0 and len(read_jsonl(out)) == before
    trait = next(a for a in repeat.audiences if a.audience.trait_key == "ltv")
    assert (trait.counts["entered"], trait.counts["exited"], trait.counts["unchanged"]) == (0, 0, 3)

    # Day 2: u1 changed, u3 appeared, u4 disappeared (cleared), u2 unchanged.
    (tmp_path / "ltv.csv").write_text("user_id,email,value\nu1,a@x.io,600\nu2,,112\nu3,,7\n")
    day2 = sync(config)
    assert day2.exit_code == 0
    new = read_jsonl(out)[before:]
    assert {m["userId"]: m["traits"]["ltv"] for m in new} == {"u1": 600, "u3": 7, "u4": None}
    assert state_values(state_url) == {"u1": 600, "u2": 112, "u3": 7}

    # The change log keeps each trait change's value before and after.
    engine = connect(state_url)
    try:
        changes = user_changes(StateStore(engine), "u1")
        cleared = user_changes(StateStore(engine), "u4")
    finally:
        engine.dispose()
    assert [c["value"] for c in changes if c["trait_key"] == "ltv"] == ["600 (was 523.4)", "523.4"]
    assert cleared[0]["value"] == 'cleared (was "gold")'
    shown = cli("history", "--user", "u1", "--config", str(config.path))
    assert shown.returncode == 0 and "600 (was 523.4)" in shown.stdout


def test_csv_and_parquet_values_compare_by_value(tmp_path: Path, state_url: str):
    """Text ``112`` and ``112.0`` from a CSV and a float ``112.0`` from Parquet are one value;
    switching formats between runs re-sends nobody whose value is the same."""
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,112\nu2,0.5\nu3,true\nu4,2024-05-01\n")
    config = load_config(trait_config(tmp_path, state_url))
    assert sync(config).exit_code == 0
    assert state_values(state_url) == {"u1": 112, "u2": 0.5, "u3": True, "u4": "2024-05-01"}

    pq.write_table(
        pa.table({"user_id": ["u1", "u2"], "value": pa.array([112.0, 0.5], pa.float64())}),
        tmp_path / "a.parquet",
    )
    pq.write_table(pa.table({"user_id": ["u3"], "value": pa.array([True])}), tmp_path / "b.parquet")
    import datetime as dt

    pq.write_table(
        pa.table({"user_id": ["u4"], "value": pa.array([dt.date(2024, 5, 1)])}),
        tmp_path / "c.parquet",
    )
    # One Parquet file per type, merged by three traits would be another test; here the CSV is
    # rewritten from the Parquet values and must still match what was sent.
    parquet = write_config(
        tmp_path / "p.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        computed_traits=[
            {"name": "Lifetime Value", "key": "ltv", "source": "a.parquet", "column": "value"}
        ],
    )
    out = tmp_path / "out.jsonl"
    before = len(read_jsonl(out))
    result = sync(load_config(parquet))
    assert result.exit_code == 0
    # u1 and u2 unchanged (float 112.0 == text 112); u3 and u4 are not in this file: cleared.
    assert {m["userId"]: m["traits"]["ltv"] for m in read_jsonl(out)[before:]} == {
        "u3": None,
        "u4": None,
    }
    assert state_values(state_url) == {"u1": 112, "u2": 0.5}


def test_rejected_values_are_reported_with_row_numbers_and_held(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,1\nu2,2\nu3,3\nu4,4\n")
    config = load_config(trait_config(tmp_path, state_url, type="number"))
    assert sync(config).exit_code == 0
    # u1 NaN, u2 not a number, u3 conflicting duplicate: all held (neither changed nor
    # cleared); u4 changes; u5 is new.
    (tmp_path / "ltv.csv").write_text(
        "user_id,value\nu1,NaN\nu2,lots\nu3,30\nu3,31\nu4,40\nu5,50\n"
    )
    out = tmp_path / "out.jsonl"
    before = len(read_jsonl(out))
    result = sync(config)
    trait = next(a for a in result.audiences if a.audience.trait_key == "ltv")
    assert result.exit_code == 4 and trait.status.value == "partial"
    reasons = {(r.row, r.user_id): r.reason for r in trait.rejected}
    assert "is not a finite number" in reasons[(1, "u1")]
    assert "'lots' is not a number" in reasons[(2, "u2")]
    assert "conflicting duplicate" in reasons[(3, "u3")] and (4, "u3") in reasons
    assert {m["userId"]: m["traits"]["ltv"] for m in read_jsonl(out)[before:]} == {
        "u4": 40,
        "u5": 50,
    }
    assert state_values(state_url) == {"u1": 1, "u2": 2, "u3": 3, "u4": 40, "u5": 50}


def test_strings_are_compared_exactly_after_stripping_blanks(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text('user_id,value\nu1,Gold\nu2,"  silver "\nu3,01234\n')
    config = load_config(trait_config(tmp_path, state_url, type="string"))
    assert sync(config).exit_code == 0
    assert state_values(state_url) == {"u1": "Gold", "u2": "silver", "u3": "01234"}
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,gold\nu2,silver\nu3,01234\n")
    out = tmp_path / "out.jsonl"
    before = len(read_jsonl(out))
    assert sync(config).exit_code == 0
    assert {m["userId"]: m["traits"]["ltv"] for m in read_jsonl(out)[before:]} == {"u1": "gold"}


def test_full_resends_values_and_dry_run_shows_them(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,5\nu2,6\n")
    path = trait_config(tmp_path, state_url)
    config = load_config(path)
    assert sync(config).exit_code == 0
    dry = cli(
        "run", "--trait", "Lifetime Value", "--full", "--dry-run", "--json", "--config", str(path)
    )
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)["audiences"]
    assert [a["audience"] for a in planned] == ["Lifetime Value"]
    assert {s["user_id"]: s["ltv"] for s in planned[0]["sample"]} == {"u1": 5, "u2": 6}
    out = tmp_path / "out.jsonl"
    before = len(read_jsonl(out))
    assert sync(config, audiences=["ltv"], full=True).exit_code == 0
    assert sorted((m["userId"], m["traits"]["ltv"]) for m in read_jsonl(out)[before:]) == [
        ("u1", 5),
        ("u2", 6),
    ]


def test_max_exit_ratio_guards_clears(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,1\nu2,2\nu3,3\nu4,4\n")
    config = load_config(trait_config(tmp_path, state_url, max_exit_ratio=0.5))
    assert sync(config).exit_code == 0
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,1\n")  # 3 of 4 values cleared
    refused = sync(config)
    trait = next(a for a in refused.audiences if a.audience.trait_key == "ltv")
    assert trait.status.value == "failed" and "max_exit_ratio" in (trait.error or "")
    assert state_values(state_url) == {"u1": 1, "u2": 2, "u3": 3, "u4": 4}


def test_retire_clears_every_value(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,1\nu2,2\n")
    assert sync(load_config(trait_config(tmp_path, state_url))).exit_code == 0
    path = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    warned = cli("run", "--config", str(path))
    assert "computed trait 'Lifetime Value' (ltv) has values in the state" in warned.stderr
    retired = cli("retire", "ltv", "--config", str(path))
    assert retired.returncode == 0, retired.stderr
    cleared = [m for m in read_jsonl(tmp_path / "out.jsonl") if m["traits"].get("ltv", 0) is None]
    assert sorted(m["userId"] for m in cleared) == ["u1", "u2"]
    assert state_values(state_url) == {}


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trait", "message"),
    [
        ({"name": "VIP"}, "computed_traits[0].name: computed trait name 'VIP' is used twice"),
        ({"name": "Very Important"}, None),
        ({"name": "Spend", "key": "vip"}, "trait key 'vip' is already used by audience 'VIP'"),
        ({"name": "Email"}, "trait key 'email' is reserved"),
        ({"name": "Spend", "column": "user_id"}, "cannot be `user_id`"),
        ({"name": "Spend", "type": "money"}, "computed_traits[0].type (computed trait 'Spend')"),
    ],
)
def test_trait_configuration_errors_name_both_sides(
    tmp_path: Path, trait: dict[str, Any], message: str | None
):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    path = write_config(
        tmp_path / "c.toml",
        state_url=f"sqlite:///{tmp_path / 's.db'}",
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        computed_traits=[{"source": "vip.csv", **trait}],
    )
    if message is None:
        config = load_config(path)
        assert [a.trait_key for a in config.audiences] == ["vip", "very_important"]
        assert [a.trait_key for a in config.computed_traits] == ["very_important"]
        return
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert message in str(excinfo.value)


def test_a_key_cannot_change_kind_without_a_retire(tmp_path: Path, state_url: str):
    (tmp_path / "vip.csv").write_text("user_id,value\nu1,1\n")
    audience = write_config(
        tmp_path / "a.toml", state_url=state_url, audiences=[{"name": "VIP", "source": "vip.csv"}]
    )
    assert sync(load_config(audience)).exit_code == 0
    trait = write_config(
        tmp_path / "a.toml",
        state_url=state_url,
        audiences=[],
        computed_traits=[{"name": "VIP", "source": "vip.csv", "column": "value"}],
    )
    planned = sync(load_config(trait), dry_run=True)
    result = sync(load_config(trait))
    assert result.exit_code == 3
    assert "was synced to 'jsonl' as an audience" in (result.audiences[0].error or "")
    # The mode is the key's real one (its audience succeeded once), as the dry run says.
    assert result.audiences[0].mode is planned.audiences[0].mode is RunMode.INCREMENTAL


# -- Crisp: one data PATCH per user, clears -------------------------------------------------------


def test_crisp_gets_audience_and_trait_changes_in_one_patch(
    tmp_path: Path, crisp: Any, state_url: str
):
    (tmp_path / "vip.csv").write_text("user_id,email\nu1,a@x.io\n")
    (tmp_path / "ltv.csv").write_text("user_id,email,value\nu1,a@x.io,10\nu2,b@x.io,gold\n")
    url = state_url
    path = write_config(
        tmp_path / "c.toml",
        state_url=url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        computed_traits=[{"name": "LTV", "source": "ltv.csv", "column": "value"}],
        destination=crisp_destination(crisp),
    )
    env = crisp_env()
    first = cli("run", "--config", str(path), env=env)
    assert first.returncode == 0, first.stderr
    data = {p["email"]: p["data"] for p in crisp.profiles.values()}
    assert data == {"a@x.io": {"vip": True, "ltv": 10}, "b@x.io": {"ltv": "gold"}}
    # One data PATCH per user, carrying the audience's and the trait's keys together.
    patches = [r for r in crisp.requests if r.method == "PATCH" and "/people/data/" in r.path]
    assert sorted(sorted(r.body["data"]) for r in patches) == [["ltv"], ["ltv", "vip"]]

    # Day 2: u1 leaves VIP and their value changes; u2's value disappears.
    (tmp_path / "vip.csv").write_text("user_id,email\n")
    (tmp_path / "ltv.csv").write_text("user_id,email,value\nu1,a@x.io,11\n")
    mark = len(crisp.requests)
    second = cli("run", "--config", str(path), "--force", env=env)
    assert second.returncode == 0, second.stderr
    writes = [r for r in crisp.requests[mark:] if r.method != "GET" and r.method != "HEAD"]
    by_profile: dict[str, list[Any]] = {}
    for r in writes:
        by_profile.setdefault(r.path.rsplit("/", 1)[-1], []).append(r.body)
    assert sorted(len(b) for b in by_profile.values()) == [1, 1]  # one request per user
    data = {p["email"]: p["data"] for p in crisp.profiles.values()}
    # A clear is an empty string by default: the key stays, blank; other keys are untouched.
    assert data == {"a@x.io": {"vip": False, "ltv": 11}, "b@x.io": {"ltv": ""}}


@pytest.mark.parametrize("accepts_null", [True, False])
def test_crisp_clear_with_null(tmp_path: Path, accepts_null: bool):
    from conftest import CRISP_IDENTIFIER, CRISP_KEY, CRISP_WEBSITE
    from crisp_server import CrispServer

    with CrispServer(
        website_id=CRISP_WEBSITE,
        identifier=CRISP_IDENTIFIER,
        key=CRISP_KEY,
        tier="plugin",
        null_removes_data=accepts_null,
    ) as server:
        (tmp_path / "ltv.csv").write_text("user_id,email,value\nu1,a@x.io,10\n")
        path = write_config(
            tmp_path / "c.toml",
            state_url=f"sqlite:///{tmp_path / 's.db'}",
            audiences=[],
            computed_traits=[{"name": "LTV", "source": "ltv.csv", "column": "value"}],
            destination={**crisp_destination(server), "clear_with": "null"},
        )
        assert cli("run", "--config", str(path), env=crisp_env()).returncode == 0
        server.profiles[next(iter(server.profiles))]["data"]["other_tool"] = "kept"
        (tmp_path / "ltv.csv").write_text("user_id,email,value\n")
        cleared = cli("run", "--config", str(path), "--force", env=crisp_env())
        profile = next(iter(server.profiles.values()))
        if accepts_null:
            assert cleared.returncode == 0, cleared.stderr
            assert profile["data"] == {"other_tool": "kept"}
        else:
            # Refused: the user fails with Crisp's answer and the value stays in the state.
            assert cleared.returncode == 5
            assert profile["data"] == {"ltv": 10, "other_tool": "kept"}
            failed = cli("history", "--failed", "--config", str(path), "--json")
            rows = json.loads(failed.stdout)
            assert rows[0]["user_id"] == "u1" and "invalid_data" in rows[0]["reason"]
            assert rows[0]["value"] == "null"


def test_check_names_a_missing_value_column(tmp_path: Path):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,ltv\nu1,5\n")
    path = trait_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}")  # column = "value"
    checked = cli("check", "--offline", "--config", str(path))
    assert checked.returncode != 0
    assert "no `value` column for the computed trait's values" in checked.stdout + checked.stderr
    assert "'user_id', 'ltv'" in checked.stdout + checked.stderr


# -- kill -9 mid-run -------------------------------------------------------------------------------


def test_kill_9_mid_trait_run_loses_nothing(tmp_path: Path, state_url: str):
    users = [f"user-{i:06d}" for i in range(40_000)]
    (tmp_path / "vip.csv").write_text("user_id\n")
    (tmp_path / "ltv.csv").write_text(
        "user_id,value\n" + "\n".join(f"{u},{i % 97}.5" for i, u in enumerate(users)) + "\n"
    )
    out = tmp_path / "out.jsonl"
    path = trait_config(tmp_path, state_url)
    text = path.read_text().replace('path = "out.jsonl"', 'path = "out.jsonl"\nflush_every = 20')
    path.write_text(text)
    killed_at = kill_when_written(path, out)
    assert 0 < killed_at < len(users), "the kill should land mid-run"
    finish = cli("run", "--config", str(path), "--json", timeout=900)
    assert finish.returncode == 0, finish.stderr
    sent = [(m["userId"], m["traits"]["ltv"]) for m in read_jsonl(out)]
    assert {u for u, _ in sent} == set(users)
    assert len(sent) - len(set(sent)) <= 1000 + 20  # at most one uncommitted window again
    expected = {u: (i % 97) + 0.5 for i, u in enumerate(users)}
    assert all(expected[u] == v for u, v in sent)
    assert state_values(state_url) == expected


# -- the property: exactly the users whose canonical value differs are sent ----------------------

# Values and their canonical form: spellings of one number, booleans, strings, no value.
_SPELLINGS: dict[str, Any] = {
    "1": 1,
    "1.0": 1,
    "1e0": 1,
    "2.5": 2.5,
    "2.50": 2.5,
    "true": True,
    "TRUE": True,
    "false": False,
    "gold": "gold",
    " gold ": "gold",
    "Gold": "Gold",
    "": None,
}
_USERS = [f"u{i}" for i in range(6)]
_snapshot = st.dictionaries(st.sampled_from(_USERS), st.sampled_from(sorted(_SPELLINGS)))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(days=st.lists(_snapshot, min_size=1, max_size=4), batches=st.booleans())
def test_each_run_sends_exactly_the_changed_values(
    tmp_path_factory: pytest.TempPathFactory,
    state_url: str,
    days: list[dict[str, str]],
    batches: bool,
):
    tmp_path = tmp_path_factory.mktemp("prop")
    url = state_url
    if url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:  # a fresh schema per example: drop what an earlier example left
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            for table in ("sync_members", "sync_pending", "sync_changes", "sync_runs"):
                if sa.inspect(conn).has_table(table):
                    conn.execute(sa.text(f"DELETE FROM {table}"))
        engine.dispose()
    (tmp_path / "vip.csv").write_text("user_id\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\n")
    config = load_config(trait_config(tmp_path, url))
    state: dict[str, Any] = {}
    for day in days:
        (tmp_path / "ltv.csv").write_text(
            "user_id,value\n" + "".join(f'{u},"{v}"\n' for u, v in day.items())
        )
        wanted = {u: _SPELLINGS[v] for u, v in day.items() if _SPELLINGS[v] is not None}
        dest: Any = BatchRecordingDestination() if batches else RecordingDestination()
        result = sync(config, destination=dest, audiences=["ltv"], force=True)
        assert result.exit_code == 0
        if batches:
            sent = {u: v for u, key, v in dest.sent() if key == "ltv"}
        else:
            sent = {u.user_id: u.traits["ltv"] for u in dest.updates}
        expected = {u: v for u, v in wanted.items() if u not in state or _differs(state[u], v)}
        expected |= {u: None for u in state if u not in wanted}
        assert _typed(sent) == _typed(expected)
        state = wanted
        got = state_values(url)
        assert _typed(got) == _typed(state)


def _differs(a: Any, b: Any) -> bool:
    return type(a) is not type(b) or a != b


def _typed(values: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Values with their JSON type, so ``True`` and ``1`` are told apart."""
    return {
        u: (
            type(v).__name__ if not isinstance(v, int | float) or isinstance(v, bool) else "number",
            v,
        )
        for u, v in values.items()
    }


@pytest.mark.parametrize(
    ("column", "value_type", "message"),
    [
        (pa.array([[1, 2]]), "auto", "column `value` has type list<element: int64>"),
        (pa.array([1.5]), "boolean", "with type = 'boolean'"),
        (pa.array([b"x"]), "auto", "column `value` has type binary"),
    ],
)
def test_a_column_that_cannot_hold_trait_values_fails_the_run_and_keeps_the_state(
    tmp_path: Path, state_url: str, column: pa.Array, value_type: str, message: str
):
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    (tmp_path / "ltv.csv").write_text("user_id,value\nu1,5\n")
    assert sync(load_config(trait_config(tmp_path, state_url))).exit_code == 0
    pq.write_table(pa.table({"user_id": ["u1"], "value": column}), tmp_path / "ltv.parquet")
    config = load_config(trait_config(tmp_path, state_url, source="ltv.parquet", type=value_type))
    result = sync(config)
    trait = next(a for a in result.audiences if a.audience.trait_key == "ltv")
    assert result.exit_code == 4 and trait.status.value == "failed"
    assert message in (trait.error or "")
    assert "ltv.parquet" in (trait.error or "")
    assert state_values(state_url) == {"u1": 5}
