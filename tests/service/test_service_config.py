"""The service's configuration: durations, intervals, time zones and safeguard limits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from conftest import write_config, write_csv

from audience_sync.config import load_config
from audience_sync.durations import format_duration, parse_duration
from audience_sync.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2s", timedelta(seconds=2)),
        ("2h", timedelta(hours=2)),
        ("1h30m", timedelta(minutes=90)),
        ("90d", timedelta(days=90)),
        ("0.5s", timedelta(milliseconds=500)),
        ("2W", timedelta(weeks=2)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "2", "h", "2 hours", "2h3", "0s", "-1h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(hours=26, seconds=5)) == "1d2h5s"
    assert format_duration(timedelta(0)) == "0s"


def config(tmp_path: Path, extra: str = "", **audience: object) -> Path:
    write_csv(tmp_path / "a.csv", "user_id\nu1\n")
    return write_config(
        tmp_path / "c.toml",
        state_url="sqlite:///x.db",
        audiences=[{"name": "Aud A", "source": "a.csv", **audience}],
        extra=extra,
    )


def test_service_defaults_and_settings(tmp_path: Path) -> None:
    defaults = load_config(config(tmp_path))
    assert defaults.service.timezone == "UTC"
    assert defaults.service.lock_ttl == timedelta(seconds=60)
    assert defaults.safeguards.max_exit_ratio == 0.5
    assert defaults.service.metrics_textfile is None
    loaded = load_config(
        config(
            tmp_path,
            extra='\n[service]\ntimezone = "Europe/Paris"\nlock_ttl = "2m"\nmisfire_grace = 600\n'
            'metrics_textfile = "metrics/a.prom"\n',
            interval="2h",
            max_exit_ratio=0.9,
        )
    )
    assert loaded.service.lock_ttl == timedelta(minutes=2)
    assert loaded.service.misfire_grace == timedelta(minutes=10)
    assert loaded.service.metrics_textfile == tmp_path / "metrics/a.prom"
    assert loaded.audiences[0].interval == timedelta(hours=2)
    assert loaded.audiences[0].max_exit_ratio == 0.9


@pytest.mark.parametrize(
    ("extra", "audience", "message"),
    [
        ('\n[service]\ntimezone = "Mars/Base"\n', {}, "service.timezone: 'Mars/Base' is not"),
        ('\n[service]\nlock_ttl = "soon"\n', {}, "service.lock_ttl: 'soon' is not a duration"),
        ('\n[service]\nstop_after = "1s"\n', {}, "service.stop_after: unknown key"),
        ("\n[safeguards]\nmax_exit_ratio = 1.5\n", {}, "safeguards.max_exit_ratio: Input should"),
        ("", {"interval": "often"}, "audiences[0].interval (audience 'Aud A'): 'often' is not"),
        (
            "",
            {"interval": "2h", "schedule": "0 * * * *"},
            "give either `schedule` (cron) or `interval`",
        ),
        ("", {"max_exit_ratio": -0.1}, "audiences[0].max_exit_ratio (audience 'Aud A')"),
    ],
)
def test_bad_service_config_is_named(
    tmp_path: Path, extra: str, audience: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(config(tmp_path, extra, **audience))
    assert message in str(exc.value)
    assert str(tmp_path / "c.toml") in str(exc.value)


def test_a_reload_that_cannot_reschedule_keeps_the_running_config(tmp_path: Path) -> None:
    """The new config becomes the running one only once its schedule is applied."""
    from audience_sync.service import Service

    write_csv(tmp_path / "a.csv", "user_id\nu1\n")
    audiences = [{"name": "A", "source": "a.csv", "interval": "1h"}]
    path = write_config(
        tmp_path / "c.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}", audiences=audiences
    )
    service = Service(path)
    service._apply_schedule(service.config, None)
    running = service.config
    # Valid as a config, unusable as a state database: rescheduling fails on it.
    (tmp_path / "broken.db").write_text("not a database\n" * 100)
    write_config(path, state_url=f"sqlite:///{tmp_path / 'broken.db'}", audiences=audiences)
    assert service.reload() is False
    assert service.config is running
