"""`audience-sync check`: snapshots read by header and count, the state opened without a write,
the destination asked one cheap question (Crisp: the loopback server, counted in the budget)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import cli, crisp_destination, crisp_env, write_config, write_csv
from crisp_server import CrispServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience_sync.sources.files import file_header, read_file

pytestmark = pytest.mark.timeout(240)


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def requests_counted(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT coalesce(sum(used), 0) FROM destination_requests")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def jsonl_setup(tmp_path: Path, state_url: str) -> Path:
    write_csv(tmp_path / "vip.csv", "user_id,email\nu1,a@x.io\nu2,b@x.io\nu3,\n")
    write_csv(tmp_path / "churn.csv", "user_id\n")
    return write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[
            {"name": "VIP", "source": "vip.csv", "schedule": "0 * * * *"},
            {"name": "Churn Risk", "source": "churn.csv", "interval": "2h"},
        ],
        destination={"type": "jsonl", "path": "out/identify.jsonl"},
    )


def test_check_before_the_first_run_creates_nothing(tmp_path: Path, state_url: str) -> None:
    config = jsonl_setup(tmp_path, state_url)
    done = cli("check", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert tables(state_url) == set()  # no migration
    assert not (tmp_path / "out").exists()  # the destination's folder is not created either
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "3" in lines["VIP"] and "initial" in lines["VIP"] and "0 * * * *" in lines["VIP"]
    assert "every 2h" in lines["Churn"]
    assert "out/identify.jsonl is writable" in done.stdout


def test_sqlite_check_leaves_no_database_file(tmp_path: Path) -> None:
    config = jsonl_setup(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    assert cli("check", "--config", str(config)).returncode == 0
    assert not (tmp_path / "state.db").exists()


def test_check_after_a_run_shows_incremental_and_changes_nothing(
    tmp_path: Path, state_url: str
) -> None:
    config = jsonl_setup(tmp_path, state_url)
    assert cli("run", "--config", str(config)).returncode == 0
    engine = sa.create_engine(state_url)
    query = sa.text("SELECT count(*) FROM sync_runs")
    with engine.connect() as conn:
        runs = conn.execute(query).scalar_one()
    done = cli("check", "--config", str(config), "--offline")
    assert done.returncode == 0, done.stdout + done.stderr
    with engine.connect() as conn:
        assert conn.execute(query).scalar_one() == runs
    engine.dispose()
    vip = next(line for line in done.stdout.splitlines() if line.startswith("VIP"))
    assert vip.split()[-2:] == ["incremental", "3"]
    assert "schema current" in done.stdout and "not contacted (--offline)" in done.stdout


def test_a_snapshot_without_user_id_fails_with_the_snapshot_exit_code(
    tmp_path: Path, state_url: str
) -> None:
    config = jsonl_setup(tmp_path, state_url)
    write_csv(tmp_path / "churn.csv", "id,email\n1,a@x.io\n")
    done = cli("check", "--config", str(config), "--offline")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "FAIL snapshot Churn Risk" in done.stdout and "no `user_id` column" in done.stdout


def test_no_state_and_no_auto_migrate_fails_with_the_state_exit_code(tmp_path: Path) -> None:
    config = jsonl_setup(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    config.write_text(config.read_text().replace("[state]\n", "[state]\nauto_migrate = false\n"))
    done = cli("check", "--config", str(config), "--offline")
    assert done.returncode == 6, done.stdout + done.stderr
    assert "audience-sync db upgrade" in done.stdout
    assert not (tmp_path / "state.db").exists()


@pytest.mark.parametrize(
    "query", ["SELECT user_id FROM members -- members", "SELECT user_id FROM members; -- done"]
)
def test_check_accepts_a_query_ending_in_a_comment_as_a_run_does(
    tmp_path: Path, state_url: str, query: str
) -> None:
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE members (user_id TEXT)"))
        conn.execute(sa.text("INSERT INTO members VALUES ('u1'), ('u2')"))
    engine.dispose()
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "query": query, "source_url": state_url}],
    )
    done = cli("check", "--config", str(config), "--offline")
    assert done.returncode == 0, done.stdout + done.stderr
    vip = next(line for line in done.stdout.splitlines() if line.startswith("VIP"))
    assert "2" in vip.split()


def test_check_finds_a_state_database_in_a_folder_named_with_a_hash(tmp_path: Path) -> None:
    folder = tmp_path / "st#ate"
    folder.mkdir()
    config = jsonl_setup(tmp_path, f"sqlite:///{folder / 'state.db'}")
    assert cli("run", "--config", str(config)).returncode == 0
    assert (folder / "state.db").exists()
    done = cli("check", "--config", str(config), "--offline")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "schema current" in done.stdout
    vip = next(line for line in done.stdout.splitlines() if line.startswith("VIP"))
    assert vip.split()[-2:] == ["incremental", "3"]
    assert not (tmp_path / "st").exists()  # nothing opened (or created) at the cut-off path


def test_an_output_folder_that_cannot_be_made_fails_the_destination(tmp_path: Path) -> None:
    config = jsonl_setup(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    (tmp_path / "out").write_text("a file where the output folder should be")
    done = cli("check", "--config", str(config))
    assert done.returncode == 6, done.stdout + done.stderr
    assert "FAIL destination jsonl" in done.stdout and "is not writable" in done.stdout


def crisp_setup(tmp_path: Path, state_url: str, crisp: CrispServer) -> Path:
    write_csv(tmp_path / "vip.csv", "user_id,email\nu1,a@x.io\n")
    return write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        destination=crisp_destination(crisp),
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )


@pytest.mark.slow
def test_crisp_check_makes_one_request_counted_in_the_budget(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = crisp_setup(tmp_path, state_url, crisp)
    assert cli("db", "upgrade", "--config", str(config)).returncode == 0
    done = cli("check", "--config", str(config), env=crisp_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert crisp.count() == 1 and crisp.count("GET", "/people/profiles/1") == 1
    assert crisp.quota_used == 1
    assert requests_counted(state_url) == 1
    assert "credentials accepted" in done.stdout and "1 of 5,000 used today" in done.stdout

    offline = cli("check", "--config", str(config), "--offline", env=crisp_env())
    assert offline.returncode == 0 and crisp.count() == 1


@pytest.mark.slow
def test_crisp_check_before_any_state_counts_in_a_scratch_database(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = crisp_setup(tmp_path, state_url, crisp)
    done = cli("check", "--config", str(config), env=crisp_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert crisp.count() == 1
    assert "not counted in the state database" in done.stdout
    assert tables(state_url) == set()


@pytest.mark.slow
def test_crisp_check_with_a_bad_key_exits_6_without_showing_it(
    tmp_path: Path, state_url: str, crisp: CrispServer
) -> None:
    config = crisp_setup(tmp_path, state_url, crisp)
    bad = {**crisp_env(), "CRISP_KEY": "wrong-key-0000"}
    done = cli("check", "--config", str(config), env=bad)
    assert done.returncode == 6, done.stdout + done.stderr
    assert "FAIL destination crisp:website-1" in done.stdout
    assert "rejected the credentials" in done.stdout
    assert "wrong-key-0000" not in done.stdout + done.stderr
    missing = cli("check", "--config", str(config), env={"CRISP_IDENTIFIER": "", "CRISP_KEY": ""})
    assert missing.returncode == 6 and "CRISP_KEY" in missing.stdout


_ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(_ids, st.one_of(st.none(), _ids)), max_size=20),
    blank_lines=st.integers(0, 2),
)
def test_the_csv_row_count_matches_a_full_load(
    tmp_path: Path, rows: list[tuple[str, str | None]], blank_lines: int
) -> None:
    path = tmp_path / "s.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "email"])
        writer.writerows([(u, e or "") for u, e in rows])
        f.write("\n" * blank_lines)
    columns, count = file_header(path)
    assert columns == ["user_id", "email"]
    assert count == len(read_file(path))


def test_the_parquet_row_count_comes_from_the_footer(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b", "c"], "name": ["x", None, "z"]}), path)
    assert file_header(path) == (["user_id", "name"], 3)
