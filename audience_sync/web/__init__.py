"""The run history in a browser: ``audience-sync report --html`` (one self-contained file) and
``audience-sync ui`` (the same pages served from the state database, read-only).

Imported only by those two commands, so Jinja2 costs the others nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa

from audience_sync.config import Config
from audience_sync.errors import StateError
from audience_sync.state.database import connect, describe
from audience_sync.web.pages import WINDOWS, Pages, ReportLinks
from audience_sync.web.server import HistoryServer, is_loopback
from audience_sync.web.views import History

__all__ = ["WINDOWS", "HistoryServer", "is_loopback", "open_history", "serve", "write_report"]


def open_history(config: Config, url: str) -> History:
    """The history of ``url``'s state database, opened read-only."""
    engine = connect(url, read_only=True)
    try:
        has_runs = sa.inspect(engine).has_table("sync_runs")
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise StateError(f"cannot open the state database {describe(engine)}: {exc.orig}") from None
    if not has_runs:
        engine.dispose()
        raise StateError(
            f"no run history in {describe(engine)}: run `audience-sync db upgrade` or a sync first"
        )
    return History(config, engine)


def write_report(
    config: Config,
    url: str,
    path: Path,
    *,
    audiences: Sequence[str] = (),
    window: str = "30d",
    users: Sequence[str] = (),
) -> None:
    """Write every history page into the one HTML file ``path`` (nothing in it loads anything)."""
    history = open_history(config, url)
    try:
        html = Pages(history, ReportLinks()).report(audiences, window, users)
    finally:
        history.engine.dispose()
    path.write_text(html, encoding="utf-8")


def serve(
    config: Config,
    url: str,
    *,
    host: str,
    port: int,
    token: str | None,
    ready: Callable[[HistoryServer], None],
) -> None:
    """Serve the pages until interrupted; ``ready`` is told the bound server first."""
    history = open_history(config, url)
    try:
        with HistoryServer(host, port, Pages(history), token=token) as server:
            ready(server)
            with contextlib.suppress(KeyboardInterrupt):
                server.serve_forever()
    finally:
        history.engine.dispose()
