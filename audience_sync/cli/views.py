"""``status``, ``report`` and ``ui``: each audience's health, and the run history as an HTML
file or as web pages.

Part of the CLI front end (``cli/``): reads what the runs left through ``history.py`` and
``web/`` (imported in the commands: Jinja2 only for ``report`` and ``ui``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from audience_sync.cli.shared import _json_default, _local, _table, config_option, only_option, out
from audience_sync.config import load_config
from audience_sync.durations import format_duration, parse_duration


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    return format_duration(now - then) + " ago"


@click.command()
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


@click.command("report")
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


@click.command("ui")
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
