"""The engine's scale paths: a run with no changes writes nothing but its run row, identities
are looked up per chunk without mixing users up, and a query in the state database is diffed
there, with the same result as the in-memory diff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import read_jsonl, write_config, write_csv

from audience_sync.config import load_config
from audience_sync.engine import sync
from audience_sync.errors import StateError
from audience_sync.state import StateStore

STATE_TABLES = ("sync_audiences", "sync_members", "sync_pending", "sync_changes", "sync_locks")


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        tables = {
            t: sorted(map(tuple, conn.execute(sa.text(f"SELECT * FROM {t}")))) for t in STATE_TABLES
        }
    engine.dispose()
    return tables


def test_a_run_without_changes_writes_only_its_run_rows(tmp_path: Path, state_url: str) -> None:
    write_csv(tmp_path / "a.csv", "user_id,email\n1,a@x\n2,b@x\n")
    write_csv(tmp_path / "b.csv", "user_id\n2\n3\n")
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "A", "source": "a.csv"}, {"name": "B", "source": "b.csv"}],
    )
    assert sync(load_config(config)).exit_code == 0
    before = dump(state_url)
    output = (tmp_path / "out.jsonl").read_text()

    result = sync(load_config(config))

    assert result.exit_code == 0
    assert [r.counts["unchanged"] for r in result.audiences] == [2, 2]
    assert dump(state_url) == before  # the lock row came and went; nothing else moved
    assert (tmp_path / "out.jsonl").read_text() == output
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT status, entered, exited FROM sync_runs")).all()
    engine.dispose()
    assert [tuple(r) for r in runs[2:]] == [("succeeded", 0, 0), ("succeeded", 0, 0)]


@pytest.mark.parametrize("flush_every", [1, 3, 1000])
def test_each_user_gets_their_own_identity_across_batches(
    tmp_path: Path, state_url: str, flush_every: int
) -> None:
    users = range(1, 21)
    write_csv(
        tmp_path / "a.csv",
        "user_id,email\n" + "".join(f"{u},{u}@a\n" for u in users if u % 2),
    )
    write_csv(
        tmp_path / "b.csv",
        "user_id,email,name\n" + "".join(f"{u},,N{u}\n" for u in users if u % 3),
    )
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "A", "source": "a.csv"}, {"name": "B", "source": "b.csv"}],
        destination={"type": "jsonl", "path": "out.jsonl", "flush_every": flush_every},
    )
    assert sync(load_config(config)).exit_code == 0

    by_user: dict[str, dict[str, Any]] = {}
    for message in read_jsonl(tmp_path / "out.jsonl"):
        by_user.setdefault(message["userId"], {}).update(message["traits"])
    for u in users:
        traits = by_user.get(str(u), {})
        if u % 2:
            assert traits["email"] == f"{u}@a" and traits["a"] is True
        if u % 3:
            assert traits["name"] == f"N{u}" and traits["b"] is True
        if not u % 2 and not u % 3:
            assert traits == {}
        if not u % 2:
            assert "email" not in traits  # B's empty email is unknown, not ""


def test_a_query_in_the_state_database_is_diffed_there(tmp_path: Path, state_url: str) -> None:
    engine = sa.create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE customers (user_id TEXT, email TEXT, vip INTEGER)"))
        conn.execute(
            sa.text("INSERT INTO customers VALUES (:u, :e, :v)"),
            [{"u": str(u), "e": f"{u}@x", "v": int(u < 4)} for u in range(1, 6)],
        )
    query = "SELECT user_id, email FROM customers WHERE vip = 1"
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "query": query, "source_url": state_url}],
    )
    first = sync(load_config(config))
    assert first.audiences[0].counts["entered"] == 3
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customers SET vip = 1 - vip WHERE user_id IN ('1', '4')"))
    second = sync(load_config(config))
    engine.dispose()

    counts = second.audiences[0].counts
    assert (counts["entered"], counts["exited"], counts["unchanged"]) == (1, 1, 2)
    messages = read_jsonl(tmp_path / "out.jsonl")[3:]
    assert {(m["userId"], m["traits"]["vip"]) for m in messages} == {("4", True), ("1", False)}
    assert next(m for m in messages if m["userId"] == "4")["traits"]["email"] == "4@x"


def test_a_failed_commit_ends_the_run_and_the_next_run_resends_only_its_batch(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30 users, confirmed 10 at a time; each batch is committed while the next is delivered.
    users = [f"u{i:03d}" for i in range(30)]
    write_csv(tmp_path / "a.csv", "user_id,email\n" + "".join(f"{u},{u}@x\n" for u in users))
    config = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "A", "source": "a.csv"}],
        destination={"type": "jsonl", "path": "out.jsonl", "flush_every": 10},
    )
    applied: list[list[str]] = []
    real_apply = StateStore.apply

    def apply(self: StateStore, batches: Any, on_commit: Any = None) -> None:
        applied.append([u for b in batches for u in b.added])
        if len(applied) == 2:
            raise StateError("the state database went away")
        real_apply(self, batches, on_commit)

    monkeypatch.setattr(StateStore, "apply", apply)
    with pytest.raises(StateError, match="went away"):
        sync(load_config(config))
    # The second batch's commit failed; the first was committed before it and the third (already
    # confirmed by the destination) after it. Only the second is missing from the state.
    assert applied == [users[:10], users[10:20], users[20:]]
    engine = sa.create_engine(state_url)
    with engine.connect() as conn:
        members = sorted(conn.execute(sa.text("SELECT user_id FROM sync_members")).scalars())
        status = conn.execute(sa.text("SELECT status FROM sync_runs")).scalar_one()
    engine.dispose()
    assert members == users[:10] + users[20:]
    assert status == "failed"

    monkeypatch.undo()
    result = sync(load_config(config))
    assert result.exit_code == 0
    sent = [m["userId"] for m in read_jsonl(tmp_path / "out.jsonl")]
    assert sent == users + users[10:20]  # the failed batch once more, nothing else


def test_a_run_whose_changes_spill_to_disk_sends_and_records_what_one_in_memory_does(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Initial, incremental (with a user entering and leaving), then ``--full`` (every member
    re-sent, none added twice), through the spilled path on this backend and the in-memory
    path on a SQLite file of its own: the same messages and the same members."""
    import tempfile

    from audience_sync import changes

    def runs(url: str, folder: Path, spill_at: int) -> tuple[list[dict[str, Any]], set[Any]]:
        folder.mkdir()
        monkeypatch.setattr(changes, "SPILL_CHANGES", spill_at)
        audiences = [{"name": "A", "source": "a.csv"}, {"name": "B", "source": "b.csv"}]
        config = write_config(
            folder / "c.toml",
            state_url=url,
            audiences=audiences,
            destination={"type": "jsonl", "path": "out.jsonl", "flush_every": 3},
        )
        for a, b, full in (
            ("1,a1@x\n2,\n3,a3@x\n", "2,,B2\n3,,B3\n4,,B4\n", False),
            ("1,a1@x\n3,a3@x\n5,a5@x\n", "3,,B3\n4,,B4\n", False),
            ("1,a1@x\n3,a3@x\n5,a5@x\n", "3,,B3\n4,,B4\n6,,B6\n", True),
        ):
            write_csv(folder / "a.csv", "user_id,email\n" + a)
            write_csv(folder / "b.csv", "user_id,email,name\n" + b)
            assert sync(load_config(config), full=full).exit_code == 0
        messages = [
            {k: v for k, v in m.items() if k != "timestamp"}
            for m in read_jsonl(folder / "out.jsonl")
        ]
        return messages, set(dump(url)["sync_members"])

    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_dir))
    spilled = runs(state_url, tmp_path / "spilled", 0)
    assert list(spill_dir.iterdir()) == []  # each run removed its spilled changes
    kept = runs(f"sqlite:///{tmp_path / 'memory.db'}", tmp_path / "memory", 10**9)
    assert spilled == kept
    assert len(spilled[0]) == 6 + 3 + 6  # initial, incremental, full (two new, four re-sent)
