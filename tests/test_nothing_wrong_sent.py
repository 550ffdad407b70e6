"""Issue 10: inputs that used to make a run send something wrong, on SQLite and PostgreSQL.

A malformed snapshot is a snapshot error naming the line; a rejected row exits nobody; an
audience key cannot overwrite an identity trait; an id with a control character is rejected.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from conftest import cli, read_jsonl, state_members, write_config
from recording_destination import RecordingDestination

from audience_sync import load_config, sync
from audience_sync.config import AudienceConfig
from audience_sync.errors import ConfigError, QuotaExhausted, SnapshotError
from audience_sync.model import RunStatus
from audience_sync.pushdown import applies, plan_in_database
from audience_sync.service import Service
from audience_sync.sources import load_snapshot
from audience_sync.sources.sql import wrappable
from audience_sync.state import StateStore, connect, schema_is_current, upgrade

HEADER = "user_id,email,name\n"


def rows(n: int) -> list[str]:
    return [f"u{i},u{i}@example.com,User {i}\n" for i in range(n)]


def write_rows(path: Path, replaced: dict[int, str]) -> None:
    """The 100 rows of ``rows(100)``, some replaced (by data row index)."""
    path.write_text(HEADER + "".join(replaced.get(i, r) for i, r in enumerate(rows(100))))


def load_error(path: Path, **options: object) -> str:
    with pytest.raises(SnapshotError) as excinfo:
        load_snapshot(AudienceConfig(name="VIP", source=path, **options))  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert str(path) in message
    assert "Traceback" not in message and ".cc:" not in message  # no Arrow internals
    return message


def sent(out: Path, key: str) -> dict[str, bool]:
    """What the jsonl destination was sent for ``key``: the last value per user."""
    return {m["userId"]: m["traits"][key] for m in read_jsonl(out) if key in m["traits"]}


# --- 1. an unbalanced quote --------------------------------------------------------------------


def test_an_unbalanced_quote_is_an_error_naming_the_line_it_opened(tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    write_rows(path, {95: 'u95,u95@example.com,"User 95\n'})  # data row 96, line 97
    message = load_error(path)
    assert "line 97" in message and "quote" in message


def test_a_quote_closing_lines_later_is_an_error_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    path.write_text(HEADER + 'u1,a@x,"Ada\nLovelace"\nu2,b@x,Bob\n')
    assert "line 2" in load_error(path)
    snapshot = load_snapshot(AudienceConfig(name="VIP", source=path, allow_multiline_values=True))
    assert list(snapshot.members.index) == ["u1", "u2"]
    assert snapshot.members.loc["u1", "name"] == "Ada\nLovelace"


def test_an_unbalanced_quote_is_an_error_even_when_multiline_values_are_allowed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "vip.csv"
    path.write_text(HEADER + 'u1,a@x,Ada\nu2,b@x,"Bob\nu3,c@x,Cy\n')
    assert "line 3" in load_error(path, allow_multiline_values=True)


@pytest.mark.parametrize(
    ("text", "members", "rejected_rows"),
    [
        (b"user_id\nu1\n\nu2\n", ["u1", "u2"], [2]),  # between rows: an empty user_id
        (b"user_id\nu1\n\n\r\n", ["u1"], []),  # ending the file: an editor's newlines
        (b'user_id\nu1\n""\n', ["u1"], [2]),  # a written empty value
    ],
)
def test_in_a_file_of_one_column_a_blank_line_between_rows_is_an_empty_id(
    tmp_path: Path, text: bytes, members: list[str], rejected_rows: list[int]
) -> None:
    path = tmp_path / "vip.csv"
    path.write_bytes(text)
    snapshot = load_snapshot(AudienceConfig(name="VIP", source=path))
    assert list(snapshot.members.index) == members
    assert [r.row for r in snapshot.rejected] == rejected_rows


def test_blank_lines_and_crlf_are_not_mistaken_for_swallowed_lines(tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    path.write_bytes(b"user_id,email\r\n\r\nu1,a@x\r\n\r\n\r\nu2,b@x\r\n\n")
    assert list(load_snapshot(AudienceConfig(name="VIP", source=path)).members.index) == [
        "u1",
        "u2",
    ]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (HEADER + "u1,a@x,Ada\nu2,b@x\nu3,c@x,Cy\n", 3, "2 values"),
        (HEADER + "u1,a@x,Ada\nu2,b@x,Bob,extra\n", 3, "4 values"),
        (HEADER + "u1,a@x,Ada\nu2,b@", 3, "cut short"),
        (HEADER + 'u1,a@x,Ada\nu2,b@x,"Bo', 3, "cut short"),
    ],
)
def test_wrong_column_counts_and_a_truncated_last_line_name_the_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "vip.csv"
    path.write_text(text)
    message = load_error(path)
    assert f"line {line}" in message and words in message


def test_a_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    path.write_bytes(b"user_id,name\nu1,Ada\nu2,Ren\xe9e\n")
    assert "line 3 is not UTF-8" in load_error(path)


@pytest.fixture
def vip(tmp_path: Path, state_url: str) -> tuple[Path, Path]:
    """A config with one audience `vip` over vip.csv, its first sync of u0..u99 done."""
    csv = tmp_path / "vip.csv"
    csv.write_text(HEADER + "".join(rows(100)))
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    assert sync(load_config(config)).exit_code == 0
    return config, csv


def test_a_swallowing_quote_sends_nothing_and_keeps_the_state(
    vip: tuple[Path, Path], state_url: str
) -> None:
    config, csv = vip
    write_rows(csv, {95: 'u95,u95@example.com,"User 95\n'})
    out = config.parent / "out.jsonl"
    before = out.read_text()
    result = sync(load_config(config))
    assert result.exit_code == 4
    assert result.audiences[0].status is RunStatus.FAILED
    assert "line 97" in (result.audiences[0].error or "")
    assert out.read_text() == before
    assert state_members(state_url, "vip") == {f"u{i}" for i in range(100)}


# --- 2. a rejected row exits nobody --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_rejected_row_does_not_exit_its_user(tmp_path: Path, state_url: str, suffix: str) -> None:
    source = tmp_path / f"vip{suffix}"

    def write(ids: list[str | None]) -> None:
        if suffix == ".csv":
            source.write_text("user_id\n" + "".join(f"{u or ''}\n" for u in ids))
        else:
            pq.write_table(pa.table({"user_id": pa.array(ids, pa.string())}), source)

    write(["u1", "u2", "u3", "u4"])
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": source.name}],
    )
    assert sync(load_config(config)).exit_code == 0
    write(["u1", None, "u3", "u4", "u5"])  # u2's row lost its id; u5 is new
    result = sync(load_config(config))
    assert result.exit_code == 4
    audience = result.audiences[0]
    assert audience.status is RunStatus.PARTIAL
    assert audience.counts["exited"] == 0 and audience.counts["entered"] == 1
    assert "1 exits held" in (audience.error or "")
    assert sent(tmp_path / "out.jsonl", "vip") == {f"u{i}": True for i in range(1, 6)}
    assert state_members(state_url, "vip") == {"u1", "u2", "u3", "u4", "u5"}

    write(["u1", "u3", "u4", "u5"])  # a clean snapshot: now u2 has left
    assert sync(load_config(config)).exit_code == 0
    assert sent(tmp_path / "out.jsonl", "vip")["u2"] is False
    assert state_members(state_url, "vip") == {"u1", "u3", "u4", "u5"}


# --- 3. an audience key equal to an identity trait -----------------------------------------------


@pytest.mark.parametrize(
    ("audience", "key"),
    [
        ({"name": "Email"}, "email"),
        ({"name": "Name"}, "name"),
        ({"name": "Phone"}, "phone"),
        ({"name": "User ID"}, "user_id"),
        ({"name": "Fancy", "key": "avatar"}, "avatar"),
        ({"name": "First Name"}, "first_name"),
    ],
)
def test_an_identity_trait_is_not_an_audience_key(
    tmp_path: Path, audience: dict[str, str], key: str
) -> None:
    (tmp_path / "a.csv").write_text("user_id\nu1\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        audiences=[{**audience, "source": "a.csv"}],
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)
    message = str(excinfo.value)
    assert repr(audience["name"]) in message
    assert f"trait key {key!r} is reserved" in message
    assert 'key = "' in message


# --- 4. a control character in a user_id ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\n"])
def test_an_id_with_a_control_character_is_rejected_with_its_row(
    tmp_path: Path, suffix: str, char: str
) -> None:
    path = tmp_path / f"vip{suffix}"
    ids = ["u0", f"u{char}1", "u2"]  # inside: a blank at either end is stripped
    if suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["user_id"], *([u] for u in ids)])
    else:
        pq.write_table(pa.table({"user_id": ids}), path)
    snapshot = load_snapshot(
        AudienceConfig(name="VIP", source=path, allow_multiline_values=char == "\n")
    )
    assert list(snapshot.members.index) == ["u0", "u2"]
    assert snapshot.rejected_count == 1
    (row,) = snapshot.rejected
    assert row.row == 2 and "control character" in row.reason
    assert row.user_id is not None and f"\\x{ord(char):02x}" in row.user_id


def test_a_nul_in_an_id_neither_enters_a_twin_nor_exits_the_user(
    vip: tuple[Path, Path], state_url: str
) -> None:
    config, csv = vip
    write_rows(csv, {1: "u1\x00,u1@example.com,User 1\n"})
    result = sync(load_config(config))
    assert result.exit_code == 4
    (rejected,) = result.audiences[0].rejected
    assert (rejected.row, rejected.user_id) == (2, "u1\\x00")
    assert sent(config.parent / "out.jsonl", "vip") == {f"u{i}": True for i in range(100)}
    assert state_members(state_url, "vip") == {f"u{i}" for i in range(100)}


# --- 8. a pushed-down query ending in a comment or a semicolon -----------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT user_id FROM src -- the members",
        "SELECT user_id FROM src;",
        "SELECT user_id FROM src ; ;\n\n",
        "SELECT user_id FROM src; -- trailing; comment",
        "SELECT user_id FROM src /* a; block */ ;",
        "WITH m AS (SELECT user_id FROM src) SELECT user_id FROM m -- a CTE",
        "-- leading comment\nSELECT user_id FROM src WHERE user_id <> 'x;--y'",
    ],
)
def test_a_pushed_down_query_may_end_in_a_comment_or_semicolons(state_url: str, query: str) -> None:
    engine = connect(state_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE src (user_id TEXT)"))
            conn.execute(sa.text("INSERT INTO src VALUES ('u1'), ('u2'), ('x;--y')"))
        store = StateStore(engine)
        ref = store.audience("jsonl", "vip", "VIP")
        audience = AudienceConfig(name="VIP", query=query, source_url=state_url)
        assert applies(audience, engine)
        _, the_plan = plan_in_database(engine, audience, ref.id, full=False)
    finally:
        engine.dispose()
    expected = {"u1", "u2"} if "<>" in query else {"u1", "u2", "x;--y"}
    assert set(the_plan.entered) == expected


def test_wrappable_removes_only_trailing_semicolons_outside_quotes_and_comments() -> None:
    assert wrappable("SELECT ';' AS s; ; -- x; y\n") == "SELECT ';' AS s  -- x; y"
    assert wrappable("SELECT 1 /* ; */") == "SELECT 1 /* ; */"
    assert wrappable("SELECT 'it''s;'") == "SELECT 'it''s;'"
    assert wrappable('SELECT ";" FROM t;') == 'SELECT ";" FROM t'


# --- 6 and 7: a broken state database; -v keeps the exit codes -----------------------------------


@pytest.mark.parametrize(
    "content", [b"this is not a database\n" * 100, b"SQLite format 3\x00" + b"\xff" * 4000]
)
def test_a_state_file_that_is_not_sqlite_is_exit_6_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    state = tmp_path / "state.db"
    state.write_bytes(content)
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=f"sqlite:///{state}",
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    for command in (["run"], ["-v", "run"], ["history"], ["status"], ["db", "upgrade"]):
        result = cli(*command, "--config", str(config))
        assert result.returncode == 6, (command, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the state database ") and str(state) in last
        assert ("Traceback" in result.stderr) is (command[0] == "-v")
    assert state.read_bytes() == content


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_keeps_the_exit_codes(tmp_path: Path, verbose: bool) -> None:
    flag = ["-v"] if verbose else []
    bad = tmp_path / "bad.toml"
    bad.write_text("[state\n")
    result = cli(*flag, "run", "--config", str(bad))
    assert result.returncode == 3, result.stderr
    assert ("Traceback" in result.stderr) is verbose
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    down = write_config(
        tmp_path / "down.toml",
        state_url="postgresql+psycopg://nobody:secret@127.0.0.1:9/nothing?connect_timeout=5",
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    result = cli(*flag, "run", "--config", str(down))
    assert result.returncode == 6, result.stderr
    assert ("Traceback" in result.stderr) is verbose
    assert "secret" not in result.stderr


# --- 5. runs that start at the same moment on a database not yet migrated -----------------------


def test_runs_starting_together_on_an_unmigrated_database_all_succeed(
    tmp_path: Path, state_url: str
) -> None:
    keys = [f"a{i}" for i in range(6)]
    for key in keys:
        (tmp_path / f"{key}.csv").write_text(f"user_id\n{key}-u1\n{key}-u2\n")
    config = load_config(
        write_config(
            tmp_path / "audience-sync.toml",
            state_url=state_url,
            audiences=[{"name": k, "source": f"{k}.csv"} for k in keys],
        )
    )
    start = threading.Barrier(len(keys))

    def run(key: str) -> int:
        start.wait()
        return sync(config, audiences=[key]).exit_code

    with ThreadPoolExecutor(len(keys)) as pool:
        assert list(pool.map(run, keys)) == [0] * len(keys)


def test_a_new_sqlite_database_opened_by_many_at_once_is_never_called_unusable(
    tmp_path: Path,
) -> None:
    """Switching a new file to WAL can answer "locked" without waiting on busy_timeout; the
    engine waits and retries instead of reporting an unusable database (seen in CI: about 1
    trial in 20 failed before)."""
    errors: list[str] = []
    for trial in range(60):
        url = f"sqlite:///{tmp_path / f'state{trial}.db'}"
        start = threading.Barrier(8)

        def open_and_migrate(url: str = url, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                engine = connect(url)
                upgrade(engine)
                engine.dispose()
            except Exception as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=open_and_migrate) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_upgrades_in_processes_started_together_take_turns(state_url: str) -> None:
    procs = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "audience-sync"),
                "db",
                "upgrade",
                "--url",
                state_url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    engine = connect(state_url)
    try:
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def test_a_scheduled_run_that_crashes_is_counted_in_the_metrics(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    (tmp_path / "vip.csv").write_text("user_id\nu1\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=f"sqlite:///{state}",
        audiences=[{"name": "VIP", "source": "vip.csv", "interval": "1h"}],
        extra='\n[service]\nmetrics_textfile = "metrics/audience_sync.prom"\n',
    )
    service = Service(config)
    state.write_bytes(b"not a database\n" * 100)  # breaks after the service started
    service._run_audience("vip")
    text = (tmp_path / "metrics/audience_sync.prom").read_text()
    assert (
        'audience_sync_runs_total{audience="vip",destination="jsonl",status="failed"} 1.0' in text
    )


# --- 9. a quota stop leaves audiences with nothing left to send succeeded ------------------------


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 5])
def test_a_quota_stop_fails_only_the_audiences_with_changes_left(
    tmp_path: Path, state_url: str, stop_after: int
) -> None:
    (tmp_path / "a.csv").write_text("user_id\nu1\n")
    (tmp_path / "b.csv").write_text("user_id\nu2\nu3\nu4\n")
    config = write_config(
        tmp_path / "audience-sync.toml",
        state_url=state_url,
        audiences=[{"name": "A", "source": "a.csv"}, {"name": "B", "source": "b.csv"}],
    )
    quota = QuotaExhausted("quota: 5,000 of 5,000 requests used today")
    dest = RecordingDestination(stop_after=stop_after, stop_with=quota, batch=1)
    result = sync(load_config(config), destination=dest)
    for audience in result.audiences:
        done = audience.counts["pending"] == 0
        assert audience.status is (RunStatus.SUCCEEDED if done else RunStatus.PARTIAL)
        assert (audience.error is None) is done
    statuses = [a.status for a in result.audiences]
    assert result.exit_code == (0 if statuses == [RunStatus.SUCCEEDED] * 2 else 5)


# --- 9. snapshot errors name the row and do not show Arrow internals ------------------------------


def test_a_bad_snapshot_at_names_its_row(tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    path.write_text("user_id,snapshot_at\nu1,2026-11-25T06:00:00Z\nu2,yesterday\n")
    assert "row 2: column `snapshot_at`" in load_error(path)


def test_an_identity_trait_that_is_not_text_is_named_without_arrow_internals(
    tmp_path: Path,
) -> None:
    path = tmp_path / "vip.parquet"
    emails = pa.array([{"a": 1}, {"a": 2}])
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "email": emails}), path)
    message = load_error(path)
    assert "column `email` has type struct" in message and "cast" not in message
