"""``audience-sync check``: what a run would do, found out without running it.

Reads each snapshot's header and row count (not its rows), opens the state database read-only
(no file created, no migration) and asks the destination one cheap question, or none when
``offline``. Every problem is a finding carrying the error a run would raise, so the exit code
comes from the one table in ``errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from audience_sync.config import AudienceConfig, Config, sqlite_path
from audience_sync.destinations import destination_class
from audience_sync.errors import AudienceSyncError, DestinationError, ExitCode, StateError
from audience_sync.model import RunMode
from audience_sync.planning import run_mode
from audience_sync.runtime import open_destination, open_state
from audience_sync.schedule import describe
from audience_sync.sources import SnapshotHeader, snapshot_header
from audience_sync.state import StateStore, schema_is_current, upgrade

__all__ = ["AudienceCheck", "CheckReport", "Finding", "check"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing checked: ``part`` is ``snapshot``, ``state`` or ``destination``."""

    part: str
    subject: str
    detail: str
    error: AudienceSyncError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class AudienceCheck:
    """One audience as a run would take it: its snapshot's size and the run's mode."""

    audience: AudienceConfig
    schedule: str
    header: SnapshotHeader | None
    mode: RunMode | None
    """``None`` when the state cannot tell (unreadable, or an older schema)."""
    synced_members: int | None


@dataclass(slots=True)
class CheckReport:
    config: Config
    findings: list[Finding] = field(default_factory=list)
    audiences: list[AudienceCheck] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """The first problem's exit code (snapshots, then state, then destination); else OK."""
        return next((f.error.exit_code for f in self.findings if f.error is not None), ExitCode.OK)


@dataclass(slots=True)
class _State:
    engine: sa.Engine | None
    """Read-only where the backend allows it; ``None`` when there is no database yet."""
    current: bool
    empty: bool
    """No state tables yet: every audience's run would be its initial sync."""


def check(config: Config, *, offline: bool = False) -> CheckReport:
    """Check ``config``'s snapshots, state database and destination; send no change."""
    report = CheckReport(config)
    headers: dict[str, SnapshotHeader | None] = {}
    for audience in config.audiences:
        try:
            header = snapshot_header(audience)
        except AudienceSyncError as exc:
            headers[audience.trait_key] = None
            report.findings.append(Finding("snapshot", audience.name, str(exc), exc))
            continue
        headers[audience.trait_key] = header
        report.findings.append(
            Finding("snapshot", audience.name, f"{header.rows:,} rows from {header.source}")
        )
    with contextlib.ExitStack() as opened:
        state = _open_state(config, report, opened)
        store = StateStore(state.engine) if state.engine is not None and state.current else None
        for audience in config.audiences:
            key = audience.trait_key
            ref = store.find_audience(config.destination.name, key) if store else None
            mode = (
                run_mode(store, ref.id if ref else None, full=False)
                if store is not None
                else (RunMode.INITIAL if state.empty else None)
            )
            members = store.member_count(ref.id) if store is not None and ref is not None else None
            report.audiences.append(
                AudienceCheck(
                    audience,
                    describe(audience),
                    headers[audience.trait_key],
                    mode,
                    members if ref is not None else (0 if mode is RunMode.INITIAL else None),
                )
            )
    report.findings.append(_probe(config, state, offline=offline))
    return report


def _open_state(config: Config, report: CheckReport, opened: contextlib.ExitStack) -> _State:
    """Open the state database without writing to it (until ``opened`` closes) and record what
    was found."""
    try:
        url = sa.make_url(config.state.url)
    except sa.exc.ArgumentError as exc:
        error = StateError(f"[state] url is not a usable SQLAlchemy URL: {exc}")
        report.findings.append(Finding("state", "[state] url", str(error), error))
        return _State(None, False, False)
    where = url.render_as_string(hide_password=True)
    path = sqlite_path(config.state.url)
    if path is not None and not path.exists():
        if config.state.auto_migrate:
            report.findings.append(Finding("state", where, "no database yet: a run creates it"))
            return _State(None, False, True)
        error = StateError(
            f"state database {path} does not exist and [state] auto_migrate is off: "
            "run `audience-sync db upgrade` first"
        )
        report.findings.append(Finding("state", where, str(error), error))
        return _State(None, False, False)
    try:
        # Read-only: the database itself refuses every write (SQLite: a mode=ro URI).
        engine = opened.enter_context(open_state(config.state.url, read_only=True))
    except StateError as exc:
        report.findings.append(Finding("state", where, str(exc), exc))
        return _State(None, False, False)
    try:
        current = schema_is_current(engine)
        empty = not sa.inspect(engine).has_table("sync_audiences")
    except (StateError, sa.exc.OperationalError) as exc:
        error = exc if isinstance(exc, StateError) else StateError(f"{where}: {exc.orig}")
        report.findings.append(Finding("state", where, str(error), error))
        return _State(None, False, False)
    if current:
        report.findings.append(Finding("state", where, "reachable, schema current"))
    elif config.state.auto_migrate:
        report.findings.append(
            Finding("state", where, "reachable, schema older than this version: a run migrates it")
        )
    else:
        error = StateError(
            f"state database {where} is not at the current schema and [state] auto_migrate is "
            "off: run `audience-sync db upgrade`"
        )
        report.findings.append(Finding("state", where, str(error), error))
    return _State(engine, current, empty)


def _probe(config: Config, state: _State, *, offline: bool) -> Finding:
    """Ask the destination its one question; a destination keeping tables in the state counts
    the request there when the state is current, else in a scratch database (and says so)."""
    name = config.destination.name
    if offline:
        return Finding("destination", name, "not contacted (--offline)")
    with contextlib.ExitStack() as opened:
        engine: sa.Engine | None = None  # a destination keeping no tables is given none
        note = ""
        uses_state = destination_class(config.destination.type).uses_state
        if uses_state and state.engine is not None and state.current:
            engine = opened.enter_context(open_state(config.state.url))
        elif uses_state:
            scratch = opened.enter_context(
                tempfile.TemporaryDirectory(prefix="audience-sync-check-")
            )
            engine = opened.enter_context(open_state(f"sqlite:///{Path(scratch) / 'check.db'}"))
            upgrade(engine)
            note = " (not counted in the state database: it is not ready yet)"
        try:
            destination = open_destination(config, engine)
            destination.preflight()
            detail = asyncio.run(destination.probe())
        except DestinationError as exc:
            return Finding("destination", name, str(exc), exc)
    return Finding("destination", name, detail + note)
