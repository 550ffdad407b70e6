"""What every ``audience-sync`` command shares: the consoles, the shared options, the table
header and the way times and state URLs are read and shown.

Part of the CLI front end (``cli/``): the command modules import it; it imports nothing of
theirs.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from audience_sync.config import DEFAULT_CONFIG_PATH, Config, load_config

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


#: The runs' counters (``state.runs.COUNTERS``) whose column header is not their name.
_SHORT = {"snapshot_rows": "rows", "rejected_rows": "rejected"}


def _header(column: str) -> str:
    """A column's header: a counter's short name, else the column's own."""
    return _SHORT.get(column, column)


def _table(title: str) -> Table:
    out.print(title, markup=False, highlight=False)
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _state_url(config_path: Path, url: str | None) -> tuple[str, Config | None]:
    if url:
        return url, None
    config = load_config(config_path)
    return config.state.url, config


def _local(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json_default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)
