"""The ``audience-sync`` command: parses arguments, calls the library, prints results.

Errors are ``AudienceSyncError`` subclasses, each with its exit code (see ``errors.py``);
tracebacks only with ``--verbose``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from audience_sync.config import DEFAULT_CONFIG_PATH, STATE_URL_ENV, Config, load_config
from audience_sync.destinations import Call, TrackEvent
from audience_sync.durations import format_duration, parse_duration
from audience_sync.errors import (
    AudienceSyncError,
    ConfigError,
    ExitCode,
    NotFound,
    SafeguardError,
    StateMissing,
)
from audience_sync.logs import TEXT_FORMAT, JsonFormatter
from audience_sync.naming import dropped_non_ascii, trait_key

if TYPE_CHECKING:
    from audience_sync.progress import Progress as ProgressCallback
    from audience_sync.result import AudienceResult, SyncResult

# Commands import the engine, the state and the history in their bodies: SQLAlchemy, pandas,
# pyarrow and DuckDB load only for the commands that use them (`--help` and `key` need none).

# Wide enough for the history table when the output is a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 240)
# Off a terminal an error or warning stays on one line however long (no wrap at 80 columns).
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="The TOML configuration file.",
)

#: Selects audiences and computed traits by name or key; ``--trait`` is another name for it.
only_option = click.option(
    "--audience",
    "--trait",
    "audiences",
    multiple=True,
    help="Only this audience or computed trait (name or key).",
)

wait_option = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="If another process is running an audience, wait up to this long instead of exit 7.",
)


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    """Structured ``key=value`` (or JSON) log lines on stderr; only warnings when a person is
    watching."""
    level = logging.DEBUG if verbose else (logging.WARNING if err.is_terminal else logging.INFO)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=TEXT_FORMAT,
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        force=True,
    )
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and full tracebacks.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr as key=value text or one JSON object per line.",
)
@click.version_option(package_name="audience-sync")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, log_format: str) -> None:
    """Keep Crisp (or a JSONL file) in step with your audience snapshots."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose, log_format)


@contextmanager
def _progress(config: Config, bar: bool) -> Iterator[ProgressCallback | None]:
    """On a terminal a bar naming the phase and audience (when ``bar``); otherwise a progress
    log line every ``[service] progress_every``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from audience_sync.progress import ProgressLog

    if not err.is_terminal:
        with ProgressLog(config.service.progress_every.total_seconds()).running() as lines:
            yield lines
        return
    if not bar:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as shown:
        task = shown.add_task("preparing (state database, destination)", total=None)
        phase = ["preparing"]

        def advance(step: str, audience: str | None, done: int, total: int | None) -> None:
            if step != phase[0]:
                phase[0] = step
                shown.reset(task)  # the time left is estimated per phase
            what = f"planning {audience} (audiences)" if step == "planning" else "delivering users"
            shown.update(task, description=what, completed=done, total=total)

        yield advance


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM/SIGINT: stop sending, commit what was confirmed; a second one: stop at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.print(
            f"{signal.Signals(signum).name}: finishing in-flight changes and committing "
            "(send it again to stop at once)"
        )

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop.is_set
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@cli.command()
@config_option
@click.option(
    "--audience",
    "--trait",
    "audiences",
    multiple=True,
    help="Audience or computed trait, by name or key (repeatable); default all.",
)
@click.option(
    "--all", "all_audiences", is_flag=True, help="Every configured audience (the default)."
)
@click.option("--full", is_flag=True, help="Full resync: resend every member, rebuild the state.")
@click.option("--dry-run", is_flag=True, help="Show the plan; send and change nothing.")
@click.option("--retry-failed", is_flag=True, help="Also retry users held after a permanent error.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--force", is_flag=True, help="Skip the safeguards (empty, mass-exit, stale snapshot)."
)
@click.option(
    "--initial",
    is_flag=True,
    help="Allow a large initial sync from an empty state to a destination synced before.",
)
@wait_option
def run(
    config_path: Path,
    audiences: tuple[str, ...],
    all_audiences: bool,
    full: bool,
    dry_run: bool,
    retry_failed: bool,
    as_json: bool,
    force: bool,
    initial: bool,
    wait: float,
) -> None:
    """Sync audiences once, now."""
    from audience_sync.alerts import Alerter
    from audience_sync.engine import sync

    if all_audiences and audiences:
        raise click.UsageError("--all and --audience/--trait cannot be combined")
    config = load_config(config_path)
    with (
        _progress(config, bar=not dry_run and not as_json) as progress,
        _stop_on_signals() as should_stop,
    ):
        try:
            result = sync(
                config,
                audiences=audiences,
                full=full,
                dry_run=dry_run,
                retry_failed=retry_failed,
                progress=progress,
                should_stop=should_stop,
                force=force,
                wait=wait,
                initial=initial,
            )
        except AudienceSyncError as exc:
            if not dry_run and not isinstance(exc, ConfigError):  # e.g. an unknown --audience
                Alerter(config).failed(config.select(audiences), exc)
            raise
    Alerter(config).after_run(result)
    if as_json:
        click.echo(json.dumps(_result_json(result), indent=2, default=str))
    else:
        _print_result(result)
    sys.exit(result.exit_code)


@cli.command("retire")
@click.argument("name")
@config_option
@click.option("--dry-run", is_flag=True, help="Show who would be sent false; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@wait_option
def retire_command(name: str, config_path: Path, dry_run: bool, as_json: bool, wait: float) -> None:
    """Set audience NAME's trait to false for every member the state holds, then drop its
    state (for an audience removed from the config; re-run it to finish after a stop)."""
    from audience_sync.engine import retire

    config = load_config(config_path)
    with (
        _progress(config, bar=not dry_run and not as_json) as progress,
        _stop_on_signals() as should_stop,
    ):
        result = retire(
            config, name, dry_run=dry_run, progress=progress, should_stop=should_stop, wait=wait
        )
    if as_json:
        click.echo(json.dumps(_result_json(result), indent=2, default=str))
    else:
        _print_result(result)
    sys.exit(result.exit_code)


def _status(result: SyncResult, r: AudienceResult) -> str:
    """An audience's status as the table and the JSON show it: a dry run plans or refuses."""
    if not result.dry_run:
        return r.status.value
    if r.error is None:
        return "planned"
    return "refused" if r.error_type in (SafeguardError, StateMissing) else "failed"


def _result_json(result: SyncResult) -> dict[str, Any]:
    return {
        "destination": result.destination,
        "dry_run": result.dry_run,
        "exit_code": result.exit_code,
        **({"cost": result.cost} if result.cost else {}),
        **({"warnings": result.warnings} if result.warnings else {}),
        "audiences": [
            {
                "audience": r.audience.name,
                "key": r.audience.trait_key,
                "run_id": r.run_id,
                "mode": r.mode.value,
                "status": _status(result, r),
                **r.counts,
                "error": r.error,
                "rejected": [
                    {"row": x.row, "user_id": x.user_id, "reason": x.reason} for x in r.rejected
                ],
                **({"sample": r.sample} if result.dry_run else {}),
            }
            for r in result.audiences
        ],
    }


#: Rejected rows printed per audience after a run (all kept ones are stored and in ``--json``).
_REJECTED_SHOWN = 10

_HEADERS = (
    "rows",
    "rejected",
    "entered",
    "exited",
    "unchanged",
    "delivered",
    "failed",
    "skipped",
    "pending",
)


def _table(title: str) -> Table:
    out.print(title, markup=False, highlight=False)
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _print_result(result: SyncResult) -> None:
    from audience_sync.state.store import COUNTERS

    title = (
        f"{'Plan (dry run, nothing sent)' if result.dry_run else 'Sync'} -> {result.destination}"
    )
    table = _table(title)
    table.add_column("audience", no_wrap=True)
    table.add_column("run", justify="right")
    table.add_column("mode")
    table.add_column("status")
    columns = (*COUNTERS[:5], "pending") if result.dry_run else COUNTERS
    for header, column in zip(_HEADERS, COUNTERS, strict=True):
        if column in columns:
            table.add_column(
                "to send" if result.dry_run and column == "pending" else header, justify="right"
            )
    for r in result.audiences:
        table.add_row(
            r.audience.name,
            str(r.run_id or "-"),
            r.mode.value,
            _status(result, r),
            *(str(r.counts.get(c, "-")) for c in columns),
        )
    out.print(table)
    for r in result.audiences:
        for rej in r.rejected[:_REJECTED_SHOWN]:
            who = f"user_id={rej.user_id}" if rej.user_id is not None else "no user_id"
            out.print(
                f"  {r.audience.trait_key}: row {rej.row} rejected ({who}): {rej.reason}",
                markup=False,
                highlight=False,
            )
        hidden = r.counts.get("rejected_rows", 0) - min(len(r.rejected), _REJECTED_SHOWN)
        if hidden > 0:
            where = (
                f"`audience-sync history {r.run_id}` lists them"
                if r.run_id is not None
                else "`--json` lists them"
            )
            if len(r.rejected) < r.counts.get("rejected_rows", 0):
                where += f" (the first {len(r.rejected):,} are kept)"
            out.print(
                f"  {r.audience.trait_key}: ... and {hidden} more rejected rows: {where}",
                markup=False,
                highlight=False,
            )
        for s in r.sample:
            out.print(f"  {r.audience.trait_key}: would send {json.dumps(s)}", markup=False)
    if result.cost:
        estimate = ", ".join(f"{k}={v:,}" for k, v in result.cost.items())
        out.print(f"  estimated cost: {estimate}", markup=False, highlight=False)
    # A run-wide error (rejected credentials, spent quota) is shared by every audience: say it once.
    by_error: dict[str, list[str]] = {}
    for r in result.audiences:
        if r.error:
            by_error.setdefault(r.error, []).append(r.audience.trait_key)
    for error, keys in by_error.items():
        out.print(f"  {', '.join(keys)}: {error}", markup=False, highlight=False)


@cli.command("track")
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


@cli.command()
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


@cli.command("check")
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


@cli.command("init")
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


def _state_url(config_path: Path, url: str | None) -> tuple[str, Config | None]:
    if url:
        return url, None
    config = load_config(config_path)
    return config.state.url, config


def _local(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


class _HistoryGroup(click.Group):
    """``history`` lists runs; ``history RUN_ID`` shows one; ``history prune`` cleans up."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0].isdigit():
            args = ["show", *args]
        return super().resolve_command(ctx, args)


@cli.group(cls=_HistoryGroup, invoke_without_command=True, subcommand_metavar="[RUN_ID | prune]")
@config_option
@only_option
@click.option("--limit", default=20, show_default=True, help="How many runs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--failed", is_flag=True, help="List users waiting for retry, with the reason.")
@click.option(
    "--rejected", is_flag=True, help="List the snapshot rows runs rejected, with the reason."
)
@click.option("--user", "user_id", help="Show every change the runs attempted for this user.")
@click.option("--url", help=f"State database URL (default: from the config, or ${STATE_URL_ENV}).")
@click.option(
    "--destination",
    help="Only this destination's runs (default: the config's; every one with --url).",
)
@click.pass_context
def history(
    ctx: click.Context,
    config_path: Path,
    audiences: tuple[str, ...],
    limit: int,
    as_json: bool,
    failed: bool,
    rejected: bool,
    user_id: str | None,
    url: str | None,
    destination: str | None,
) -> None:
    """Show recent sync runs (newest first) from the state database.

    `history RUN_ID` shows one run in detail; `history prune --older-than 90d` deletes old
    history.
    """
    if ctx.invoked_subcommand is not None:
        return
    from audience_sync.destinations.budget import requests_used
    from audience_sync.runtime import open_state
    from audience_sync.state import StateStore
    from audience_sync.state.store import COUNTERS

    state_url, config = _state_url(config_path, url)
    keys = (
        [a.trait_key for a in config.select(audiences)] if config and audiences else list(audiences)
    )
    if destination is None and config is not None:
        destination = config.destination.name
    with open_state(state_url, create=False) as engine:
        store = StateStore(engine)
        columns: tuple[str, ...]
        if not store.has_history():  # no run yet: nothing to list, and nothing to create
            rows, columns, title = [], ("id",), "Sync runs"
        elif user_id is not None:
            rows = store.user_changes(user_id, destination=destination, limit=limit)
            columns = (
                "at",
                "run_id",
                "destination",
                "audience_name",
                "trait_key",
                "value",
                "outcome",
                "reason",
            )
            title = f"Changes for user {user_id}"
        elif rejected:
            rows = store.rejected_rows(destination=destination, audience_keys=keys, limit=limit)
            columns = _REJECTED_COLUMNS
            title = "Rejected snapshot rows (newest run first)"
        elif failed:
            rows = store.retry_rows(destination=destination, audience_keys=keys, limit=limit)
            columns = (
                "audience_key",
                "user_id",
                "value",
                "status",
                "reason",
                "status_code",
                "attempts",
                "first_at",
                "last_at",
            )
            title = "Users waiting for retry"
        else:
            rows = store.runs(destination=destination, audience_keys=keys, limit=limit)
            columns = (
                "id",
                "started_at",
                "audience_name",
                "destination",
                "mode",
                "trigger",
                "status",
                *COUNTERS,
                "error",
            )
            title = "Sync runs"
        used_today = requests_used(engine, store.clock().date())
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=_json_default))
        return
    table = _table(f"{title} (times in UTC)")
    for column in columns:
        table.add_column(dict(zip(COUNTERS, _HEADERS, strict=True)).get(column, column))
    for row in rows:
        table.add_row(
            *(
                _local(v) if isinstance(v, datetime) else ("" if v is None else str(v))
                for v in (row.get(c) for c in columns)
            )
        )
    out.print(table)
    if not rows:
        out.print("no rows")
    budget = config.destination.settings.request_budget if config else None
    for destination, used in used_today.items():
        of = (
            f" of {budget:,}"
            if budget and config and config.destination.name == destination
            else ""
        )
        out.print(f"{destination}: {used:,}{of} requests used today (UTC)", highlight=False)


def _parent_state(
    ctx: click.Context, config_path: Path, url: str | None
) -> tuple[str, Config | None]:
    """A ``history`` subcommand's state URL: its own --config/--url, else the parent's."""
    parent = ctx.parent.params if ctx.parent is not None else {}
    if config_path == DEFAULT_CONFIG_PATH and url is None:
        config_path = parent.get("config_path", config_path)
        url = parent.get("url")
    return _state_url(config_path, url)


def _json_default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


_SAMPLE_COLUMNS = ("user_id", "trait_key", "value", "outcome", "reason")
_REJECTED_COLUMNS = ("run_id", "audience_key", "row_number", "user_id", "reason", "at")


@history.command("show", hidden=True)
@click.argument("run_id", type=int)
@config_option
@click.option("--url", help="State database URL (default: from the config).")
@click.option("--samples", default=10, show_default=True, help="How many error samples to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def history_show(
    ctx: click.Context,
    run_id: int,
    config_path: Path,
    url: str | None,
    samples: int,
    as_json: bool,
) -> None:
    """Show run RUN_ID in detail, with samples of the changes that did not go through."""
    from audience_sync.history import run_detail
    from audience_sync.runtime import open_state
    from audience_sync.state import StateStore

    state_url, _ = _parent_state(ctx, config_path, url)
    with open_state(state_url, create=False) as engine:
        store = StateStore(engine)
        detail = run_detail(store, run_id, samples=samples) if store.has_history() else None
    if detail is None:
        raise NotFound(
            f"no run {run_id} in the state database ({state_url.split('@')[-1]}); "
            "`audience-sync history` lists the recent runs"
        )
    if as_json:
        payload = {
            "run": detail.run,
            "outcomes": detail.outcomes,
            "reasons": detail.reasons,
            "samples": detail.samples,
            "rejected": detail.rejected,
        }
        click.echo(json.dumps(payload, indent=2, default=_json_default))
        return
    table = Table(title=f"Run {run_id} (times in UTC)", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in detail.run.items():
        shown = (
            _local(value) if isinstance(value, datetime) else ("" if value is None else str(value))
        )
        table.add_row(key, shown)
    run = detail.run
    if run["started_at"] is not None and run["finished_at"] is not None:
        table.add_row(
            "duration", f"{(run['finished_at'] - run['started_at']).total_seconds():.1f}s"
        )
    out.print(table)
    if detail.outcomes:
        out.print(
            "change log: " + ", ".join(f"{n} {k}" for k, n in sorted(detail.outcomes.items()))
        )
    if detail.reasons:
        reasons = Table(title="Why changes did not go through", title_justify="left")
        for column in ("users", "outcome", "reason"):
            reasons.add_column(column)
        for r in detail.reasons:
            reasons.add_row(str(r["users"]), r["outcome"], r["reason"] or "")
        out.print(reasons)
        sample = Table(title="Samples", title_justify="left")
        for column in _SAMPLE_COLUMNS:
            sample.add_column(column)
        for r in detail.samples:
            sample.add_row(*(str(r[c]) if r[c] is not None else "" for c in _SAMPLE_COLUMNS))
        out.print(sample)
    if detail.rejected:
        counted = int(run["rejected_rows"])
        kept = len(detail.rejected)
        note = f", the first {kept:,} of {counted:,} kept" if counted > kept else ""
        table = Table(title=f"Rejected snapshot rows{note}", title_justify="left")
        for column in ("row", "user_id", "reason"):
            table.add_column(column, overflow="fold")
        for r in detail.rejected:
            table.add_row(str(r["row_number"] or ""), r["user_id"] or "", r["reason"])
        out.print(table)


@history.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    help="Delete history older than this, e.g. 90d, 12w, 36h.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@config_option
@click.option("--url", help="State database URL (default: from the config).")
@click.pass_context
def history_prune(
    ctx: click.Context, older_than: str, dry_run: bool, config_path: Path, url: str | None
) -> None:
    """Delete change-log rows and runs older than DURATION (the retry queue is kept)."""
    from audience_sync.clock import utc_now
    from audience_sync.history import prune
    from audience_sync.runtime import open_state

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    state_url, _ = _parent_state(ctx, config_path, url)
    with open_state(state_url) as engine:
        pruned = prune(engine, older_than=age, now=utc_now(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {pruned.changes} change-log rows and {pruned.runs} runs from before "
        f"{pruned.cutoff:%Y-%m-%d %H:%M:%S} UTC (each audience's latest runs are kept)"
    )


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    return format_duration(now - then) + " ago"


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_path: Path, as_json: bool) -> None:
    """Each audience's schedule, last and next run, retry queue; exit 8 if any is unhealthy."""
    from audience_sync.clock import utc_now
    from audience_sync.history import status as audience_status
    from audience_sync.runtime import open_state

    config = load_config(config_path)
    with open_state(config.state.url, create=False) as engine:
        report = audience_status(config, engine, now=utc_now())
    if as_json:
        payload = {
            "destination": report.destination,
            "healthy": report.healthy,
            "audiences": [
                {
                    "audience": a.audience.name,
                    "key": a.audience.trait_key,
                    "schedule": a.schedule,
                    "last_run": a.last_run,
                    "running_since": a.running_since,
                    "running_holder": a.running_holder,
                    "next_run": a.next_run,
                    "retry_waiting": a.retry_waiting,
                    "healthy": a.healthy,
                    "problems": a.problems,
                }
                for a in report.audiences
            ],
        }
        click.echo(json.dumps(payload, indent=2, default=_json_default))
        sys.exit(report.exit_code)
    table = _table(f"Status -> {report.destination} (times in UTC)")
    for column in (
        "audience",
        "schedule",
        "last run",
        "status",
        "age",
        "delivered",
        "failed",
        "pending",
        "running",
        "next run",
        "retry queue",
        "health",
    ):
        table.add_column(column)
    for a in report.audiences:
        last = a.last_run
        running = (
            f"since {_local(a.running_since)} ({a.running_holder})" if a.running_since else "no"
        )
        table.add_row(
            a.audience.name,
            a.schedule,
            str(last["id"]) if last else "never",
            last["status"] if last else "-",
            _age(report.now, last["started_at"]) if last else "-",
            str(last["delivered"]) if last else "-",
            str(last["failed"] + last["skipped"]) if last else "-",
            str(last["pending"]) if last else "-",
            running,
            _local(a.next_run),
            str(a.retry_waiting),
            "ok" if a.healthy else "UNHEALTHY",
        )
    out.print(table)
    for a in report.audiences:
        for problem in a.problems:
            out.print(f"  {a.audience.trait_key}: {problem}", markup=False, highlight=False)
    sys.exit(report.exit_code)


@cli.command()
@config_option
def serve(config_path: Path) -> None:
    """Run every audience on its schedule until SIGTERM/SIGINT (SIGHUP reloads the config)."""
    from audience_sync.service import Service

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)  # a service logs its runs
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    sys.exit(Service(config_path).run())


@cli.group()
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


@cli.command("report")
@config_option
@click.option(
    "--html",
    "html_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the report to this one self-contained HTML file.",
)
@click.option("--url", help="State database URL (default: from the config).")
@only_option
@click.option(
    "--since", default="30d", show_default=True, help="Runs of this last span (e.g. 7d), or all."
)
@click.option("--user", "users", multiple=True, help="Include this user's change log.")
def report_command(
    config_path: Path,
    html_path: Path,
    url: str | None,
    audiences: tuple[str, ...],
    since: str,
    users: tuple[str, ...],
) -> None:
    """Write the run history as one HTML file (health, runs, quota, retry queue, users)."""
    from audience_sync.web import write_report  # Jinja2 only for this command and `ui`

    if since != "all":
        try:
            parse_duration(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    config = load_config(config_path)
    keys = [a.trait_key for a in config.select(audiences)] if audiences else []
    write_report(
        config, url or config.state.url, html_path, audiences=keys, window=since, users=users
    )
    click.echo(f"wrote {html_path}")


@cli.command("ui")
@config_option
@click.option("--url", help="State database URL (default: from the config).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8787, show_default=True, type=click.IntRange(0, 65535), help="0: any free."
)
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (needs --token).")
@click.option(
    "--token",
    envvar="AUDIENCE_SYNC_UI_TOKEN",
    help="Required on every request when remote (default: $AUDIENCE_SYNC_UI_TOKEN).",
)
def ui_command(
    config_path: Path,
    url: str | None,
    host: str,
    port: int,
    allow_remote: bool,
    token: str | None,
) -> None:
    """Serve the run history as web pages, read-only, until Ctrl-C."""
    from audience_sync.web import is_loopback, serve  # Jinja2 only for this command and `report`

    if not is_loopback(host):
        if not allow_remote:
            raise click.UsageError(f"--host {host} is not loopback: add --allow-remote and a token")
        if not token:
            raise click.UsageError("--allow-remote needs --token or $AUDIENCE_SYNC_UI_TOKEN")
    config = load_config(config_path)

    def ready(server: Any) -> None:
        hint = "?token=..." if server.token else ""
        click.echo(f"serving {server.url}{hint} (read-only; Ctrl-C to stop)")

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)  # one line per request, like a web server
    serve(config, url or config.state.url, host=host, port=port, token=token, ready=ready)


def main() -> None:
    """Entry point: map errors to exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AudienceSyncError as exc:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            traceback.print_exc()  # and still the documented exit code
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
