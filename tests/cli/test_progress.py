"""Progress off a terminal (a log line every few seconds with counts, rate and time left),
`--log-format json`, and stderr lines that are not wrapped at 80 columns."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCHER, cli, write_config, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync.logs import JsonFormatter
from audience_sync.progress import ProgressLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=50, deadline=None)
@given(
    total=st.integers(1, 10**7),
    share=st.floats(0.01, 1.0),
    seconds=st.integers(1, 10**5),
)
def test_the_rate_and_eta_follow_the_confirmed_users(
    total: int, share: float, seconds: int
) -> None:
    clock = FakeClock()
    progress = ProgressLog(30, clock=clock)
    progress("planning", "vip", 0, 2)
    clock.now += 5
    progress("delivering", None, 0, total)  # a new phase: its own clock
    clock.now += seconds
    done = max(1, int(total * share))
    progress("delivering", None, done, total)
    fields = dict(part.split("=", 1) for part in progress.line().split()[1:])
    assert fields["phase"] == "delivering"
    assert (int(fields["users_done"]), int(fields["users_total"])) == (done, total)
    assert float(fields["rate"].removesuffix("/s")) == pytest.approx(done / seconds, abs=0.05)
    expected_eta = int((total - done) / (done / seconds))
    assert "eta" in fields
    assert _seconds(fields["eta"]) == pytest.approx(expected_eta, abs=1)


def _seconds(text: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, number = 0, ""
    for ch in text:
        if ch.isdigit():
            number += ch
        else:
            total, number = total + int(number) * units[ch], ""
    return total


def test_planning_names_the_audience() -> None:
    progress = ProgressLog(30, clock=FakeClock())
    progress("planning", "high_value_customers", 1, 3)
    assert progress.line().startswith(
        "progress phase=planning audience=high_value_customers audiences_done=1 audiences_total=3"
    )


def slow_setup(tmp_path: Path, users: int, extra: str = "") -> Path:
    """A config whose one audience of ``users`` goes to the slowed-down JSONL destination."""
    rows = "\n".join(f"u{i:04d},u{i}@example.com" for i in range(users))
    write_csv(tmp_path / "a.csv", "user_id,email\n" + rows + "\n")
    return write_config(
        tmp_path / "c.toml",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        destination={"type": "slow_jsonl", "path": "out.jsonl", "delay": 0.02, "flush_every": 10},
        audiences=[{"name": "Aud A", "source": "a.csv"}],
        extra=extra,
    )


def slow_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = slow_setup(tmp_path, 250, extra='\n[service]\nprogress_every = "1s"\n')
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_a_run_off_a_terminal_logs_progress_with_rate_and_eta(tmp_path: Path) -> None:
    done = slow_run(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "progress phase=delivering" in line]
    assert lines, done.stderr
    assert all("users_total=250" in line and "rate=" in line for line in lines)
    assert any("eta=" in line for line in lines)


@pytest.mark.slow
def test_log_format_json_writes_one_object_per_line(tmp_path: Path) -> None:
    done = slow_run(tmp_path, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    finished = [e for e in entries if e.get("status") == "succeeded"]
    assert finished and finished[0]["audience"] == "aud_a" and finished[0]["delivered"] == 250
    assert any(e.get("phase") == "delivering" and e["level"] == "INFO" for e in entries)


def test_the_json_formatter_keeps_the_message_and_its_traceback() -> None:
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "audience_sync",
            logging.ERROR,
            __file__,
            1,
            "audience=%s failed: %s",
            ("vip", "a b"),
            sys.exc_info(),
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "audience=vip failed: a b" and entry["audience"] == "vip"
    assert "ValueError: boom" in entry["exception"] and entry["level"] == "ERROR"


def test_stderr_off_a_terminal_is_not_wrapped_at_80_columns() -> None:
    name = "Élan " + "very long audience name " * 6
    done = cli("key", name)
    assert done.returncode == 0
    warning = [line for line in done.stderr.splitlines() if line]
    assert len(warning) == 1 and len(warning[0]) > 120 and warning[0].startswith("warning:")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_on_a_terminal_the_bar_names_the_phase_and_the_audience(tmp_path: Path) -> None:
    config = slow_setup(tmp_path, 100)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "run", "--config", str(config)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=120) == 0
    text = re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", shown).decode(errors="replace")
    assert "planning aud_a" in text and "delivering users" in text
    assert "syncing" not in text
