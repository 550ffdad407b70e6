"""The state behind one small API: ``StateStore`` joins the state's parts (``audiences``: the
audiences and their members; ``runs``: the run history; ``retries``: the retry queue) and
writes one batch of confirmed outcomes (``apply``, fed by ``ledger``) in one transaction: the
members, the retry queue, the change log and the run's counters move together or not at all.

The store uses an ``Engine`` it is given (``database.connect``) and a clock it can be given,
so tests control both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.state.audiences import AudienceRef, Audiences, kind_changed
from audience_sync.state.database import as_utc, connect, describe, schema_is_current, upgrade
from audience_sync.state.retries import RetryQueue, delete_retries
from audience_sync.state.runs import COUNTERS, MAX_STORED_ROWS, Runs, holder_id
from audience_sync.state.schema import sync_pending, sync_runs

if TYPE_CHECKING:  # the bulk paths load when used: `status` needs none
    from audience_sync.state import bulk

# The names callers imported from here before the store was split keep working.
__all__ = [
    "COUNTERS",
    "MAX_STORED_ROWS",
    "Applied",
    "AudienceRef",
    "Clock",
    "StateStore",
    "as_utc",
    "connect",
    "describe",
    "holder_id",
    "kind_changed",
    "schema_is_current",
    "upgrade",
    "utc_now",
]


@dataclass(slots=True)
class Applied:
    """Everything one batch of confirmed outcomes changes for one audience's run."""

    audience_id: int
    run_id: int
    trait_key: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    values: list[tuple[str, str]] = field(default_factory=list)
    """A computed trait's ``(user_id, value)`` set (inserted or replaced) in the state."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    changes: bulk.ChangeRows = field(init=False)
    """The change log's rows (kept empty when the change log is off)."""
    delivered: int = 0
    failed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        from audience_sync.state import bulk

        self.changes = bulk.ChangeRows(self.run_id, self.trait_key)


class StateStore(Audiences, Runs, RetryQueue):
    """The state tables behind a small API: the parts' methods, and ``apply``."""

    def __init__(self, engine: sa.Engine, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock

    def apply(
        self, batches: Sequence[Applied], on_commit: Callable[[sa.Connection], None] | None = None
    ) -> None:
        """Write the confirmed outcomes of one delivery batch, for all audiences, atomically."""
        from audience_sync.state import bulk

        now = self.clock()
        # One statement per table for all audiences: a commit's cost is its rows, not its
        # number of audiences (the engine commits every few hundred users).
        with self.engine.begin() as conn:
            bulk.add_members(conn, [(b.audience_id, b.added) for b in batches])
            bulk.set_values(conn, [(b.audience_id, u, v) for b in batches for u, v in b.values])
            bulk.remove_members(conn, [(b.audience_id, b.removed) for b in batches])
            for b in batches:
                delete_retries(conn, b.audience_id, b.cleared + [p["user_id"] for p in b.pending])
                if b.pending:
                    conn.execute(
                        sync_pending.insert(),
                        [
                            {
                                "audience_id": b.audience_id,
                                "last_run_id": b.run_id,
                                "last_at": now,
                                **p,
                            }
                            for p in b.pending
                        ],
                    )
            bulk.log_changes(conn, now, [b.changes for b in batches])
            counted = [b for b in batches if b.delivered or b.failed or b.skipped]
            if counted:
                runs = sync_runs.c
                conn.execute(
                    sync_runs.update()
                    .where(runs.id == sa.bindparam("run"))
                    .values(
                        delivered=runs.delivered + sa.bindparam("d"),
                        failed=runs.failed + sa.bindparam("f"),
                        skipped=runs.skipped + sa.bindparam("s"),
                        # In the same statement, so a killed run's row still adds up: pending,
                        # delivered, failed and skipped always sum to what was planned.
                        pending=runs.pending - sa.bindparam("n"),
                    ),
                    [
                        {
                            "run": b.run_id,
                            "d": b.delivered,
                            "f": b.failed,
                            "s": b.skipped,
                            "n": b.delivered + b.failed + b.skipped,
                        }
                        for b in counted
                    ],
                )
            if on_commit is not None:
                on_commit(conn)
