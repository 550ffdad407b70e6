"""Snapshot fingerprints in the state: what lets a run skip an unchanged snapshot's diff.

One row per audience (so per destination), written only when a run left the state exactly
equal to its snapshot, and deleted in the transaction that starts any run of the audience
(``clear``, from ``StateStore.start_run``): a run that crashes, fails, is stopped, is retired
or ends with anything left over leaves no fingerprint, and the next run diffs in full. The
fingerprint is a cache of a fact about the state: deleting the table's rows changes no result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from audience_sync.state.schema import sync_fingerprints, sync_pending

__all__ = ["Confirmed", "clear", "confirmed", "record"]


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A snapshot the state was left exactly equal to, by run ``run_id``."""

    fingerprint: str
    run_id: int
    snapshot_rows: int
    members: int
    snapshot_at: datetime | None
    """The time of a ``snapshot_at`` column; None when the snapshot's time was ``mtime``."""
    mtime: datetime
    members_cache: str | None = None
    """The digest of the member cache's file holding exactly the state's members (None: none)."""


def clear(conn: sa.Connection, audience_id: int) -> None:
    """Forget the audience's fingerprint (inside the transaction that starts a run)."""
    conn.execute(sync_fingerprints.delete().where(sync_fingerprints.c.audience_id == audience_id))


def confirmed(engine: sa.Engine, audience_id: int) -> Confirmed | None:
    """The audience's stored fingerprint, unless it has retry rows (held or pending changes
    that a run would send again)."""
    retries = sa.exists().where(sync_pending.c.audience_id == audience_id)
    query = sa.select(sync_fingerprints).where(
        sync_fingerprints.c.audience_id == audience_id, ~retries
    )
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    if row is None:
        return None
    return Confirmed(
        row["fingerprint"],
        row["run_id"],
        row["snapshot_rows"],
        row["members"],
        _aware(row["snapshot_at"]) if row["snapshot_at"] is not None else None,
        _aware(row["mtime"]),
        row["members_cache"],
    )


def record(engine: sa.Engine, audience_id: int, fact: Confirmed, now: datetime) -> bool:
    """Store ``fact`` for the audience, unless it has retry rows; whether it was stored."""
    retries = sa.exists().where(sync_pending.c.audience_id == audience_id)
    row = sa.select(
        sa.literal(audience_id),
        sa.literal(fact.fingerprint),
        sa.literal(fact.run_id),
        sa.literal(fact.snapshot_rows),
        sa.literal(fact.members),
        sa.literal(fact.snapshot_at, sync_fingerprints.c.snapshot_at.type),
        sa.literal(fact.mtime, sync_fingerprints.c.mtime.type),
        sa.literal(now, sync_fingerprints.c.recorded_at.type),
        sa.literal(fact.members_cache, sync_fingerprints.c.members_cache.type),
    ).where(~retries)
    columns = [c.name for c in sync_fingerprints.columns]
    with engine.begin() as conn:
        clear(conn, audience_id)
        stored = conn.execute(sync_fingerprints.insert().from_select(columns, row)).rowcount
    return bool(stored)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything stored is UTC. (Not store.as_utc: the store
    # imports this module.)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
