"""The composition root (``runtime.py``) and who owns which tables: a destination is handed the
state database only when it keeps tables there, the state declares none of a destination's, and
nothing in ``state/`` imports a destination."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config, write_csv

import audience_sync.state
from audience_sync import load_config
from audience_sync.destinations import table_metadata
from audience_sync.runtime import open_state, resources
from audience_sync.state.schema import metadata


@pytest.mark.parametrize(
    ("destination", "keeps_tables", "budget"),
    [
        ({"type": "jsonl", "path": "out.jsonl"}, False, None),
        ({"type": "crisp", "website_id": "w1", "daily_request_budget": 70}, True, 70),
    ],
)
def test_only_a_destination_keeping_tables_is_handed_the_state_database(
    tmp_path: Path, destination: dict[str, Any], keeps_tables: bool, budget: int | None
) -> None:
    write_csv(tmp_path / "vip.csv", "user_id\nu1\n")
    path = write_config(
        tmp_path / "c.toml",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        audiences=[{"name": "VIP", "source": "vip.csv"}],
        destination=destination,
    )
    config = load_config(path)
    assert config.destination.settings.request_budget == budget
    with resources(config) as (engine, dest):
        assert type(dest).uses_state is keeps_tables
        if keeps_tables:
            assert dest.state is engine
        else:
            with pytest.raises(TypeError, match="given no state database"):
                dest.state  # noqa: B018


def test_open_state_does_not_create_a_missing_sqlite_file_when_told_not_to(tmp_path: Path) -> None:
    with open_state(f"sqlite:///{tmp_path / 'state.db'}", create=False) as engine:
        assert engine.url.database in (None, "")  # an in-memory stand-in
    assert not (tmp_path / "state.db").exists()


def test_the_state_declares_no_destination_table_and_imports_no_destination() -> None:
    own = set(metadata.tables)
    destinations = [set(m.tables) for m in table_metadata()]
    assert {"crisp_people", "crisp_facts", "destination_requests"} <= set().union(*destinations)
    assert all(not (own & tables) for tables in destinations)
    folder = Path(audience_sync.state.__file__).parent
    for source in folder.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("audience_sync.destinations") for n in names), source
