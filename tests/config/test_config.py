"""Tests for audience_sync.config: TOML in, typed objects out, or an error naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from audience_sync.config import STATE_URL_ENV, AudienceConfig, Config, load_config
from audience_sync.destinations.jsonl import JsonlSettings
from audience_sync.errors import ConfigError

STATE = "sqlite:///state.db"


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "members.csv"
    path.write_text("user_id,email\n007,a@example.com\n", encoding="utf-8")
    return path


def config_file(tmp_path: Path, *audiences: dict[str, Any], **kwargs: Any) -> Path:
    return write_config(
        tmp_path / "audience-sync.toml",
        state_url=kwargs.pop("state_url", STATE),
        audiences=list(audiences) or [{"name": "VIP", "source": "members.csv"}],
        **kwargs,
    )


def config_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env=env or {})
    assert excinfo.value.exit_code == 3
    message = str(excinfo.value)
    assert str(path) in message, message  # every config error names the file
    return message


# --- a valid file ----------------------------------------------------------------------------


def test_valid_file_loads_into_typed_objects(tmp_path: Path, snapshot: Path) -> None:
    sub = tmp_path / "exports"
    sub.mkdir()
    (sub / "buyers.parquet").write_bytes(b"not read at config time")
    path = config_file(
        tmp_path,
        {"name": "Order Completed Last 30days", "source": "members.csv", "schedule": "0 */3 * * *"},
        {"name": "Big Spenders", "key": "vip_2024", "source": "exports/buyers.parquet"},
        {
            "name": "From SQL",
            "query": "select user_id from users",
            "source_url": "sqlite:///warehouse.db",
        },
        destination={"type": "jsonl", "path": "out/identify.jsonl", "space_id": "spa_test"},
    )
    config = load_config(path, env={})

    assert isinstance(config, Config)
    assert config.path == path
    assert config.config_dir == tmp_path
    assert config.state.url == f"sqlite:///{tmp_path / 'state.db'}"  # beside the config file
    assert config.destination.type == "jsonl"
    assert config.destination.name == "jsonl"
    assert isinstance(config.destination.settings, JsonlSettings)
    assert config.destination.settings.path == Path("out/identify.jsonl")
    assert config.destination.settings.space_id == "spa_test"

    order, spenders, sql = config.audiences
    assert all(isinstance(a, AudienceConfig) for a in config.audiences)
    assert order.trait_key == "order_completed_last_30days"  # from the name
    assert order.key is None
    assert order.schedule == "0 */3 * * *"
    assert order.source == tmp_path / "members.csv"  # relative to the config file's folder
    assert order.source_label == str(tmp_path / "members.csv")
    assert spenders.trait_key == "vip_2024"  # the explicit key wins over the name
    assert spenders.source == sub / "buyers.parquet"
    assert sql.source is None
    assert sql.query == "select user_id from users"
    assert sql.source_url == f"sqlite:///{tmp_path / 'warehouse.db'}"
    assert sql.source_label == "SQL query"


def test_relative_source_resolves_against_config_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "members.csv").write_text("user_id\n1\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(
        conf_dir / "a.toml",
        state_url=STATE,
        audiences=[{"name": "VIP", "source": "members.csv"}],
    )
    (audience,) = load_config(path, env={}).audiences
    assert audience.source == conf_dir / "members.csv"
    assert audience.source is not None and audience.source.is_file()


def test_absolute_source_is_kept(tmp_path: Path, snapshot: Path) -> None:
    other = tmp_path / "conf"
    other.mkdir()
    path = write_config(
        other / "a.toml", state_url=STATE, audiences=[{"name": "VIP", "source": str(snapshot)}]
    )
    assert load_config(path, env={}).audiences[0].source == snapshot


def test_defaults_when_state_table_is_absent(tmp_path: Path, snapshot: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[destination]\ntype = "jsonl"\n\n[[audiences]]\nname = "VIP"\nsource = "members.csv"\n',
        encoding="utf-8",
    )
    config = load_config(path, env={})
    assert config.state.url == f"sqlite:///{tmp_path / 'audience_sync.db'}"
    assert config.state.change_log is True


def test_env_overrides_state_url(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path)
    other = "postgresql+psycopg://sync@db.internal/audiences"
    assert load_config(path, env={STATE_URL_ENV: other}).state.url == other
    beside = f"sqlite:///{tmp_path / 'state.db'}"
    assert load_config(path, env={}).state.url == beside
    assert load_config(path, env={STATE_URL_ENV: ""}).state.url == beside  # empty = unset


def test_env_is_read_from_os_environ_by_default(
    tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv(STATE_URL_ENV, "sqlite:///from-env.db")
    assert load_config(path).state.url == "sqlite:///from-env.db"


def test_passwords_in_urls_stay_out_of_repr(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {
            "name": "From SQL",
            "query": "select user_id from users",
            "source_url": "postgresql+psycopg://reader:hunter2-source@wh/db",
        },
    )
    config = load_config(
        path, env={STATE_URL_ENV: "postgresql+psycopg://sync:hunter2-state@db/state"}
    )
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.audiences)
    # ... but the values themselves are intact for the code that connects.
    assert config.state.url.endswith("hunter2-state@db/state")
    assert config.audiences[0].source_url == "postgresql+psycopg://reader:hunter2-source@wh/db"


# --- unknown and missing keys ----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path, snapshot: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        'audiencez = 1\n[destination]\ntype = "jsonl"\n'
        '[[audiences]]\nname = "VIP"\nsource = "members.csv"\n',
        encoding="utf-8",
    )
    message = config_error(path)
    assert "audiencez: unknown key" in message


def test_unknown_key_in_state(tmp_path: Path, snapshot: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[state]\nurll = "sqlite://"\n[destination]\ntype = "jsonl"\n'
        '[[audiences]]\nname = "VIP"\nsource = "members.csv"\n',
        encoding="utf-8",
    )
    assert "state.urll: unknown key" in config_error(path)


def test_unknown_key_in_audience_names_the_audience(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "VIP", "source": "members.csv"},
        {"name": "Churned", "source": "members.csv", "shedule": "0 * * * *"},
    )
    message = config_error(path)
    assert "audiences[1].shedule (audience 'Churned'): unknown key" in message


def test_unknown_key_in_destination(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"type": "jsonl", "pth": "out.jsonl"})
    assert "destination.pth: unknown key" in config_error(path)


def test_missing_audience_name(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, {"source": "members.csv"})
    assert "audiences[0].name: missing required key" in config_error(path)


def test_missing_source_and_query(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"name": "VIP", "schedule": "0 * * * *"})
    message = config_error(path)
    assert "audiences[0] (audience 'VIP')" in message
    assert "missing `source`" in message
    assert "`query` + `source_url`" in message


def test_missing_audiences(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[destination]\ntype = "jsonl"\n', encoding="utf-8")
    # A config of computed traits only is fine; one with neither is not.
    assert "no [[audiences]] or [[computed_traits]]" in config_error(path)


def test_missing_destination_table(tmp_path: Path, snapshot: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[[audiences]]\nname = "VIP"\nsource = "members.csv"\n', encoding="utf-8")
    assert "destination: missing required key" in config_error(path)


def test_missing_destination_type(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"path": "out.jsonl"})
    message = config_error(path)
    assert "destination.type: missing required key" in message
    assert "jsonl" in message  # lists the kinds to choose from


def test_unknown_destination_type(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"type": "segment"})
    message = config_error(path)
    assert "destination.type: unknown destination 'segment'" in message
    assert "'jsonl'" in message


def test_empty_destination_name(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"type": "jsonl", "name": "  "})
    assert "destination.name: must be a non-empty string" in config_error(path)


def test_wrong_value_type_names_the_key(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"type": "jsonl", "flush_every": "lots"})
    assert "destination.flush_every:" in config_error(path)


def test_a_jsonl_destination_must_flush_at_least_one_user(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, destination={"type": "jsonl", "flush_every": 0})
    assert "destination.flush_every: Input should be greater than or equal to 1" in config_error(
        path
    )


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "detail"),
    [
        ("0 */3 * *", "got 4, expected 5"),
        ("0 0 */3 * * *", "got 6, expected 5"),
        ("61 * * * *", "61"),
        ("every day", "expected 5 fields"),
    ],
)
def test_bad_cron(tmp_path: Path, snapshot: Path, schedule: str, detail: str) -> None:
    path = config_file(tmp_path, {"name": "VIP", "source": "members.csv", "schedule": schedule})
    message = config_error(path)
    assert f"audiences[0].schedule (audience 'VIP'): {schedule!r} is not a valid cron" in message
    assert detail in message


def test_same_trait_key_from_two_names(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "Order Completed", "source": "members.csv"},
        {"name": "order-completed", "source": "members.csv"},
    )
    message = config_error(path)
    assert "audiences[1] (audience 'order-completed')" in message
    assert "trait key 'order_completed' is already used by audience 'Order Completed'" in message
    assert "explicit `key`" in message


def test_same_trait_key_from_explicit_key(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "VIP", "source": "members.csv"},
        {"name": "Big Spenders", "key": "vip", "source": "members.csv"},
    )
    message = config_error(path)
    assert "audiences[1] (audience 'Big Spenders')" in message
    assert "trait key 'vip' is already used by audience 'VIP'" in message


def test_explicit_key_resolves_a_name_collision(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "Order Completed", "source": "members.csv"},
        {"name": "order-completed", "key": "order_completed_v2", "source": "members.csv"},
    )
    keys = [a.trait_key for a in load_config(path, env={}).audiences]
    assert keys == ["order_completed", "order_completed_v2"]


def test_same_name_twice(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "VIP", "source": "members.csv"},
        {"name": "VIP", "key": "vip_2", "source": "members.csv"},
    )
    assert "audiences[1].name: audience name 'VIP' is used twice" in config_error(path)


def test_missing_source_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"name": "VIP", "source": "exports/nope.csv"})
    message = config_error(path)
    assert "audiences[0].source (audience 'VIP')" in message
    assert f"{tmp_path / 'exports' / 'nope.csv'} does not exist" in message


def test_source_that_is_not_a_readable_file(tmp_path: Path) -> None:
    # A folder stands in for an unreadable file: permissions do not stop root, who runs CI here.
    (tmp_path / "members.csv").mkdir()
    path = config_file(tmp_path, {"name": "VIP", "source": "members.csv"})
    message = config_error(path)
    assert "audiences[0].source (audience 'VIP')" in message
    assert "is not a readable file" in message


def test_source_with_another_extension(tmp_path: Path) -> None:
    (tmp_path / "members.xlsx").write_bytes(b"")
    path = config_file(tmp_path, {"name": "VIP", "source": "members.xlsx"})
    assert "must end in .csv or .parquet" in config_error(path)


@pytest.mark.parametrize("key", ["VIP", "vip-list", "_vip", "vip__list", "vip_", "", "vip\n"])
def test_invalid_explicit_key(tmp_path: Path, snapshot: Path, key: str) -> None:
    path = tmp_path / "a.toml"
    toml_key = key.replace("\n", "\\n")  # a TOML escape, not a raw line break
    path.write_text(
        f'[destination]\ntype = "jsonl"\n[[audiences]]\nname = "VIP"\nkey = "{toml_key}"\n'
        'source = "members.csv"\n',
        encoding="utf-8",
    )
    message = config_error(path)
    assert "audiences[0].key (audience 'VIP')" in message
    assert f"{key!r} is not a valid trait key" in message


def test_name_without_ascii_needs_explicit_key(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(tmp_path, {"name": "🎉", "source": "members.csv"})
    message = config_error(path)
    assert "audiences[0] (audience '🎉')" in message
    assert "set an explicit `key`" in message

    path = config_file(tmp_path, {"name": "🎉", "key": "party", "source": "members.csv"})
    assert load_config(path, env={}).audiences[0].trait_key == "party"


def test_query_without_source_url(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"name": "VIP", "query": "select user_id from vip"})
    message = config_error(path)
    assert "audiences[0] (audience 'VIP')" in message
    assert "`query` needs `source_url`" in message


def test_source_url_without_query(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"name": "VIP", "source_url": "sqlite:///w.db"})
    assert "`source_url` needs `query`" in config_error(path)


def test_source_and_query_together(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {
            "name": "VIP",
            "source": "members.csv",
            "query": "select 1",
            "source_url": "sqlite:///w.db",
        },
    )
    assert "give either `source` (a file) or `query` + `source_url`, not both" in config_error(path)


def test_error_message_never_shows_source_url_password(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {
            "name": "VIP",
            "source": "members.csv",
            "query": "select 1",
            "source_url": "postgresql://u:hunter2@h/db",
        },
    )
    assert "hunter2" not in config_error(path)


# --- files that are not a config -----------------------------------------------------------


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[destination\ntype = jsonl\n", encoding="utf-8")
    message = config_error(path)
    assert "not valid TOML" in message
    assert "line 1" in message


def test_binary_file_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    assert "not a UTF-8 text file" in config_error(path)


def test_missing_config_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.toml")
    assert "config file not found" in message
    assert "--config" in message


def test_config_path_is_a_folder(tmp_path: Path) -> None:
    assert "cannot read config file" in config_error(tmp_path)


# --- select --------------------------------------------------------------------------------


def test_select_by_name_and_by_key(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "Order Completed", "source": "members.csv"},
        {"name": "Big Spenders", "key": "vip", "source": "members.csv"},
        {"name": "Churned", "source": "members.csv"},
    )
    config = load_config(path, env={})
    assert config.select([]) == config.audiences
    assert [a.name for a in config.select(["Big Spenders"])] == ["Big Spenders"]
    assert [a.name for a in config.select(["vip"])] == ["Big Spenders"]
    assert [a.name for a in config.select(["order_completed"])] == ["Order Completed"]
    # Config order, each audience once, whatever order and aliases were asked for.
    selected = config.select(["churned", "vip", "Order Completed", "Big Spenders"])
    assert [a.name for a in selected] == ["Order Completed", "Big Spenders", "Churned"]


def test_select_unknown_name_lists_configured_audiences(tmp_path: Path, snapshot: Path) -> None:
    path = config_file(
        tmp_path,
        {"name": "Order Completed", "source": "members.csv"},
        {"name": "Churned", "source": "members.csv"},
    )
    config = load_config(path, env={})
    with pytest.raises(ConfigError) as excinfo:
        config.select(["Churned", "Big Spenders"])
    message = str(excinfo.value)
    assert str(path) in message
    assert "no audience named 'Big Spenders'" in message
    assert "configured audiences: 'Order Completed', 'Churned'" in message


def test_state_table_values_are_typed(tmp_path: Path, snapshot: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[state]\nurl = "sqlite:///s.db"\nchange_log = false\nauto_migrate = false\n'
        '[destination]\ntype = "jsonl"\n[[audiences]]\nname = "VIP"\nsource = "members.csv"\n',
        encoding="utf-8",
    )
    state = load_config(path, env={}).state
    assert (state.url, state.change_log, state.auto_migrate) == (
        f"sqlite:///{tmp_path / 's.db'}",
        False,
        False,
    )

    path.write_text(path.read_text(encoding="utf-8").replace("false", '"maybe"', 1), "utf-8")
    assert "state.change_log:" in config_error(path)
