"""``run`` and ``retire``: the commands that sync, with their progress bar, their signal
handling and how their result is printed.

Part of the CLI front end (``cli/``): they call ``engine.sync`` / ``retirement.retire`` (imported in
the command, so ``--help`` loads no engine) and print the ``SyncResult``.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from audience_sync.cli.shared import _header, _table, config_option, err, out, wait_option
from audience_sync.config import Config, load_config
from audience_sync.errors import AudienceSyncError, ConfigError, SafeguardError, StateMissing

if TYPE_CHECKING:
    from audience_sync.progress import Progress as ProgressCallback
    from audience_sync.result import AudienceResult, SyncResult


@contextmanager
def _loading_the_engine() -> Iterator[None]:
    """Import the run machinery with the cyclic garbage collector off, then freeze what it
    loaded.

    Importing pandas, SQLAlchemy and the engine allocates about a million objects and frees
    none of them as garbage, yet the collector ran over them while they loaded (two full
    passes, 40 ms) and in every full pass of the run after (30 ms each). Frozen, the collector
    leaves them out: 80-90 ms less CPU per run (4M memberships, 3 full passes).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@contextmanager
def _progress(config: Config, bar: bool) -> Iterator[ProgressCallback | None]:
    """On a terminal a bar naming the phase and audience (when ``bar``); otherwise a progress
    log line every ``[service] progress_every``."""
    from audience_sync.progress import ProgressLog

    if not err.is_terminal:
        with ProgressLog(config.service.progress_every.total_seconds()).running() as lines:
            yield lines
        return
    if not bar:
        yield None
        return
    # Only a bar on a terminal needs rich's progress widgets (a scheduled run never does).
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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


@click.command()
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
    with _loading_the_engine():
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


@click.command("retire")
@click.argument("name")
@config_option
@click.option("--dry-run", is_flag=True, help="Show who would be sent false; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@wait_option
def retire_command(name: str, config_path: Path, dry_run: bool, as_json: bool, wait: float) -> None:
    """Set audience NAME's trait to false for every member the state holds, then drop its
    state (for an audience removed from the config; re-run it to finish after a stop)."""
    with _loading_the_engine():
        from audience_sync.retirement import retire

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


def _print_result(result: SyncResult) -> None:
    from audience_sync.state.runs import COUNTERS

    title = (
        f"{'Plan (dry run, nothing sent)' if result.dry_run else 'Sync'} -> {result.destination}"
    )
    table = _table(title)
    table.add_column("audience", no_wrap=True)
    table.add_column("run", justify="right")
    table.add_column("mode")
    table.add_column("status")
    columns = (*COUNTERS[:5], "pending") if result.dry_run else COUNTERS
    for column in columns:
        table.add_column(
            "to send" if result.dry_run and column == "pending" else _header(column),
            justify="right",
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
