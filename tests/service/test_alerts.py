"""Alerts against a loopback webhook receiver the test starts, and a command: one alert per
audience and condition until it clears, remembered in the state (SQLite and PostgreSQL), and
never failing the sync."""

from __future__ import annotations

import json
import shlex
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, crisp_destination, crisp_env, write_config, write_csv, write_users
from crisp_server import CrispServer

from audience_sync.alerts import Alerter, Condition, condition_of
from audience_sync.clock import utc_now
from audience_sync.config import AlertConfig, AudienceConfig, load_config
from audience_sync.errors import CredentialsError, SafeguardError, SnapshotError
from audience_sync.history import status
from audience_sync.model import RunMode, RunStatus
from audience_sync.result import AudienceResult
from audience_sync.state import connect

pytestmark = pytest.mark.timeout(240)


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/s3cr3t-path"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def setup(tmp_path: Path, state_url: str, alerts: str) -> Path:
    write_users(tmp_path / "vip.csv", 10)
    return write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv", "interval": "1h"}],
        extra=f"\n[alerts]\n{alerts}\n",
    )


def test_a_refused_snapshot_alerts_once_until_a_run_succeeds(
    tmp_path: Path, state_url: str, receiver: Receiver
) -> None:
    config = setup(tmp_path, state_url, "")
    env = {"AUDIENCE_SYNC_WEBHOOK_URL": receiver.url}
    assert cli("run", "--config", str(config), env=env).returncode == 0
    assert receiver.bodies == []  # a healthy run says nothing
    write_users(tmp_path / "vip.csv", 1)  # 9 of 10 would leave: the safeguard refuses
    for _ in range(2):
        refused = cli("run", "--config", str(config), env=env)
        assert refused.returncode == 4, refused.stdout + refused.stderr
    assert len(receiver.bodies) == 1
    (body,) = receiver.bodies
    assert set(body) == {"text"}
    assert "VIP -> jsonl: snapshot refused by a safeguard (run 2)" in body["text"]
    assert receiver.url not in refused.stderr

    write_users(tmp_path / "vip.csv", 10)
    assert cli("run", "--config", str(config), env=env).returncode == 0  # clears it
    write_users(tmp_path / "vip.csv", 1)
    assert cli("run", "--config", str(config), env=env).returncode == 4
    assert len(receiver.bodies) == 2


def test_the_command_gets_the_event_as_json_on_stdin(tmp_path: Path, state_url: str) -> None:
    events = tmp_path / "events.jsonl"
    script = f"import sys; open({str(events)!r}, 'a').write(sys.stdin.read() + chr(10))"
    config = setup(
        tmp_path, state_url, f"command = {json.dumps(shlex.join([sys.executable, '-c', script]))}"
    )
    write_csv(tmp_path / "vip.csv", "email\nx@y.io\n")  # no user_id column: the run fails
    failed = cli("run", "--config", str(config))
    assert failed.returncode == 4, failed.stderr
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["event"] == "run_failed" and event["audience_key"] == "vip"
    assert event["destination"] == "jsonl" and "no `user_id` column" in event["message"]
    assert event["run_id"] == 1 and event["at"] and event["host"]


def test_a_webhook_that_fails_never_fails_the_sync_and_is_retried(
    tmp_path: Path, state_url: str, receiver: Receiver
) -> None:
    receiver.status = 500
    config = setup(tmp_path, state_url, "")
    env = {"AUDIENCE_SYNC_WEBHOOK_URL": receiver.url}
    write_csv(tmp_path / "vip.csv", "email\nx@y.io\n")
    first = cli("run", "--config", str(config), env=env)
    assert first.returncode == 4  # the snapshot's exit code, not an alert's
    assert "the webhook answered HTTP 500" in first.stderr
    assert "s3cr3t-path" not in first.stderr + first.stdout
    receiver.status = 200
    assert cli("run", "--config", str(config), env=env).returncode == 4
    assert len(receiver.bodies) == 2  # the failed send left no memory: it went out again

    unreachable = {"AUDIENCE_SYNC_WEBHOOK_URL": "http://127.0.0.1:9/hooks/s3cr3t-path"}
    config.write_text(config.read_text().replace('"VIP"', '"VIP 2"'))
    done = cli("run", "--config", str(config), env=unreachable)
    assert done.returncode == 4 and "webhook could not be reached" in done.stderr
    assert "s3cr3t-path" not in done.stderr + done.stdout


def test_overdue_alerts_once_and_clears_when_on_time(
    tmp_path: Path, state_url: str, receiver: Receiver
) -> None:
    config_path = setup(tmp_path, state_url, f'webhook_url = "{receiver.url}"')
    assert cli("run", "--config", str(config_path)).returncode == 0
    config = load_config(config_path)
    assert receiver.url not in repr(config)
    engine = connect(config.state.url)
    try:
        late = utc_now() + timedelta(hours=3)
        for _ in range(2):
            Alerter(config).overdue(status(config, engine, now=late))
        assert [b["text"].split(": ")[1] for b in receiver.bodies] == ["VIP -> jsonl"]
        assert "overdue" in receiver.bodies[0]["text"]
        Alerter(config).overdue(status(config, engine, now=utc_now()))  # on time: clears
        Alerter(config).overdue(status(config, engine, now=late))
        assert len(receiver.bodies) == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("status_", "counts", "error", "error_type", "expected"),
    [
        (RunStatus.SUCCEEDED, {}, None, None, None),
        (RunStatus.FAILED, {}, "refused", SafeguardError, Condition.SAFEGUARD_REFUSED),
        (RunStatus.FAILED, {}, "bad file", SnapshotError, Condition.RUN_FAILED),
        (RunStatus.FAILED, {}, "rejected", CredentialsError, Condition.RUN_FAILED),
        (
            RunStatus.PARTIAL,
            {"pending": 40},
            "quota: 5,000 of 5,000",
            None,
            Condition.QUOTA_STOPPED,
        ),
        (RunStatus.PARTIAL, {"failed": 2, "skipped": 1}, "3 users", None, Condition.RUN_PARTIAL),
        (RunStatus.PARTIAL, {"failed": 1, "skipped": 1}, "2 users", None, None),
        (RunStatus.PARTIAL, {"rejected_rows": 1}, "rows", None, None),
    ],
)
def test_what_a_finished_run_raises(
    status_: RunStatus,
    counts: dict[str, int],
    error: str | None,
    error_type: Any,
    expected: Condition | None,
) -> None:
    audience = AudienceConfig(name="VIP", source=Path("vip.csv"))
    result = AudienceResult(audience, status_, RunMode.INCREMENTAL, 7, counts, error, error_type)
    assert condition_of(result, AlertConfig(partial_failed_users=3)) is expected


@pytest.mark.slow
def test_a_quota_stop_alerts_with_the_pending_users_and_the_days_they_need(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    events = tmp_path / "events.jsonl"
    script = f"import sys; open({str(events)!r}, 'a').write(sys.stdin.read() + chr(10))"
    write_users(tmp_path / "vip.csv", 20)
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        destination=crisp_destination(crisp, daily_request_budget=11, max_concurrency=2),
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        extra=f"\n[alerts]\ncommand = {json.dumps(shlex.join([sys.executable, '-c', script]))}\n",
    )
    for _ in range(2):  # the second run is stopped at once: no second alert
        done = cli("run", "--config", str(config), env=crisp_env())
        assert done.returncode == 5, done.stdout + done.stderr
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert event["event"] == "quota_stopped" and event["destination"] == "crisp:website-1"
    assert event["pending"] > 0 and f"{event['pending']:,} users pending" in event["message"]
    assert "more day" in event["message"]
