"""The member cache (issue 14): a file is trusted only when its bytes are the ones the state's
fingerprint row names, and a changed snapshot is then diffed without reading the database."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import stat
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from conftest import query, write_config, write_users
from hypothesis import given, settings
from hypothesis import strategies as st
from recording_destination import RecordingDestination

from audience_sync import load_config, sync
from audience_sync.state import StateStore
from audience_sync.state.membercache import MemberCache

ids_strategy = st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=40)


def _index(ids: list[str]) -> pd.Index:
    return pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")


@settings(max_examples=40, deadline=None)
@given(ids=ids_strategy)
def test_a_written_file_reads_back_the_same_ids(
    tmp_path_factory: pytest.TempPathFactory, ids: list[str]
) -> None:
    cache = MemberCache(tmp_path_factory.mktemp("cache"))
    digest = cache.write(3, _index(ids))
    assert digest is not None
    back = cache.read(3, digest, len(ids))
    assert back is not None and back.tolist() == ids


def test_only_the_named_bytes_are_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = MemberCache(tmp_path / "cache")
    old = cache.write(1, _index(["a", "b"]))
    new = cache.write(1, _index(["a", "c"]))
    assert old is not None and new is not None and old != new
    # Writing the new file removed the old one: no run can use it again.
    assert list((tmp_path / "cache").iterdir()) == [cache.path(1, new)]
    caplog.set_level(logging.INFO)
    assert cache.read(1, old, 2) is None  # missing
    assert cache.read(1, new, 3) is None  # not as many ids as the state holds
    path = cache.path(1, new)
    path.write_bytes(path.read_bytes().replace(b"c", b"d"))
    assert cache.read(1, new, 2) is None  # edited
    path.write_bytes(b"not arrow")
    assert cache.read(1, new, 2) is None
    assert "does not hold what the state recorded" in caplog.text
    assert "not found" in caplog.text and "holds 2 ids, not 3" in caplog.text
    assert cache.read(2, new, 2) is None  # another audience's name


def test_a_file_named_by_a_blake2b_digest_is_a_quiet_miss_and_is_pruned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading from BLAKE2b names: the row's old digest finds no file (an info line, not a
    warning that the file was tampered with), and the audience's next write removes it."""
    cache = MemberCache(tmp_path / "cache")
    digest = cache.write(1, _index(["a", "b"]))
    assert digest is not None
    data = cache.path(1, digest).read_bytes()
    old_digest = hashlib.blake2b(data, digest_size=32).hexdigest()
    old = tmp_path / "cache" / f"audience-1-{old_digest}.arrow"
    cache.path(1, digest).rename(old)
    caplog.set_level(logging.INFO)
    assert cache.read(1, old_digest, 2) is None
    assert "not found" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    new = cache.write(1, _index(["a", "c"]))
    assert new is not None and list((tmp_path / "cache").iterdir()) == [cache.path(1, new)]


def test_a_chunked_index_is_written_and_read_back_whole(tmp_path: Path) -> None:
    """A snapshot read from Parquet comes in chunks (a row group each): written a batch per
    chunk, read back as the same ids in the same order."""
    chunks = [["u3", "u1"], [], ["u2"], ["u9", "u0", "u7"]]
    column = pa.chunked_array([pa.array(c, pa.large_string()) for c in chunks])
    ids = pd.Index(pd.array(column, dtype="string[pyarrow]"), name="user_id")
    cache = MemberCache(tmp_path / "cache")
    digest = cache.write(1, ids)
    assert digest is not None
    back = cache.read(1, digest, 6)
    assert back is not None and back.tolist() == ["u3", "u1", "u2", "u9", "u0", "u7"]
    none = pd.Index(pd.array(pa.chunked_array([], pa.large_string()), dtype="string[pyarrow]"))
    digest = cache.write(2, none)  # an audience with no member: no chunk at all
    assert digest is not None
    back = cache.read(2, digest, 0)
    assert back is not None and back.tolist() == []


def test_the_folder_is_the_owners_and_an_unwritable_one_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = MemberCache(tmp_path / "cache")
    assert cache.write(1, _index(["a"])) is not None
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert MemberCache(blocked / "cache").write(1, _index(["a"])) is None
    assert "member cache not written" in caplog.text


def test_the_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_users(tmp_path / "vip.csv", 1)
    audiences = [{"name": "VIP", "source": "vip.csv"}]

    def folder(url: str, extra: str = "") -> Path | None:
        path = write_config(tmp_path / "c.toml", state_url=url, audiences=audiences, extra=extra)
        return load_config(path, env={}).state.member_cache_folder()

    assert folder("sqlite:///state.db") == tmp_path / "state.db.cache"
    assert folder("sqlite://") is None  # in memory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pg = folder("postgresql+psycopg://sync:s3cret@db/marketing")
    assert pg is not None and pg.parent == tmp_path / "xdg" / "audience-sync"
    assert pg == folder("postgresql+psycopg://sync:other@db/marketing")  # not by password
    assert pg != folder("postgresql+psycopg://sync:s3cret@db/sales")
    rest = (
        '[destination]\ntype = "jsonl"\npath = "o.jsonl"\n'
        '[[audiences]]\nname = "VIP"\nsource = "vip.csv"\n'
    )
    chosen = tmp_path / "chosen.toml"
    chosen.write_text('[state]\nurl = "sqlite:///state.db"\ncache_dir = "here"\n' + rest)
    assert load_config(chosen, env={}).state.member_cache_folder() == tmp_path / "here"
    off = tmp_path / "off.toml"
    off.write_text('[state]\nurl = "sqlite:///state.db"\nskip_unchanged = false\n' + rest)
    assert load_config(off, env={}).state.member_cache_folder() is None  # named by its fact


def test_a_changed_snapshot_is_diffed_against_the_cache_not_the_database(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_users(tmp_path / "vip.csv", 5)
    config = load_config(
        write_config(
            tmp_path / "c.toml",
            state_url=state_url,
            audiences=[{"name": "VIP", "source": "vip.csv"}],
        )
    )
    sync(config, destination=RecordingDestination("jsonl"))
    (stored,) = query(state_url, "SELECT members_cache, members FROM sync_fingerprints")
    assert stored["members"] == 5 and stored["members_cache"]
    write_users(tmp_path / "vip.csv", 7)

    def no_database(self: StateStore, audience_id: int) -> pd.Index:
        raise AssertionError("the members were read from the database")

    monkeypatch.setattr(StateStore, "members", no_database)
    dest = RecordingDestination("jsonl")
    result = sync(config, destination=dest).audiences[0]
    assert sorted(u.user_id for u in dest.updates) == ["u5", "u6"]
    assert result.counts["unchanged"] == 5
    monkeypatch.undo()
    # Off: the same change is read from the database (and no file is named).
    off = config.state.model_copy(update={"member_cache": False})
    write_users(tmp_path / "vip.csv", 6)
    dest = RecordingDestination("jsonl")
    sync(dataclasses.replace(config, state=off), destination=dest)
    assert [(u.user_id, u.traits) for u in dest.updates] == [("u6", {"vip": False})]
    assert query(state_url, "SELECT members_cache FROM sync_fingerprints") == [
        {"members_cache": None}
    ]
