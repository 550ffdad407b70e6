"""Reading the run history for people: one run in detail, the health of each audience
(``status``), and pruning old history so the database does not grow without bound.

Library functions over the state tables; ``cli.py`` only prints what they return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from audience_sync.config import AudienceConfig, Config
from audience_sync.destinations.budget import requests_by_day
from audience_sync.errors import ExitCode
from audience_sync.model import DeliveryStatus, RunStatus
from audience_sync.schedule import describe, due_after, trigger
from audience_sync.state.database import as_utc
from audience_sync.state.lock import RunLock
from audience_sync.state.runs import MAX_STORED_ROWS
from audience_sync.state.schema import sync_changes, sync_pending, sync_rejected_rows, sync_runs
from audience_sync.state.store import StateStore

__all__ = [
    "AudienceStatus",
    "DestinationQuota",
    "Pruned",
    "RunDetail",
    "StatusReport",
    "prune",
    "quota",
    "run_detail",
    "status",
    "user_changes",
]

_TICK = timedelta(microseconds=1)


@dataclass(slots=True)
class RunDetail:
    """One ``sync_runs`` row, its change-log totals, samples of what did not go through and the
    snapshot rows it rejected (as stored: the first ``MAX_STORED_ROWS``)."""

    run: dict[str, Any]
    outcomes: dict[str, int]
    reasons: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    rejected: list[dict[str, Any]] = field(default_factory=list)


def user_changes(
    store: StateStore, user_id: str, *, destination: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The change log of one user, newest first (``StateStore.user_changes``), for people: a
    computed trait's change shows as ``value``, e.g. ``600 (was 523.4)`` or ``cleared (was 7)``."""
    rows = store.user_changes(user_id, destination=destination, limit=limit)
    for row in rows:
        old, new = row.pop("old_value", None), row.pop("new_value", None)
        if old is not None or new is not None:  # a computed trait's (audiences: true/false)
            row["value"] = (new if new is not None else "cleared") + (
                f" (was {old})" if old is not None else ""
            )
    return rows


def run_detail(store: StateStore, run_id: int, *, samples: int = 10) -> RunDetail | None:
    """The run ``run_id`` or ``None``; ``reasons`` groups failures by their reason, most first."""
    run = store.run(run_id)
    if run is None:
        return None
    c = sync_changes.c
    not_delivered = (c.run_id == run_id) & (c.outcome != DeliveryStatus.DELIVERED.value)
    with store.engine.connect() as conn:
        outcomes = {
            str(row.outcome): int(row.n)
            for row in conn.execute(
                sa.select(c.outcome, sa.func.count().label("n"))
                .where(c.run_id == run_id)
                .group_by(c.outcome)
            )
        }
        reasons = [
            {"outcome": row.outcome, "reason": row.reason, "users": int(row.n)}
            for row in conn.execute(
                sa.select(c.outcome, c.reason, sa.func.count().label("n"))
                .where(not_delivered)
                .group_by(c.outcome, c.reason)
                .order_by(sa.func.count().desc(), c.reason)
                .limit(samples)
            )
        ]
        sample_rows = [
            dict(row)
            for row in conn.execute(
                sa.select(c.user_id, c.trait_key, c.value, c.outcome, c.reason)
                .where(not_delivered)
                .order_by(c.id)
                .limit(samples)
            ).mappings()
        ]
    rejected = store.rejected_rows(run_id=run_id, limit=MAX_STORED_ROWS)
    return RunDetail(run, outcomes, reasons, sample_rows, rejected)


@dataclass(slots=True)
class AudienceStatus:
    """How one configured audience is doing."""

    audience: AudienceConfig
    schedule: str
    last_run: dict[str, Any] | None
    running_since: datetime | None
    running_holder: str | None
    next_run: datetime | None
    retry_waiting: int
    problems: list[str] = field(default_factory=list)
    overdue: bool = False
    """A scheduled run is late by more than ``[service] overdue_after`` (one of the problems)."""
    recent: list[dict[str, Any]] = field(default_factory=list)
    """The last runs, newest first (the red/green strip of the history page)."""
    missed: int = 0
    """Scheduled runs more than ``overdue_after`` late with none started (counted up to 2)."""

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def state(self) -> str:
        """One word for people: ``failing``, ``overdue`` (two runs missed), ``late`` (one),
        ``running``, ``never run`` or ``healthy``; the first that applies."""
        finished = next((r for r in self.recent if r["status"] != RunStatus.RUNNING.value), None)
        if finished is not None and finished["status"] == RunStatus.FAILED.value:
            return "failing"
        if self.missed:
            return "overdue" if self.missed > 1 else "late"
        if self.running_since is not None:
            return "running"
        return "healthy" if self.last_run is not None else "never run"


@dataclass(slots=True)
class StatusReport:
    destination: str
    now: datetime
    audiences: list[AudienceStatus]

    @property
    def healthy(self) -> bool:
        return all(a.healthy for a in self.audiences)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.healthy else ExitCode.UNHEALTHY


def status(config: Config, engine: sa.Engine, *, now: datetime, recent: int = 5) -> StatusReport:
    """Each audience's schedule, last run, run in progress, next run, retry queue and its
    ``recent`` last runs.

    An audience is unhealthy when its last finished run ``failed``, or when a scheduled run is
    more than ``[service] overdue_after`` late and none is in progress.
    """
    store = StateStore(engine)
    has_state = sa.inspect(engine).has_table("sync_audiences")
    holders = RunLock(engine).holders() if has_state else {}
    dest = config.destination.name
    report = StatusReport(dest, now, [])
    for audience in config.audiences:
        ref = store.find_audience(dest, audience.trait_key) if has_state else None
        last = _last_runs(engine, ref.id, max(recent, 5)) if ref is not None else []
        held = holders.get(ref.id) if ref is not None else None
        running = held is not None and held[2] is not None and held[2] > now
        entry = AudienceStatus(
            audience,
            describe(audience),
            last[0] if last else None,
            held[1] if running and held is not None else None,
            held[0] if running and held is not None else None,
            None,
            _retry_waiting(engine, ref.id) if ref is not None else 0,
            recent=last[:recent],
        )
        finished = next((r for r in last if r["status"] != RunStatus.RUNNING.value), None)
        if finished is not None and finished["status"] == RunStatus.FAILED.value:
            entry.problems.append(f"last run {finished['id']} failed: {finished['error']}")
        last_start: datetime | None = last[0]["started_at"] if last else None
        t = trigger(audience, config.service, last_start=last_start)
        if t is not None:
            upcoming: datetime | None = t.get_next_fire_time(None, now)
            entry.next_run = upcoming.astimezone(UTC) if upcoming is not None else None
        if last_start is not None and not running:
            due = due_after(audience, config.service, last_start)
            if due is not None and now - due > config.service.overdue_after:
                entry.next_run = due.astimezone(UTC)
                entry.overdue = True
                after = t.get_next_fire_time(None, due + _TICK) if t is not None else None
                entry.missed = 2 if after and now - after > config.service.overdue_after else 1
                entry.problems.append(
                    f"overdue: a run was due at {due.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC and "
                    "none has started (is `audience-sync serve` running?)"
                )
        report.audiences.append(entry)
    return report


def _last_runs(engine: sa.Engine, audience_id: int, n: int = 5) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(sync_runs)
            .where(sync_runs.c.audience_id == audience_id)
            .order_by(sync_runs.c.id.desc())
            .limit(n)
        ).mappings()
        return [
            {k: as_utc(v) if isinstance(v, datetime) else v for k, v in r.items()} for r in rows
        ]


def _retry_waiting(engine: sa.Engine, audience_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(sync_pending.c.audience_id == audience_id)
            ).scalar_one()
        )


@dataclass(slots=True)
class DestinationQuota:
    """One destination's requests per UTC day against its daily budget, and its retry queue."""

    destination: str
    budget: int | None
    """The configured destination's daily request budget, when it has one."""
    days: list[tuple[date, int]]
    """Every UTC day of the window, oldest first (0 on days without requests)."""
    pending_users: int

    @property
    def used_today(self) -> int:
        return self.days[-1][1] if self.days else 0

    @property
    def days_to_finish(self) -> int | None:
        """UTC days (today counting as one) to send the pending users, at one request per user
        (a known Crisp profile's cost; a new one costs two), or ``None`` without a budget."""
        if self.budget is None:
            return None
        if not self.pending_users:
            return 0
        beyond_today = max(self.pending_users - max(self.budget - self.used_today, 0), 0)
        return 1 + math.ceil(beyond_today / self.budget)


def quota(
    config: Config, store: StateStore, *, now: datetime, days: int = 14
) -> list[DestinationQuota]:
    """Requests per UTC day of every destination that counted some in the last ``days`` days,
    and of the configured one (with its daily request budget)."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    used: dict[str, dict[date, int]] = {config.destination.name: {}}
    for destination, day, n in requests_by_day(store.engine, first):
        used.setdefault(destination, {})[day] = n
    budget = config.destination.settings.request_budget
    window = [first + timedelta(days=i) for i in range(days)]
    return [
        DestinationQuota(
            destination,
            budget if destination == config.destination.name else None,
            [(d, by_day.get(d, 0)) for d in window],
            sum(g["users"] for g in store.retry_reasons(destination=destination)),
        )
        for destination, by_day in used.items()
    ]


@dataclass(frozen=True, slots=True)
class Pruned:
    """What ``prune`` deleted (or would delete, on a dry run)."""

    cutoff: datetime
    changes: int
    runs: int


def prune(
    engine: sa.Engine, *, older_than: timedelta, now: datetime, dry_run: bool = False
) -> Pruned:
    """Delete change-log rows and runs older than ``older_than`` (and the deleted runs'
    rejected rows).

    Kept whatever their age: runs still ``running``, each audience's latest run and its latest
    ``succeeded`` one (``status`` and the run mode read them), and runs with change-log rows
    newer than the cutoff. The retry queue is live state and is never pruned.
    """
    cutoff = now - older_than
    runs = sync_runs.c
    with engine.begin() as conn:
        keep: set[int] = set()
        for where in (sa.true(), runs.status == RunStatus.SUCCEEDED.value):
            keep.update(
                int(v)
                for v in conn.execute(
                    sa.select(sa.func.max(runs.id)).where(where).group_by(runs.audience_id)
                ).scalars()
            )
        old_changes = sync_changes.c.at < cutoff
        recent = sa.select(sync_changes.c.id).where(
            sync_changes.c.run_id == runs.id, sync_changes.c.at >= cutoff
        )
        old_runs = sa.and_(
            runs.started_at < cutoff,
            runs.status != RunStatus.RUNNING.value,
            runs.id.not_in(sorted(keep)) if keep else sa.true(),
            ~sa.exists(recent),
        )
        if dry_run:
            n_changes = conn.execute(
                sa.select(sa.func.count()).select_from(sync_changes).where(old_changes)
            ).scalar_one()
            n_runs = conn.execute(
                sa.select(sa.func.count()).select_from(sync_runs).where(old_runs)
            ).scalar_one()
            return Pruned(cutoff, int(n_changes), int(n_runs))
        n_changes = conn.execute(sync_changes.delete().where(old_changes)).rowcount
        n_runs = conn.execute(sync_runs.delete().where(old_runs)).rowcount
        rejected = sync_rejected_rows.c
        conn.execute(
            sync_rejected_rows.delete().where(
                ~sa.exists(sa.select(runs.id).where(runs.id == rejected.run_id))
            )
        )
    return Pruned(cutoff, n_changes, n_runs)
