"""Shared fixtures: every state-touching test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from ``AUDIENCE_SYNC_TEST_PG_URL`` (``scripts/with-postgres`` sets it up). Each
test gets its own PostgreSQL schema, so tests never see each other's tables. Without the
variable the PostgreSQL half is skipped locally, but fails under CI (``CI=true``) or
``AUDIENCE_SYNC_REQUIRE_PG=1``: a PostgreSQL that cannot be reached is never silently skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

PG_URL_ENV = "AUDIENCE_SYNC_TEST_PG_URL"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Runs the CLI with the test-only destinations registered (tests/slow_destination.py).
LAUNCHER = TESTS / "cli_with_test_destinations.py"


def _pg_required() -> bool:
    return (
        os.environ.get("CI", "").lower() == "true"
        or os.environ.get("AUDIENCE_SYNC_REQUIRE_PG") == "1"
    )


@pytest.fixture(autouse=True)
def _own_working_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test starts in an empty folder of its own, and so do the commands it runs without a
    ``cwd``: files in the folder pytest was started from (the ``audience_sync.db`` the README's
    first command leaves in the repository) must not change what a test sees."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _own_cache_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL state's member cache goes under ``$XDG_CACHE_HOME``: never the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty state database; the test runs once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    base = os.environ.get(PG_URL_ENV)
    if not base:
        if _pg_required():
            pytest.fail(f"{PG_URL_ENV} is not set: PostgreSQL tests cannot be skipped in CI")
        pytest.skip(f"set {PG_URL_ENV} (or run scripts/with-postgres) for the PostgreSQL half")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL_ENV} is not reachable: {exc.orig}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def write_config(
    path: Path,
    *,
    state_url: str,
    audiences: list[dict[str, Any]],
    destination: dict[str, Any] | None = None,
    extra: str = "",
    computed_traits: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
) -> Path:
    """Write a TOML config (values rendered with repr-compatible TOML literals)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    destination = destination or {"type": "jsonl", "path": "out.jsonl"}
    lines = ["[state]", f"url = {literal(state_url)}", "", "[destination]"]
    lines += [f"{k} = {literal(v)}" for k, v in destination.items()]
    for audience in audiences:
        lines += ["", "[[audiences]]"] + [f"{k} = {literal(v)}" for k, v in audience.items()]
    for trait in computed_traits:
        lines += ["", "[[computed_traits]]"] + [f"{k} = {literal(v)}" for k, v in trait.items()]
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(extra), encoding="utf-8")
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def write_users(path: Path, n: int, start: int = 0) -> Path:
    """A snapshot of the users ``u{start}`` to ``u{start + n - 1}``, each with an email."""
    rows = "".join(f"u{i},u{i}@example.com\n" for i in range(start, start + n))
    return write_csv(path, "user_id,email\n" + rows)


# -- Reading what a run left: the JSONL destination's file and the state database ----------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The messages the JSONL destination wrote to ``path``, oldest first (none: no file)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def runs(state_url: str) -> list[dict[str, Any]]:
    """The state's runs, newest first, as ``StateStore.runs`` reads them (``history``)."""
    from audience_sync.state import StateStore, connect

    engine = connect(state_url)
    try:
        return StateStore(engine).runs(limit=1000)
    finally:
        engine.dispose()


def state_members(state_url: str, key: str, destination: str = "jsonl") -> set[str]:
    """The members of audience ``key`` the state holds for ``destination`` (none: no audience)."""
    from audience_sync.state import StateStore, connect

    engine = connect(state_url)
    try:
        store = StateStore(engine)
        ref = store.find_audience(destination, key)
        return set(store.members(ref.id)) if ref else set()
    finally:
        engine.dispose()


def execute(
    state_url: str, sql: str, rows: list[dict[str, Any]] | None = None, /, **params: Any
) -> None:
    """Run ``sql`` on the state database in one transaction, once per row of ``rows`` or once
    with ``params``: to seed or age what a test needs."""
    engine = sa.create_engine(state_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), rows or [params])
    finally:
        engine.dispose()


def query(state_url: str, sql: str) -> list[dict[str, Any]]:
    """The rows of ``sql`` on the state database, as dicts (for what no store method reads)."""
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(sql)).mappings()]
    finally:
        engine.dispose()


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real, installed ``audience-sync`` console script."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(Path(sys.executable).parent / "audience-sync"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_when_written(config: Path, out: Path, size: int = 200_000) -> int:
    """Start ``audience-sync run --config config`` and SIGKILL it once ``out`` holds ``size``
    bytes; returns how many lines were written by then (the last one may be cut short)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "audience-sync"), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    # Generous: a loaded 2-core machine can take minutes to start writing.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < size):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return out.read_text().count("\n") if out.exists() else 0


# -- Memory tests: resident memory of a child process --------------------------------------------

#: Source of ``rss_mb()``, the resident memory in MB, for the child scripts of memory tests.
RSS_MB_SOURCE = """
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
"""

#: Memory tests read RSS from /proc (Linux).
needs_proc_rss = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="reads RSS from /proc"
)


# -- Crisp: the loopback server and a destination pointed at it ----------------------------------

CRISP_WEBSITE = "website-1"
CRISP_IDENTIFIER = "plugin-identifier-7f3a"
CRISP_KEY = "plugin-key-s3cr3t-91c2"


@pytest.fixture
def crisp() -> Iterator[Any]:
    """A Crisp-compatible server on 127.0.0.1 (tests/crisp_server.py), stopped afterwards."""
    from crisp_server import CrispServer

    with CrispServer(
        website_id=CRISP_WEBSITE, identifier=CRISP_IDENTIFIER, key=CRISP_KEY, tier="plugin"
    ) as server:
        yield server
    assert server.errors == []


def crisp_env() -> dict[str, str]:
    return {"CRISP_IDENTIFIER": CRISP_IDENTIFIER, "CRISP_KEY": CRISP_KEY}


def crisp_destination(server: Any, **options: Any) -> dict[str, Any]:
    """A ``[destination]`` table for ``server``; fast pacing unless a test says otherwise."""
    return {
        "type": "crisp",
        "website_id": server.website_id,
        "api_url": server.url,
        "requests_per_second": 1000,
        "max_concurrency": 8,
        **options,
    }
