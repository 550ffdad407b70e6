"""Issue 14: a run whose snapshot is unchanged since the state matched it skips the diff, and
one whose snapshot changed diffs against the member cache instead of reading the database.

Neither may ever change a result: a state machine drives two states in one database (two
destination names) through the same snapshot edits, configuration changes, destination faults,
``--full`` runs, retires and interrupted runs, one with the skip and the member cache and one
without either, while the cache's files are deleted, corrupted, truncated, replaced by stale
ones or by valid files holding other ids; every run must send exactly the same changes, end the
same way and leave the same state. Focused tests pin the rules the machine relies on (SQLite
and PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, query, runs, write_config, write_users
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from recording_destination import RecordingDestination

from audience_sync import load_config, retire, sync
from audience_sync.config import Config
from audience_sync.errors import AudienceSyncError
from audience_sync.model import RunStatus
from audience_sync.state import StateStore, connect, upgrade
from audience_sync.state.membercache import MemberCache

USERS = [f"u{i}" for i in range(6)]
SPELLINGS = ["7", "7.0", "7.5", "true", "gold", ""]
_names = itertools.count()


def _config(path: Path, state_url: str, *, column: str, type_: str, vip: bool = True) -> Config:
    audiences = [{"name": "VIP", "source": "vip.parquet"}] if vip else []
    trait = {"name": "LTV", "source": "ltv.csv", "column": column, "type": type_}
    return load_config(
        write_config(path, state_url=state_url, audiences=audiences, computed_traits=[trait])
    )


def _without_skip(config: Config) -> Config:
    return dataclasses.replace(
        config, state=config.state.model_copy(update={"skip_unchanged": False})
    )


def _state(state_url: str, destination: str) -> dict[str, Any]:
    """Everything a later run plans from: members and values, and the retry rows."""
    engine = connect(state_url)
    try:
        store = StateStore(engine)
        found: dict[str, Any] = {}
        for key in ("vip", "ltv"):
            ref = store.find_audience(destination, key)
            if ref is None:
                continue
            ids, values = store.values(ref.id)
            retry = store.retry_queue(ref.id)
            found[key] = (
                dict(zip(ids, values.to_pylist(), strict=True)),
                sorted(
                    zip(retry.index, retry["value"], retry["data"], retry["status"], strict=True)
                ),
            )
        return found
    finally:
        engine.dispose()


def _sent(dest: RecordingDestination) -> list[tuple[str, list[tuple[str, Any]]]]:
    return sorted((u.user_id, sorted(u.traits.items())) for u in dest.updates)


class SkipEquivalence(RuleBasedStateMachine):
    """Two states, ``skip*`` (fingerprint skip on) and ``diff*`` (off), given the same runs."""

    state_url: ClassVar[str]
    folder: ClassVar[Path]
    skipped: ClassVar[int] = 0
    #: Member cache reads that found their file, and that fell back to the database.
    cache_reads: ClassVar[dict[str, int]] = {"hit": 0, "miss": 0}

    def __init__(self) -> None:
        super().__init__()
        n = next(_names)
        self.dir = self.folder / f"m{n}"
        self.dir.mkdir()
        self.names = (f"skip{n}", f"diff{n}")
        self.members: dict[str, str] = {"u0": "a@x.io", "u1": "b@x.io"}
        self.values: dict[str, tuple[str, str]] = {"u0": ("7", "gold")}
        self.compression = "snappy"
        self.crlf = False
        self.column, self.type = "value", "auto"
        self.old_files: list[bytes] = []  # cache files seen before, to put back as stale ones
        self._write()

    def _write(self) -> None:
        ids = sorted(self.members)
        table = pa.table({"user_id": ids, "email": [self.members[u] for u in ids]})
        pq.write_table(table, self.dir / "vip.parquet", compression=self.compression)
        end = "\r\n" if self.crlf else "\n"
        lines = ["user_id,value,alt"] + [
            f'{u},"{v}","{a}"' for u, (v, a) in sorted(self.values.items())
        ]
        (self.dir / "ltv.csv").write_bytes(end.join(lines).encode() + end.encode())

    def _configs(self, *, vip: bool = True) -> tuple[Config, Config]:
        config = _config(
            self.dir / "c.toml", self.state_url, column=self.column, type_=self.type, vip=vip
        )
        return config, _without_skip(config)

    def _both(self, call: Any, *, vip: bool = True, **faults: Any) -> None:
        """``call(config, dest)`` on both states; they must send and end the same."""
        outcomes = []
        for name, config in zip(self.names, self._configs(vip=vip), strict=True):
            dest = RecordingDestination(name, batch=2, **faults)
            try:
                result = call(config, dest)
                ended: Any = [(r.status, r.counts, r.error) for r in result.audiences]
            except AudienceSyncError as exc:  # e.g. nothing left to retire
                ended = type(exc).__name__
            outcomes.append((_sent(dest), ended))
        assert outcomes[0] == outcomes[1]
        assert _state(self.state_url, self.names[0]) == _state(self.state_url, self.names[1])

    @rule(
        edit=st.sampled_from(["none", "add", "remove", "email", "reencode", "value"]),
        user=st.sampled_from(USERS),
        value=st.sampled_from(SPELLINGS),
        alt=st.sampled_from(SPELLINGS),
    )
    def edit_snapshot(self, edit: str, user: str, value: str, alt: str) -> None:
        if edit == "add":
            self.members[user] = f"{user}@x.io"
        elif edit == "remove":
            self.members.pop(user, None)
            self.values.pop(user, None)
        elif edit == "email" and self.members:
            first = sorted(self.members)[0]
            self.members[first] = f"new-{self.members[first]}"
        elif edit == "reencode":  # the same rows in other bytes
            self.compression = "zstd" if self.compression == "snappy" else "snappy"
            self.crlf = not self.crlf
        elif edit == "value":
            self.values[user] = (value, alt)
        self._write()

    @rule(column=st.sampled_from(["value", "alt"]), type_=st.sampled_from(["auto", "string"]))
    def edit_config(self, column: str, type_: str) -> None:
        self.column, self.type = column, type_

    @rule(
        fail=st.sets(st.sampled_from(USERS), max_size=2),
        permanent=st.sets(st.sampled_from(USERS), max_size=1),
        skip=st.sets(st.sampled_from(USERS), max_size=1),
        full=st.booleans(),
        retry_failed=st.booleans(),
    )
    def run(
        self, fail: set[str], permanent: set[str], skip: set[str], full: bool, retry_failed: bool
    ) -> None:
        self._both(
            lambda c, d: sync(c, destination=d, force=True, full=full, retry_failed=retry_failed),
            fail=fail,
            permanent=permanent - fail,
            skip=skip - fail - permanent,
        )

    @rule(times=st.integers(1, 3))
    def run_clean(self, times: int) -> None:
        """Runs with no fault and no edit: where the skip applies."""
        for _ in range(times):
            self._both(lambda c, d: sync(c, destination=d, force=True))
        SkipEquivalence.skipped += sum(
            1 for r in runs(self.state_url) if r["unchanged_since"] is not None
        )

    @rule(after=st.integers(0, 2))
    def interrupted(self, after: int) -> None:
        """A run stopped part-way (as Ctrl-C stops it) after ``after`` updates."""
        self._both(
            lambda c, d: sync(c, destination=d, force=True),
            stop_after=after,
            stop_with=KeyboardInterrupt(),
        )

    @rule(
        how=st.sampled_from(["delete", "corrupt", "edit an id", "truncate", "stale", "other ids"]),
        user=st.sampled_from(USERS),
    )
    def tamper_with_the_cache_then_run(self, how: str, user: str) -> None:
        """Whatever happens to the cache's files, the next run whose snapshot changed (here
        ``user`` entered or left) reads the database instead."""
        folder = self._configs()[0].state.member_cache_folder()
        assert folder is not None
        for path in sorted(folder.glob("audience-*.arrow")):
            data = path.read_bytes()
            stale = [old for old in self.old_files if old != data]
            if how == "delete":
                path.unlink()
            elif how == "corrupt":  # one byte flipped: metadata, ids or padding
                middle = len(data) // 2
                path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
            elif how == "edit an id":  # still well formed, as many ids, one of them another
                found = [u.encode() for u in USERS if u.encode() in data]
                if found:
                    path.write_bytes(data.replace(found[0], b"u9", 1))
            elif how == "truncate":
                path.write_bytes(data[: len(data) // 2])
            elif how == "stale" and stale:
                path.write_bytes(stale[-1])
            elif how == "other ids":  # a well-formed cache file, of other members
                other = MemberCache(folder / "other")
                digest = other.write(0, pd.Index(["u9", *USERS[:2]], dtype="string[pyarrow]"))
                assert digest is not None
                path.write_bytes(other.path(0, digest).read_bytes())
            self.old_files.append(data)
        if self.members.pop(user, None) is None:
            self.members[user] = f"{user}@x.io"
        self._write()
        self._both(lambda c, d: sync(c, destination=d, force=True))

    @rule()
    def retire_vip(self) -> None:
        """Retire the audience (the config without it); the next run syncs it from scratch."""
        self._both(lambda c, d: retire(c, "VIP", destination=d), vip=False)


def test_the_skip_and_the_member_cache_never_change_what_is_sent_or_the_state(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = connect(state_url)
    upgrade(engine)
    engine.dispose()
    SkipEquivalence.state_url = state_url
    SkipEquivalence.folder = tmp_path
    SkipEquivalence.skipped = 0
    SkipEquivalence.cache_reads = reads = {"hit": 0, "miss": 0}
    read = MemberCache.read

    def counted(self: MemberCache, audience_id: int, digest: str, members: int) -> Any:
        found = read(self, audience_id, digest, members)
        reads["miss" if found is None else "hit"] += 1
        return found

    monkeypatch.setattr(MemberCache, "read", counted)
    run_state_machine_as_test(
        SkipEquivalence,
        settings=settings(
            max_examples=8,
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert SkipEquivalence.skipped > 0  # the skip did happen, so it was compared
    # So did diffs against the cache, and against the database after the cache was spoiled.
    assert reads["hit"] > 0 and reads["miss"] > 0, reads


# -- focused rules -------------------------------------------------------------------------------


@pytest.fixture
def vip(tmp_path: Path, state_url: str) -> Config:
    write_users(tmp_path / "vip.csv", 4)
    path = write_config(
        tmp_path / "c.toml",
        state_url=state_url,
        audiences=[{"name": "VIP", "source": "vip.csv"}],
    )
    return load_config(path)


def _fingerprints(state_url: str) -> list[dict[str, Any]]:
    return query(state_url, "SELECT * FROM sync_fingerprints")


def test_an_unchanged_snapshot_is_recorded_as_a_skipped_run(vip: Config, state_url: str) -> None:
    first = sync(vip, destination=RecordingDestination("jsonl"))
    dest = RecordingDestination("jsonl")
    again = sync(vip, destination=dest).audiences[0]
    assert dest.updates == []
    assert again.status is RunStatus.SUCCEEDED
    assert again.counts["unchanged"] == 4 and again.counts["snapshot_rows"] == 4
    newest = runs(state_url)[0]
    assert newest["unchanged_since"] == first.audiences[0].run_id
    assert newest["status"] == "succeeded"
    shown = cli("history", str(newest["id"]), "--config", str(vip.path))
    assert shown.returncode == 0, shown.stderr
    assert f"snapshot unchanged since run {first.audiences[0].run_id}" in shown.stdout
    # The off switch and --full diff for real; neither is shown as skipped.
    sync(_without_skip(vip), destination=RecordingDestination("jsonl"))
    assert runs(state_url)[0]["unchanged_since"] is None
    full = RecordingDestination("jsonl")
    sync(vip, destination=full, full=True)
    assert len(full.updates) == 4
    assert runs(state_url)[0]["unchanged_since"] is None


def test_a_retry_row_prevents_the_skip(vip: Config, state_url: str) -> None:
    sync(vip, destination=RecordingDestination("jsonl"))
    source = vip.config_dir / "vip.csv"
    source.write_text(source.read_text() + "u9,z@x.io\n")
    sync(vip, destination=RecordingDestination("jsonl", fail={"u9"}))
    # The snapshot is unchanged now, but u9 waits in the retry queue: the run must send it.
    dest = RecordingDestination("jsonl")
    sync(vip, destination=dest)
    assert [u.user_id for u in dest.updates] == ["u9"]
    assert runs(state_url)[0]["unchanged_since"] is None
    # A held permanent failure is a retry row too.
    source.write_text(source.read_text() + "u8,y@x.io\n")
    sync(vip, destination=RecordingDestination("jsonl", permanent={"u8"}))
    assert _fingerprints(state_url) == []
    sync(vip, destination=RecordingDestination("jsonl"))
    assert runs(state_url)[0]["unchanged_since"] is None
    held = RecordingDestination("jsonl")
    sync(vip, destination=held, retry_failed=True)
    assert [u.user_id for u in held.updates] == ["u8"]


def test_a_run_clears_the_fingerprint_as_it_starts(vip: Config, state_url: str) -> None:
    sync(vip, destination=RecordingDestination("jsonl"))
    assert len(_fingerprints(state_url)) == 1
    write_users(vip.config_dir / "vip.csv", 8)  # 4 users enter
    seen: list[int] = []

    class Watching(RecordingDestination):
        def outcome(self, update: Any) -> Any:
            seen.append(len(_fingerprints(state_url)))
            return super().outcome(update)

    dest = Watching("jsonl", stop_after=2, stop_with=KeyboardInterrupt(), batch=1)
    stopped = sync(vip, destination=dest).audiences[0]
    assert stopped.status is RunStatus.INTERRUPTED
    assert seen and set(seen) == {0}  # a kill at any point of delivery leaves none
    assert _fingerprints(state_url) == []
    assert runs(state_url)[0]["status"] == "interrupted"
    # The next run diffs, sends what is left, and records the fingerprint again.
    rest = RecordingDestination("jsonl")
    sync(vip, destination=rest)
    assert rest.updates and runs(state_url)[0]["unchanged_since"] is None
    assert len(_fingerprints(state_url)) == 1


def test_a_dry_run_never_writes_the_fingerprint_or_the_member_cache(
    vip: Config, state_url: str
) -> None:
    sync(vip, destination=RecordingDestination("jsonl"))
    stored = _fingerprints(state_url)
    assert len(stored) == 1 and stored[0]["members_cache"]
    folder = vip.state.member_cache_folder()
    assert folder is not None
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    named = MemberCache(folder).path(stored[0]["audience_id"], stored[0]["members_cache"])
    assert list(files) == [named.name]
    sync(vip, destination=RecordingDestination("jsonl"), dry_run=True)
    (vip.config_dir / "vip.csv").write_text("user_id\nu1\n")
    sync(vip, destination=RecordingDestination("jsonl"), dry_run=True, full=True)
    assert _fingerprints(state_url) == stored
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_a_stale_unchanged_snapshot_is_still_refused(vip: Config, state_url: str) -> None:
    aged = dataclasses.replace(
        vip, safeguards=vip.safeguards.model_copy(update={"max_snapshot_age": timedelta(hours=1)})
    )
    sync(aged, destination=RecordingDestination("jsonl"))
    later = datetime.now(UTC) + timedelta(hours=2)
    result = sync(aged, destination=RecordingDestination("jsonl"), clock=lambda: later)
    assert result.audiences[0].status is RunStatus.FAILED
    assert "older than max_snapshot_age" in (result.audiences[0].error or "")
    assert runs(state_url)[0]["unchanged_since"] is None
