"""The commands around a sync: ``init`` (a starter project), ``check`` (what a run would do),
``key`` (an audience's trait key), ``db upgrade`` (the state schema) and ``track`` (Track and
Identify calls outside the pipeline).

Part of the CLI front end (``cli/``): each calls the library (imported in the command) and
prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from audience_sync.cli.shared import _state_url, _table, config_option, err, out
from audience_sync.config import load_config
from audience_sync.destinations import Call, TrackEvent
from audience_sync.naming import dropped_non_ascii, trait_key


@click.command("track")
@config_option
@click.option("--user-id", help="The user the event belongs to.")
@click.option("--event", help='Event name, e.g. "Completed Purchase".')
@click.option("--properties", default="{}", show_default=True, help="Event properties (JSON).")
@click.option(
    "--file",
    "calls_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Segment-spec track/identify messages, one JSON object per line.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def track_command(
    config_path: Path,
    user_id: str | None,
    event: str | None,
    properties: str,
    calls_file: Path | None,
    as_json: bool,
) -> None:
    """Add events to users' event streams (Track); a --file may also hold Identify calls.

    A Track for a user with no known Crisp profile is dropped and reported with the reason. A
    file's unusable lines are skipped and reported (exit 5); messages whose `integrations`
    turn Crisp off are counted and left out.
    """
    from audience_sync.track import CallFile, read_calls
    from audience_sync.track import track as send_calls

    calls: list[Call] = []
    read = CallFile([])
    if calls_file is not None:
        read = read_calls(calls_file)
        calls += read.calls
    if user_id is not None or event is not None:
        if not user_id or not event:
            raise click.UsageError("--user-id and --event go together")
        try:
            props = json.loads(properties)
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--properties is not valid JSON: {exc.msg}") from None
        if not isinstance(props, dict):
            raise click.UsageError("--properties must be a JSON object, e.g. '{\"revenue\": 1}'")
        calls.append(TrackEvent(user_id=user_id, event=event, properties=props))
    if calls_file is None and not calls:
        raise click.UsageError("nothing to send: give --user-id and --event, or --file")
    result = send_calls(
        load_config(config_path),
        calls,
        skipped_lines=read.skipped,
        integrations_off=read.integrations_off,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "destination": result.destination,
                    "calls": len(result.calls),
                    **result.counts,
                    "integrations_off": result.integrations_off,
                    "skipped_lines": [
                        {"line": x.line, "reason": x.reason} for x in result.skipped_lines
                    ],
                    "exit_code": result.exit_code,
                    "outcomes": [
                        {"user_id": o.user_id, "status": o.status.value, "reason": o.reason}
                        for o in result.outcomes
                    ],
                },
                indent=2,
            )
        )
    else:
        counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
        out.print(f"Track -> {result.destination}: {len(result.calls)} calls: {counts}")
        for reason, n in result.reasons.most_common():
            out.print(f"  {n} x {reason}", markup=False)
        if result.integrations_off:
            out.print(
                f"  {result.integrations_off} x left out: its `integrations` turn Crisp off",
                markup=False,
            )
        for x in result.skipped_lines:
            out.print(f"  {calls_file}:{x.line}: skipped: {x.reason}", markup=False)
    sys.exit(result.exit_code)


@click.command()
@click.argument("name")
def key(name: str) -> None:
    """Print the trait key for an audience NAME (its snake_case form)."""
    try:
        result = trait_key(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if dropped_non_ascii(name):
        err.print(f"warning: non-ASCII characters were dropped from {name!r}; key is {result!r}")
    click.echo(result)


@click.command("check")
@config_option
@click.option("--offline", is_flag=True, help="Do not contact the destination (no request).")
def check_command(config_path: Path, offline: bool) -> None:
    """Check the config, snapshots, state database and destination; show what would run.

    Reads each snapshot's header and row count, opens the state read-only (creates and migrates
    nothing) and makes one cheap destination request (Crisp: counted in the daily budget).
    """
    from audience_sync.check import check

    report = check(load_config(config_path), offline=offline)
    table = _table(f"Check -> {report.config.destination.name}")
    for column in ("audience", "key", "schedule", "rows", "mode", "synced members"):
        right = column in ("rows", "synced members")
        table.add_column(column, justify="right" if right else "left")
    for a in report.audiences:
        table.add_row(
            a.audience.name,
            a.audience.trait_key,
            a.schedule,
            f"{a.header.rows:,}" if a.header else "-",
            a.mode.value if a.mode else "-",
            f"{a.synced_members:,}" if a.synced_members is not None else "-",
        )
    out.print(table)
    for f in report.findings:
        mark = "ok  " if f.ok else "FAIL"
        out.print(f"  {mark} {f.part} {f.subject}: {f.detail}", markup=False, highlight=False)
    sys.exit(report.exit_code)


@click.command("init")
@click.argument(
    "directory", type=click.Path(path_type=Path, file_okay=False), default=".", required=False
)
@click.option("--force", is_flag=True, help="Overwrite starter files that already exist.")
def init_command(directory: Path, force: bool) -> None:
    """Write a starter project into DIRECTORY (default: here): a commented config, a sample
    snapshot and a .gitignore. `audience-sync run` there works at once (JSONL output)."""
    from audience_sync.starter import existing, write_starter

    found = existing(directory)
    if found and not force:
        listed = ", ".join(str(p) for p in found)
        raise click.UsageError(
            f"{listed} already exist; pass --force to overwrite (nothing written)"
        )
    for path in write_starter(directory):
        click.echo(f"wrote {path}")
    where = "" if directory == Path(".") else f"cd {directory} && "
    click.echo(f"next: {where}audience-sync check && audience-sync run")


@click.group()
def db() -> None:
    """Manage the state database schema."""


@db.command("upgrade")
@config_option
@click.option("--url", help="State database URL (default: from the config).")
def db_upgrade(config_path: Path, url: str | None) -> None:
    """Create or migrate the state tables to the current version (Alembic)."""
    from audience_sync.runtime import open_state
    from audience_sync.state import upgrade

    state_url, _ = _state_url(config_path, url)
    with open_state(state_url) as engine:
        upgrade(engine)
    click.echo(
        f"state database at the current schema: {engine.url.render_as_string(hide_password=True)}"
    )
