"""A URL whose database driver is not installed says which package to install."""

from __future__ import annotations

import sys

import pytest

from audience_sync.errors import SnapshotError, StateError
from audience_sync.sources.sql import read_query
from audience_sync.state import connect


def test_state_on_postgresql_without_the_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if `[postgres]` were not installed
    with pytest.raises(StateError) as info:
        connect("postgresql+psycopg://sync:s3cret@db.internal/audience_sync")
    message = str(info.value)
    assert "pip install 'audience-sync[postgres]'" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("url", "package"),
    [
        ("postgresql+psycopg2://u@h/db", "psycopg2-binary"),
        ("mysql+mysqldb://u@h/db", "mysqlclient"),
        ("mssql+pymssql://u@h/db", "pymssql"),
    ],
)
def test_a_sql_source_names_the_driver_package(
    monkeypatch: pytest.MonkeyPatch, url: str, package: str
) -> None:
    for module in ("psycopg2", "MySQLdb", "pymssql"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SnapshotError, match=rf"source_url needs .* pip install {package}"):
        read_query(url, "SELECT 1 AS user_id")
