"""Tests for audience_sync.sources: CSV, Parquet and SQL snapshots read as text and validated.

Every malformed input must give a ``SnapshotError`` naming the file (or query) and the problem;
rows that cannot be used are counted and reported with their 1-based data row numbers.
"""

from __future__ import annotations

import csv
import sqlite3
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_config, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from audience_sync.config import AudienceConfig, load_config
from audience_sync.errors import SnapshotError
from audience_sync.model import Snapshot
from audience_sync.sources import load_snapshot
from audience_sync.sources.validate import MAX_REPORTED_ROWS, _clean


def load(path: Path) -> Snapshot:
    return load_snapshot(AudienceConfig(name="VIP", source=path))


def load_query(url: str, query: str) -> Snapshot:
    return load_snapshot(AudienceConfig(name="VIP", query=query, source_url=url))


def snapshot_error(path: Path) -> str:
    with pytest.raises(SnapshotError) as excinfo:
        load(path)
    assert excinfo.value.exit_code == 4
    message = str(excinfo.value)
    assert str(path) in message, message
    return message


def write_parquet(path: Path, columns: dict[str, pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def ids(snapshot: Snapshot) -> list[str]:
    return list(snapshot.members.index)


# --- ids stay text ---------------------------------------------------------------------------


def test_csv_ids_stay_text(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv",
        """
        user_id,email
        007,bond@example.com
        7,seven@example.com
        1e3,x@example.com
        00012345678901234567890,big@example.com
        """,
    )
    snapshot = load(path)
    assert ids(snapshot) == ["007", "7", "1e3", "00012345678901234567890"]
    assert snapshot.members.loc["007", "email"] == "bond@example.com"
    assert snapshot.rows == 4
    assert snapshot.rejected_count == 0
    assert snapshot.source == str(path)


def test_parquet_string_ids_stay_text(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"user_id": pa.array(["007", "7", "0"])})
    assert ids(load(path)) == ["007", "7", "0"]


@pytest.mark.parametrize("arrow_type", [pa.int64(), pa.int32(), pa.uint64()])
def test_parquet_integer_ids_become_text_without_decimal(
    tmp_path: Path, arrow_type: pa.DataType
) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"user_id": pa.array([7, None, 8], arrow_type)})
    snapshot = load(path)
    assert ids(snapshot) == ["7", "8"]  # not "7.0", even with a null in the column
    assert [(r.row, r.user_id) for r in snapshot.rejected] == [(2, None)]


def test_parquet_categorical_ids_are_read(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pd.DataFrame({"user_id": pd.Categorical(["007", "8", "007"])}).to_parquet(path)
    snapshot = load(path)
    assert ids(snapshot) == ["007", "8"]


@pytest.mark.parametrize(
    ("column", "type_name"),
    [
        (pa.array([7.0, 8.5]), "double"),
        (pa.array([7.0, 8.0], pa.float32()), "float"),
        (pa.array([b"7", b"8"]), "binary"),
    ],
)
def test_parquet_non_text_ids_are_refused(tmp_path: Path, column: pa.Array, type_name: str) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"user_id": column})
    message = snapshot_error(path)
    assert f"column `user_id` has type {type_name}" in message
    assert "store user ids as text" in message


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.text(
            st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
            min_size=1,
            max_size=12,
        )
        .map(str.strip)
        .filter(bool),
        min_size=1,
        max_size=20,
        unique=True,
    )
)
def test_any_text_id_round_trips_through_csv_and_parquet(user_ids: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "a.csv"
        with csv_path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id"])
            writer.writerows([u] for u in user_ids)
        parquet_path = write_parquet(Path(tmp) / "a.parquet", {"user_id": pa.array(user_ids)})
        for path in (csv_path, parquet_path):
            snapshot = load(path)
            assert ids(snapshot) == user_ids, path.suffix
            assert snapshot.rejected_count == 0


# --- missing and empty ids -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_user_id_column_lists_found_columns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    if suffix == ".csv":
        write_csv(path, "userid,email\n1,a@example.com\n")
    else:
        write_parquet(path, {"userid": pa.array(["1"]), "email": pa.array(["a@example.com"])})
    message = snapshot_error(path)
    assert "no `user_id` column" in message
    assert "columns found: 'userid', 'email'" in message


def test_empty_null_and_blank_ids_are_rejected_with_row_numbers(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv",
        """
        user_id,email
        1,a@example.com
        ,b@example.com
        "",c@example.com
        "   ",d@example.com
        2,e@example.com
        \t,f@example.com
        """,
    )
    snapshot = load(path)
    assert ids(snapshot) == ["1", "2"]
    assert snapshot.rows == 6
    assert snapshot.rejected_count == 4  # counted, never silently dropped
    assert [(r.row, r.user_id, r.reason) for r in snapshot.rejected] == [
        (2, None, "empty user_id"),
        (3, None, "empty user_id"),
        (4, None, "empty user_id"),
        (6, None, "empty user_id"),
    ]


def test_null_ids_in_parquet_are_rejected(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"user_id": pa.array([None, "1", " ", None])})
    snapshot = load(path)
    assert ids(snapshot) == ["1"]
    assert snapshot.rejected_count == 3
    assert [r.row for r in snapshot.rejected] == [1, 3, 4]


def test_words_that_look_like_null_are_ids(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "user_id\nNULL\nNA\nnan\nNone\n")
    snapshot = load(path)
    assert ids(snapshot) == ["NULL", "NA", "nan", "None"]
    assert snapshot.rejected_count == 0


def test_ids_are_stripped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", 'user_id,email\n" 007 ",a@example.com\n')
    assert ids(load(path)) == ["007"]


# Mostly plain ASCII, so that a column's only blank end is often a single value's.
EDGY_TEXT = st.text(
    st.sampled_from("ab ") | st.sampled_from("\t\x1c\x7f\x85\xa0é\u2028"), max_size=4
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.none() | EDGY_TEXT, max_size=8), st.integers(min_value=0, max_value=3))
def test_cleaning_strips_exactly_what_str_strip_strips(values: list[str | None], cut: int) -> None:
    # The check that skips stripping must never skip a value str.strip would change, in sliced
    # and in chunked Arrow columns too (files are read in chunks).
    sliced = pd.Series(values, dtype="string[pyarrow]").iloc[cut:]
    halves = [pa.array(values[:cut], pa.large_string()), pa.array(values[cut:], pa.large_string())]
    chunked = pd.Series(pd.arrays.ArrowStringArray(pa.chunked_array(halves)))
    for column in (sliced, chunked):
        expected = [None if v is pd.NA or not v.strip() else v.strip() for v in column]
        assert [None if v is pd.NA else v for v in _clean(column)] == expected


def test_many_rejected_rows_are_all_counted_and_some_detailed(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv", "user_id,email\n" + ",x\n" * (MAX_REPORTED_ROWS + 10) + "1,y\n"
    )
    snapshot = load(path)
    assert snapshot.rejected_count == MAX_REPORTED_ROWS + 10
    assert len(snapshot.rejected) == MAX_REPORTED_ROWS
    assert snapshot.rejected[0].row == 1
    assert ids(snapshot) == ["1"]


# --- duplicates ----------------------------------------------------------------------------


def test_identical_duplicates_collapse(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv",
        """
        user_id,email,name
        1,a@example.com,Ann
        2,b@example.com,Bob
        1,a@example.com,Ann
        1, a@example.com ,Ann
        """,
    )
    snapshot = load(path)
    assert ids(snapshot) == ["1", "2"]
    assert snapshot.rows == 4
    assert snapshot.rejected_count == 0
    assert snapshot.rejected == ()
    assert snapshot.held == frozenset()


def test_conflicting_duplicates_are_reported_and_the_user_held(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv",
        """
        user_id,email
        1,a@example.com
        2,b@example.com
        2,b@example.com
        3,c@example.com
        2,other@example.com
        """,
    )
    snapshot = load(path)
    assert ids(snapshot) == ["1", "3"]  # user 2 is not a member this run ...
    assert snapshot.held == frozenset({"2"})  # ... but held: the diff will not exit them
    # Every row of user 2 is reported, also the one identical to another of their rows.
    assert [(r.row, r.user_id) for r in snapshot.rejected] == [(2, "2"), (3, "2"), (5, "2")]
    assert snapshot.rejected_count == 3
    assert all("conflicting duplicate" in r.reason for r in snapshot.rejected)
    assert all("email" in r.reason for r in snapshot.rejected)


def test_conflicts_and_empty_ids_together(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "user_id,name\n,x\n5,Ann\n5,Anne\n6,Bo\n")
    snapshot = load(path)
    assert ids(snapshot) == ["6"]
    assert snapshot.rejected_count == 3
    assert [(r.row, r.user_id) for r in snapshot.rejected] == [(1, None), (2, "5"), (3, "5")]
    assert snapshot.rows == 4


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "user_id,email,email\n1,a@example.com,b@example.com\n")
    assert "duplicate column names ['email']" in snapshot_error(path)


# --- empty, missing and malformed files --------------------------------------------------------


def test_zero_byte_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"")
    message = snapshot_error(path)
    assert "snapshot file is empty (0 bytes" in message
    assert "header line `user_id`" in message


@pytest.mark.parametrize("text", ["user_id\n", "user_id", "user_id,email\r\n", "user_id,email"])
def test_header_only_file_is_a_valid_empty_audience(tmp_path: Path, text: str) -> None:
    path = tmp_path / "a.csv"
    path.write_text(text, encoding="utf-8")
    snapshot = load(path)
    assert snapshot.rows == 0
    assert len(snapshot.members) == 0
    assert snapshot.rejected_count == 0


def test_header_only_parquet_is_a_valid_empty_audience(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"user_id": pa.array([], pa.string())})
    snapshot = load(path)
    assert snapshot.rows == 0
    assert len(snapshot.members) == 0


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    message = snapshot_error(tmp_path / "gone.csv")
    assert "snapshot file not found" in message
    assert "`source`" in message


def test_malformed_csv_names_file_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "user_id,email\n1,a@example.com\n2,b@example.com,oops\n")
    message = snapshot_error(path)
    assert "line 3 has 3 values but the header has 2 columns" in message


def test_non_utf8_csv_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes("user_id,name\n1,Café\n".encode("latin-1"))
    message = snapshot_error(path)
    assert "line 2 is not UTF-8" in message


def test_utf8_bom_is_not_part_of_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("\ufeffuser_id,email\n1,a@example.com\n", encoding="utf-8")
    assert ids(load(path)) == ["1"]


def test_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.parquet", "user_id\n1\n")
    message = snapshot_error(path)
    assert "cannot read snapshot" in message
    assert "Parquet" in message


# --- identity traits and extra columns ---------------------------------------------------------


def test_identity_traits_are_carried_and_blanks_are_missing(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "a.csv",
        """
        user_id,email,name,phone,avatar,plan,ltv
        1,a@example.com,Ann,+33 6 00,https://x/a.png,gold,12.5
        2,,  ,,,silver,3
        3, c@example.com ,Cy,,,,
        """,
    )
    members = load(path).members
    assert list(members.columns) == ["email", "name", "phone", "avatar"]  # extras ignored
    assert members.loc["1"].to_dict() == {
        "email": "a@example.com",
        "name": "Ann",
        "phone": "+33 6 00",
        "avatar": "https://x/a.png",
    }
    assert members.loc["2"].isna().all()  # blank and whitespace-only traits are missing
    assert members.loc["3", "email"] == "c@example.com"
    assert members.loc["3", "phone"] is pd.NA


def test_only_present_identity_traits_are_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "email,user_id\na@example.com,1\n")
    members = load(path).members
    assert list(members.columns) == ["email"]
    assert members.index.name == "user_id"


def test_parquet_extra_columns_of_any_type_are_ignored(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "a.parquet",
        {
            "user_id": pa.array(["1", "2"]),
            "email": pa.array(["a@example.com", None]),
            "tags": pa.array([["a", "b"], []]),
            "address": pa.array([{"city": "Paris"}, {"city": "Lyon"}]),
            "score": pa.array([1.5, 2.0]),
        },
    )
    members = load(path).members
    assert list(members.columns) == ["email"]
    assert members.loc["1", "email"] == "a@example.com"
    assert members.loc["2", "email"] is pd.NA


def test_extra_columns_do_not_make_rows_conflict(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", "user_id,email,seen_at\n1,a@x,monday\n1,a@x,tuesday\n")
    snapshot = load(path)
    assert ids(snapshot) == ["1"]
    assert snapshot.rejected_count == 0


# --- SQL ---------------------------------------------------------------------------------------


@pytest.fixture
def warehouse(tmp_path: Path) -> str:
    db = tmp_path / "warehouse.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "create table users (id integer, code text, email text, name text, score real)"
        )
        conn.executemany(
            "insert into users values (?, ?, ?, ?, ?)",
            [
                (7, "007", "a@example.com", "Ann", 1.5),
                (None, None, "b@example.com", "Bob", 2.0),
                (12345678901234, "x", None, "  ", None),
                (8, "008", "c@example.com", None, 3.0),
            ],
        )
    conn.close()
    return f"sqlite:///{db}"


def test_sql_integer_ids_with_nulls_are_text_without_decimal(warehouse: str) -> None:
    snapshot = load_query(warehouse, "select id as user_id, email, name from users order by rowid")
    assert ids(snapshot) == ["7", "12345678901234", "8"]
    assert snapshot.rows == 4
    assert snapshot.rejected_count == 1
    assert [(r.row, r.user_id) for r in snapshot.rejected] == [(2, None)]
    assert snapshot.source == "query for 'VIP'"
    members = snapshot.members
    assert list(members.columns) == ["email", "name"]
    assert members.loc["7", "name"] == "Ann"
    assert members.loc["12345678901234", "email"] is pd.NA
    assert members.loc["12345678901234", "name"] is pd.NA  # blank -> missing


def test_sql_text_ids_stay_text(warehouse: str) -> None:
    snapshot = load_query(warehouse, "select code as user_id from users order by rowid")
    assert ids(snapshot) == ["007", "x", "008"]


def test_sql_empty_result_is_an_empty_audience(warehouse: str) -> None:
    snapshot = load_query(warehouse, "select id as user_id from users where 0")
    assert snapshot.rows == 0
    assert len(snapshot.members) == 0


def test_sql_float_ids_are_refused(warehouse: str) -> None:
    with pytest.raises(SnapshotError) as excinfo:
        load_query(warehouse, "select score as user_id from users")
    message = str(excinfo.value)
    assert "column `user_id` is a floating-point number" in message
    assert "'7.0'" in message


def test_sql_without_user_id_column(warehouse: str) -> None:
    with pytest.raises(SnapshotError) as excinfo:
        load_query(warehouse, "select id, email from users")
    message = str(excinfo.value)
    assert "query for 'VIP': no `user_id` column (columns found: 'id', 'email')" in message


def test_sql_error_is_a_snapshot_error(warehouse: str) -> None:
    with pytest.raises(SnapshotError) as excinfo:
        load_query(warehouse, "select nope as user_id from users")
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 4
    assert "failed: no such column: nope" in message
    assert warehouse in message


def test_sql_statement_without_rows(warehouse: str) -> None:
    with pytest.raises(SnapshotError, match="does not return rows"):
        load_query(warehouse, "delete from users where 0")


def test_sql_connection_error_hides_password() -> None:
    # Port 1 on the loopback interface refuses at once: no traffic leaves the machine.
    url = "postgresql+psycopg://reader:hunter2@127.0.0.1:1/warehouse?connect_timeout=2"
    with pytest.raises(SnapshotError) as excinfo:
        load_query(url, "select 1 as user_id")
    message = str(excinfo.value)
    assert "hunter2" not in message
    assert "reader:***@127.0.0.1:1/warehouse" in message
    assert "failed" in message


@pytest.mark.parametrize(
    "url",
    ["nosuchdb://reader:hunter2@host/db", "postgresql://reader:hunter2@host:port/db", "hunter2"],
)
def test_unusable_source_url_hides_password(url: str) -> None:
    with pytest.raises(SnapshotError) as excinfo:
        load_query(url, "select 1 as user_id")
    message = str(excinfo.value)
    assert "source_url is not a usable SQLAlchemy URL" in message
    assert "hunter2" not in message


def test_snapshot_of_a_configured_audience(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    write_csv(tmp_path / "exports" / "vip.csv", "user_id,email\n007,a@example.com\n")
    path = write_config(
        tmp_path / "audience-sync.toml",
        state_url="sqlite:///s.db",
        audiences=[{"name": "VIP", "source": "exports/vip.csv"}],
    )
    (audience,) = load_config(path, env={}).audiences
    snapshot = load_snapshot(audience)
    assert ids(snapshot) == ["007"]
    assert snapshot.source == str(tmp_path / "exports" / "vip.csv")
