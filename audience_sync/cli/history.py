"""``history``: the runs the state database recorded (``history``, ``history RUN_ID``,
``--failed``, ``--rejected``, ``--user``) and ``history prune``.

Part of the CLI front end (``cli/``): reads what the runs left through ``state.StateStore`` and
``history.py`` (imported in the commands: no data stack) and prints tables or JSON.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click
from rich.table import Table

from audience_sync.cli.shared import (
    _header,
    _json_default,
    _local,
    _state_url,
    _table,
    config_option,
    only_option,
    out,
)
from audience_sync.config import DEFAULT_CONFIG_PATH, STATE_URL_ENV, Config
from audience_sync.durations import parse_duration
from audience_sync.errors import NotFound


class _HistoryGroup(click.Group):
    """``history`` lists runs; ``history RUN_ID`` shows one; ``history prune`` cleans up."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0].isdigit():
            args = ["show", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_HistoryGroup, invoke_without_command=True, subcommand_metavar="[RUN_ID | prune]")
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
    from audience_sync.history import user_changes
    from audience_sync.runtime import open_state
    from audience_sync.state import StateStore
    from audience_sync.state.runs import COUNTERS

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
            rows = user_changes(store, user_id, destination=destination, limit=limit)
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
                "unchanged_since",  # a run that skipped its diff: the snapshot's last run
                "error",
            )
            title = "Sync runs"
        used_today = requests_used(engine, store.clock().date())
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=_json_default))
        return
    table = _table(f"{title} (times in UTC)")
    for column in columns:
        table.add_column(_header(column))
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
    if run.get("unchanged_since") is not None:
        since = run["unchanged_since"]
        out.print(
            f"snapshot unchanged since run {since}, which left the state equal to it: not diffed, "
            "nothing sent (`run --full` or [state] skip_unchanged = false diff for real)",
            highlight=False,
        )
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
