"""The retry queue (``sync_pending``): per audience, the users whose last change the destination
did not confirm, with its reason, sent again by the next run. The engine reads an audience's
queue before planning; ``store.StateStore.apply`` fills and clears it with each commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.state.database import as_dict, chunks, scoped
from audience_sync.state.schema import sync_audiences, sync_pending

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RetryQueue", "delete_retries"]


class RetryQueue:
    """The retry queue (a part of ``StateStore``)."""

    engine: sa.Engine

    def retry_queue(self, audience_id: int) -> pd.DataFrame:
        """Users whose last change was not delivered, indexed by user id."""
        import pandas as pd

        with self.engine.connect() as conn:
            frame = pd.DataFrame(
                conn.execute(
                    sa.select(sync_pending).where(sync_pending.c.audience_id == audience_id)
                )
                .mappings()
                .all(),
                columns=[c.name for c in sync_pending.columns],
            )
        return frame.set_index("user_id")

    def drop_retries(self, audience_id: int, user_ids: Sequence[str]) -> None:
        """Forget retry rows that no longer match a planned change (the user moved on)."""
        with self.engine.begin() as conn:
            delete_retries(conn, audience_id, user_ids)

    def retry_counts(self, destination: str, audience_keys: Sequence[str]) -> dict[str, int]:
        """Users waiting in the retry queue, by audience key (audiences with none: absent)."""
        query = (
            sa.select(sync_audiences.c.audience_key, sa.func.count())
            .join(sync_pending, sync_pending.c.audience_id == sync_audiences.c.id)
            .group_by(sync_audiences.c.audience_key)
        )
        query = scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return {key: int(n) for key, n in conn.execute(query)}

    def retry_rows(
        self, *, destination: str | None = None, audience_keys: Iterable[str] = (), limit: int = 100
    ) -> list[dict[str, Any]]:
        """Users waiting for retry, with the destination's reason, oldest first."""
        query = (
            sa.select(sync_audiences.c.audience_key, sync_audiences.c.destination, sync_pending)
            .join(sync_audiences, sync_audiences.c.id == sync_pending.c.audience_id)
            .order_by(sync_pending.c.first_at, sync_pending.c.user_id)
            .limit(limit)
        )
        query = scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            rows = [as_dict(r) for r in conn.execute(query).mappings()]
        for row in rows:  # a computed trait's value to send (JSON; null: a clear)
            if row.get("data") is not None:
                row["value"] = row["data"]
        return rows

    def retry_reasons(
        self, *, destination: str | None = None, audience_keys: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """The retry queue grouped by audience, status, reason and status code, largest first."""
        p = sync_pending.c
        groups = (sync_audiences.c.audience_key, p.status, p.reason, p.status_code)
        query = (
            sa.select(
                *groups,
                sa.func.count().label("users"),
                sa.func.max(p.attempts).label("max_attempts"),
                sa.func.min(p.first_at).label("first_at"),
                sa.func.max(p.last_at).label("last_at"),
            )
            .join(sync_audiences, sync_audiences.c.id == p.audience_id)
            .group_by(*groups)
            .order_by(sa.func.count().desc(), *groups)
        )
        query = scoped(query, sync_audiences.c, destination, audience_keys)
        with self.engine.connect() as conn:
            return [as_dict(r) for r in conn.execute(query).mappings()]


def delete_retries(conn: sa.Connection, audience_id: int, user_ids: Sequence[str]) -> None:
    """Delete the audience's retry rows of ``user_ids`` (in the caller's transaction)."""
    for chunk in chunks(user_ids):
        conn.execute(
            sync_pending.delete().where(
                sync_pending.c.audience_id == audience_id,
                sync_pending.c.user_id.in_(chunk),
            )
        )
