"""What each history page shows, read through the same library calls the CLI prints
(``history.status``, ``history.run_detail``, ``history.quota``, ``StateStore.runs`` ...), so
the pages and ``audience-sync history`` / ``status`` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from audience_sync.config import Config
from audience_sync.history import (
    AudienceStatus,
    DestinationQuota,
    RunDetail,
    quota,
    run_detail,
    status,
    user_changes,
)
from audience_sync.state.database import as_utc
from audience_sync.state.store import StateStore
from audience_sync.web.charts import Chart, Series, bar_chart

__all__ = ["HealthRow", "History", "RunGroup"]

#: Runs in the strip of the health page.
STRIP = 20
#: The most runs one page charts (the newest); the window filter narrows further.
MAX_RUNS = 500

CHANGES = (
    Series("entered", "entered", "entered"),
    Series("exited", "exited", "exited", down=True),
)
DELIVERY = (
    Series("delivered", "delivered", "delivered"),
    Series("skipped", "skipped", "skipped"),
    Series("failed", "failed", "failed"),
)
REQUESTS = (Series("requests", "requests", "requests"),)


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One thing that syncs on a schedule. ``kind`` is ``audience`` today; computed traits
    (issue 11) would add rows of their own kind built from their own status."""

    kind: str
    name: str
    key: str
    schedule: str
    state: str
    last_run: dict[str, Any] | None
    next_run: datetime | None
    running_since: datetime | None
    retry_waiting: int
    problems: tuple[str, ...]
    strip: tuple[dict[str, Any], ...]
    """The last runs, oldest first."""


def _audience_row(a: AudienceStatus) -> HealthRow:
    return HealthRow(
        "audience",
        a.audience.name,
        a.audience.trait_key,
        a.schedule,
        a.state,
        a.last_run,
        a.next_run,
        a.running_since,
        a.retry_waiting,
        tuple(a.problems),
        tuple(reversed(a.recent)),
    )


@dataclass(frozen=True, slots=True)
class RunGroup:
    """One audience's runs in the window, oldest first, and their two charts."""

    key: str
    name: str
    runs: tuple[dict[str, Any], ...]
    changes: Chart
    delivery: Chart


def _tip(run: dict[str, Any]) -> str:
    return (
        f"run {run['id']} ({run['status']}) {run['started_at']:%Y-%m-%d %H:%M} UTC: "
        f"+{run['entered']} -{run['exited']}, {run['delivered']} delivered, "
        f"{run['failed']} failed, {run['skipped']} skipped"
    )


class History:
    """The pages' data, read from the state database the engine points at (read-only)."""

    def __init__(self, config: Config, engine: sa.Engine, store: StateStore | None = None) -> None:
        self.config = config
        self.engine = engine
        self.store = store or StateStore(engine)
        self._records_rejected: bool | None = None

    def records_rejected(self) -> bool:
        """Whether the database records rejected rows (migration 0006); asked once."""
        if self._records_rejected is None:
            self._records_rejected = sa.inspect(self.engine).has_table("sync_rejected_rows")
        return self._records_rejected

    def now(self) -> datetime:
        return self.store.clock()

    def health(self) -> list[HealthRow]:
        report = status(self.config, self.engine, now=self.now(), recent=STRIP)
        return [_audience_row(a) for a in report.audiences]

    def audience_names(self) -> dict[str, str]:
        """Trait key -> name of the configured audiences (the filter's choices)."""
        return {a.trait_key: a.name for a in self.config.audiences}

    def runs(
        self,
        audiences: Sequence[str],
        window: timedelta | None,
        *,
        run_href: Callable[[int], str],
    ) -> list[RunGroup]:
        """The runs started within ``window`` (all when ``None``) of the given audience keys (all
        when empty), grouped per audience in config order."""
        since = self.now() - window if window is not None else None
        rows = self.store.runs(
            destination=self.config.destination.name,
            audience_keys=audiences,
            limit=MAX_RUNS,
            since=since,
        )
        order = list(self.audience_names())
        by_key: dict[str, list[dict[str, Any]]] = {}
        for run in sorted(rows, key=lambda r: r["id"]):
            by_key.setdefault(run["audience_key"], []).append(run)
        groups = []
        for key in sorted(
            by_key, key=lambda k: (k not in order, order.index(k) if k in order else 0, k)
        ):
            runs = by_key[key]
            items = [
                (r, _tip(r), run_href(r["id"]), f"{r['started_at']:%m-%d %H:%M}") for r in runs
            ]
            groups.append(
                RunGroup(
                    key,
                    runs[-1]["audience_name"],
                    tuple(runs),
                    bar_chart("Members entered / exited", CHANGES, items),
                    bar_chart("Changes delivered / skipped / failed", DELIVERY, items),
                )
            )
        return groups

    def run(self, run_id: int) -> tuple[RunDetail, list[dict[str, Any]] | None] | None:
        """Run ``run_id`` and the snapshot rows it rejected (as ``history RUN_ID`` lists them),
        or ``None`` for them from a database before they were recorded (migration 0006)."""
        detail = run_detail(self.store, run_id, samples=50)
        if detail is None:
            return None
        return detail, (detail.rejected if self.records_rejected() else None)

    def quota(self) -> list[tuple[DestinationQuota, Chart]]:
        result = []
        for q in quota(self.config, self.store, now=self.now()):
            items = [
                ({"requests": n}, f"{day:%Y-%m-%d}: {n:,} requests", None, f"{day:%m-%d}")
                for day, n in q.days
            ]
            label = f"daily budget {q.budget:,}" if q.budget else ""
            chart = bar_chart(
                "Requests per UTC day", REQUESTS, items, limit=q.budget, limit_label=label
            )
            result.append((q, chart))
        return result

    def retry(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The retry queue grouped by reason and status code, and its oldest users."""
        dest = self.config.destination.name
        return (
            self.store.retry_reasons(destination=dest),
            self.store.retry_rows(destination=dest, limit=100),
        )

    def user(self, user_id: str) -> list[dict[str, Any]]:
        return user_changes(self.store, user_id, limit=500)


def duration(run: dict[str, Any]) -> str:
    start, end = as_utc(run["started_at"]), as_utc(run.get("finished_at"))
    if start is None or end is None:
        return "-"
    return f"{(end - start).total_seconds():.1f} s"
