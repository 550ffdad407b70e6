"""The run history: one ``sync_runs`` row per audience and run (written ``running`` at its start,
its counters moved with each commit, finished with its status) and the rejected snapshot rows
the run kept. The engine writes them; ``history``, ``web/``, ``alerts`` and the CLI read them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from audience_sync.clock import Clock
from audience_sync.model import MAX_REJECTED_ROWS, RejectedRow, RunMode, RunStatus
from audience_sync.state import fingerprints
from audience_sync.state.audiences import AudienceRef
from audience_sync.state.database import as_dict, scoped
from audience_sync.state.schema import sync_changes, sync_rejected_rows, sync_runs

__all__ = ["COUNTERS", "MAX_STORED_ROWS", "Runs", "holder_id"]

#: The per-run counters of ``sync_runs``.
COUNTERS = (
    "snapshot_rows",
    "rejected_rows",
    "entered",
    "exited",
    "unchanged",
    "delivered",
    "failed",
    "skipped",
    "pending",
)

#: Rejected snapshot rows stored per audience and run (``sync_runs.rejected_rows`` counts all).
MAX_STORED_ROWS = MAX_REJECTED_ROWS


def holder_id() -> str:
    """Who holds a lock or started a run: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Runs:
    """The run history (a part of ``StateStore``)."""

    engine: sa.Engine
    clock: Clock

    def has_history(self) -> bool:
        """Whether the database has the run history's table (a run or ``db upgrade`` made it)."""
        return sa.inspect(self.engine).has_table("sync_runs")

    def has_succeeded(self, audience_id: int) -> bool:
        """Whether a run of the audience has ``succeeded`` since it was last retired (so it is
        past its initial sync)."""
        retired = (
            sa.select(sa.func.coalesce(sa.func.max(sync_runs.c.id), 0))
            .where(sync_runs.c.audience_id == audience_id, sync_runs.c.mode == RunMode.RETIRE.value)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_runs.c.id)
                .where(
                    sync_runs.c.audience_id == audience_id,
                    sync_runs.c.status == RunStatus.SUCCEEDED.value,
                    sync_runs.c.id > retired,
                )
                .limit(1)
            ).first()
        return row is not None

    def start_run(self, audience: AudienceRef, *, mode: str, trigger: str) -> int:
        """Write the run's row as ``running`` (so a crash leaves a visible trace), and forget
        the audience's snapshot fingerprint in the same transaction."""
        with self.engine.begin() as conn:
            fingerprints.clear(conn, audience.id)
            run_id = conn.execute(
                sync_runs.insert().values(
                    audience_id=audience.id,
                    destination=audience.destination,
                    audience_key=audience.key,
                    audience_name=audience.name,
                    mode=mode,
                    trigger=trigger,
                    status=RunStatus.RUNNING.value,
                    started_at=self.clock(),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        return int(run_id)

    def update_run(self, run_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sync_runs.update().where(sync_runs.c.id == run_id).values(**values))

    def finish_run(
        self, run_id: int, status: RunStatus, error: str | None = None, **counts: int
    ) -> None:
        self.update_run(
            run_id, status=status.value, finished_at=self.clock(), error=error, **counts
        )

    def run(self, run_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id))
                .mappings()
                .first()
            )
        return as_dict(row) if row is not None else None

    def runs(
        self,
        *,
        destination: str | None = None,
        audience_keys: Iterable[str] = (),
        limit: int = 20,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The newest runs first; only those started at ``since`` or later, when given."""
        query = sa.select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
        query = scoped(query, sync_runs.c, destination, audience_keys)
        if since is not None:
            query = query.where(sync_runs.c.started_at >= since)
        with self.engine.connect() as conn:
            return [as_dict(r) for r in conn.execute(query).mappings()]

    def mark_interrupted(self, audience_id: int, *, reason: str) -> int:
        """Mark the audience's runs still ``running`` (by a process now gone) as interrupted."""
        query = (
            sync_runs.update()
            .where(
                sync_runs.c.audience_id == audience_id,
                sync_runs.c.status == RunStatus.RUNNING.value,
            )
            .values(status=RunStatus.INTERRUPTED.value, finished_at=self.clock(), error=reason)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount

    def add_rejected(self, run_id: int, audience_key: str, rows: Sequence[RejectedRow]) -> None:
        """Keep a run's rejected snapshot rows (the first ``MAX_STORED_ROWS``)."""
        if not rows:
            return
        at = self.clock()
        width = sync_rejected_rows.c.user_id.type.length or 255  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            conn.execute(
                sync_rejected_rows.insert(),
                [
                    {
                        "run_id": run_id,
                        "audience_key": audience_key,
                        "row_number": r.row,
                        "user_id": None if r.user_id is None else r.user_id[:width],
                        "reason": r.reason,
                        "at": at,
                    }
                    for r in rows[:MAX_STORED_ROWS]
                ],
            )

    def rejected_rows(
        self,
        *,
        run_id: int | None = None,
        audience_keys: Iterable[str] = (),
        destination: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored rejected snapshot rows, newest run first, in row order within a run.

        Each row: ``run_id``, ``audience_key``, ``row_number``, ``user_id``, ``reason``, ``at``
        and the run's ``destination``, ``audience_name`` and ``rejected_rows`` (all it counted).
        None are listed from a database older than the table (migration 0006).
        """
        if not sa.inspect(self.engine).has_table("sync_rejected_rows"):
            return []
        r = sync_rejected_rows.c
        query = (
            sa.select(
                sync_rejected_rows,
                sync_runs.c.destination,
                sync_runs.c.audience_name,
                sync_runs.c.rejected_rows,
            )
            .join(sync_runs, sync_runs.c.id == r.run_id)
            .order_by(r.run_id.desc(), r.row_number, r.id)
            .limit(limit)
        )
        if run_id is not None:
            query = query.where(r.run_id == run_id)
        query = scoped(query, sync_runs.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return [as_dict(row) for row in conn.execute(query).mappings()]

    def user_changes(
        self, user_id: str, *, destination: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The change log of one user (for one destination, when given), newest first.

        A computed trait's rows carry its value before and after (``old_value``,
        ``new_value``: canonical JSON, None for none); ``history.user_changes`` shows them.
        """
        # The log's one index is by (run_id, user_id) (migration 0013): ask for the user in
        # each run's part of it. As a join, SQLite scans the whole log backwards by id instead.
        runs = scoped(sa.select(sync_runs.c.id), sync_runs.c, destination, ())
        query = (
            sa.select(
                sync_changes,
                sync_runs.c.destination,
                sync_runs.c.audience_name,
                sync_runs.c.mode,
            )
            .join(sync_runs, sync_runs.c.id == sync_changes.c.run_id)
            .where(sync_changes.c.run_id.in_(runs), sync_changes.c.user_id == user_id)
            .order_by(sync_changes.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = [as_dict(r) for r in conn.execute(query).mappings()]
        return rows
