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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from audience_sync.config import DEFAULT_CONFIG_PATH, STATE_URL_ENV, Config, load_config
from audience_sync.destinations import Call, TrackEvent
from audience_sync.durations import format_duration, parse_duration
from audience_sync.engine import sync
from audience_sync.errors import AudienceSyncError
from audience_sync.history import prune, run_detail
from audience_sync.history import status as audience_status
from audience_sync.naming import dropped_non_ascii, trait_key
from audience_sync.result import SyncResult
from audience_sync.service import Service
from audience_sync.state import StateStore, connect, upgrade
from audience_sync.state.store import COUNTERS, utc_now
from audience_sync.track import read_calls
from audience_sync.track import track as send_calls

# Wide enough for the history table when the output is a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True)

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="The TOML configuration file.",
)


def _setup_logging(verbose: bool) -> None:
    """Structured ``key=value`` log lines on stderr; only warnings when a person is watching."""
    level = logging.DEBUG if verbose else (logging.WARNING if err.is_terminal else logging.INFO)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and full tracebacks.")
@click.version_option(package_name="audience-sync")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Keep Crisp (or a JSONL file) in step with your audience snapshots."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("syncing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("sync", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

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
    "--audience", "audiences", multiple=True, help="Audience name or key (repeatable); default all."
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
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="If another process is running an audience, wait up to this long instead of exit 7.",
)
def run(
    config_path: Path,
    audiences: tuple[str, ...],
    all_audiences: bool,
    full: bool,
    dry_run: bool,
    retry_failed: bool,
    as_json: bool,
    force: bool,
    wait: float,
) -> None:
    """Sync audiences once, now."""
    if all_audiences and audiences:
        raise click.UsageError("--all and --audience cannot be combined")
    config = load_config(config_path)
    with (
        _progress(err.is_terminal and not dry_run and not as_json) as progress,
        _stop_on_signals() as should_stop,
    ):
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
        )
    if as_json:
        click.echo(json.dumps(_result_json(result), indent=2, default=str))
    else:
        _print_result(result)
    sys.exit(result.exit_code)


def _result_json(result: SyncResult) -> dict[str, Any]:
    return {
        "destination": result.destination,
        "dry_run": result.dry_run,
        "exit_code": result.exit_code,
        **({"cost": result.cost} if result.cost else {}),
        "audiences": [
            {
                "audience": r.audience.name,
                "key": r.audience.trait_key,
                "run_id": r.run_id,
                "mode": r.mode.value,
                "status": r.status.value,
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
        status = "planned" if result.dry_run and r.error is None else r.status.value
        table.add_row(
            r.audience.name,
            str(r.run_id or "-"),
            r.mode.value,
            status,
            *(str(r.counts.get(c, "-")) for c in columns),
        )
    out.print(table)
    for r in result.audiences:
        for rej in r.rejected:
            who = f"user_id={rej.user_id}" if rej.user_id is not None else "no user_id"
            out.print(f"  {r.audience.trait_key}: row {rej.row} rejected ({who}): {rej.reason}")
        hidden = r.counts.get("rejected_rows", 0) - len(r.rejected)
        if hidden > 0:
            out.print(f"  {r.audience.trait_key}: ... and {hidden} more rejected rows")
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

    A Track for a user with no known Crisp profile is dropped and reported with the reason.
    """
    calls: list[Call] = []
    if calls_file is not None:
        calls += read_calls(calls_file)
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
    if not calls:
        raise click.UsageError("nothing to send: give --user-id and --event, or --file")
    result = send_calls(load_config(config_path), calls)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "destination": result.destination,
                    "calls": len(result.calls),
                    **result.counts,
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
@click.option("--audience", "audiences", multiple=True, help="Only this audience (name or key).")
@click.option("--limit", default=20, show_default=True, help="How many runs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--failed", is_flag=True, help="List users waiting for retry, with the reason.")
@click.option("--user", "user_id", help="Show every change the runs attempted for this user.")
@click.option("--url", help=f"State database URL (default: from the config, or ${STATE_URL_ENV}).")
@click.pass_context
def history(
    ctx: click.Context,
    config_path: Path,
    audiences: tuple[str, ...],
    limit: int,
    as_json: bool,
    failed: bool,
    user_id: str | None,
    url: str | None,
) -> None:
    """Show recent sync runs (newest first) from the state database.

    `history RUN_ID` shows one run in detail; `history prune --older-than 90d` deletes old
    history.
    """
    if ctx.invoked_subcommand is not None:
        return
    state_url, config = _state_url(config_path, url)
    keys = (
        [a.trait_key for a in config.select(audiences)] if config and audiences else list(audiences)
    )
    engine = connect(state_url)
    try:
        store = StateStore(engine)
        columns: tuple[str, ...]
        if user_id is not None:
            rows = store.user_changes(user_id, limit=limit)
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
        elif failed:
            rows = store.retry_rows(audience_keys=keys, limit=limit)
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
            rows = store.runs(audience_keys=keys, limit=limit)
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
        used_today = store.requests_used(store.clock().date())
    finally:
        engine.dispose()
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
    for destination, used in used_today.items():
        budget = (
            getattr(config.destination.settings, "daily_request_budget", None) if config else None
        )
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
    state_url, _ = _parent_state(ctx, config_path, url)
    engine = connect(state_url)
    try:
        detail = run_detail(StateStore(engine), run_id, samples=samples)
    finally:
        engine.dispose()
    if detail is None:
        raise AudienceSyncError(
            f"no run {run_id} in the state database ({state_url.split('@')[-1]})"
        )
    if as_json:
        payload = {
            "run": detail.run,
            "outcomes": detail.outcomes,
            "reasons": detail.reasons,
            "samples": detail.samples,
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
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    state_url, _ = _parent_state(ctx, config_path, url)
    engine = connect(state_url)
    try:
        pruned = prune(engine, older_than=age, now=utc_now(), dry_run=dry_run)
    finally:
        engine.dispose()
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
    config = load_config(config_path)
    engine = connect(config.state.url)
    try:
        report = audience_status(config, engine, now=utc_now())
    finally:
        engine.dispose()
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
    state_url, _ = _state_url(config_path, url)
    engine = connect(state_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
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
@click.option("--audience", "audiences", multiple=True, help="Only this audience (name or key).")
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
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AudienceSyncError as exc:
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
