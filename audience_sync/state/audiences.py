"""The audiences (and computed traits) the state knows, per destination, and their members:
the user ids (and a trait's values) the destination last confirmed. Planning reads the members
(the diff's "synced" side); ``store.StateStore.apply`` writes them; ``retire`` empties them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.clock import Clock
from audience_sync.errors import ConfigError
from audience_sync.model import SyncKind
from audience_sync.state.schema import sync_audiences, sync_members, sync_pending, sync_runs

if TYPE_CHECKING:  # pandas and the bulk paths load when used: `status` needs none
    import pandas as pd
    import pyarrow as pa

__all__ = ["AudienceRef", "Audiences", "kind_changed"]


@dataclass(frozen=True, slots=True)
class AudienceRef:
    """An audience as the state knows it: its number per destination."""

    id: int
    destination: str
    key: str
    name: str
    kind: SyncKind = SyncKind.AUDIENCE


class Audiences:
    """The audiences' rows and their members (a part of ``StateStore``)."""

    engine: sa.Engine
    clock: Clock

    def audience(
        self, destination: str, key: str, name: str, kind: SyncKind = SyncKind.AUDIENCE
    ) -> AudienceRef:
        """The audience's (or computed trait's) row, created on first use; its name follows the
        config. A ``ConfigError`` when the key was the other kind: its state cannot serve."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(
                    sync_audiences.c.id, sync_audiences.c.audience_name, sync_audiences.c.kind
                ).where(
                    sync_audiences.c.destination == destination,
                    sync_audiences.c.audience_key == key,
                )
            ).first()
            if row is None:
                audience_id = conn.execute(
                    sync_audiences.insert().values(
                        destination=destination,
                        audience_key=key,
                        audience_name=name,
                        created_at=self.clock(),
                        kind=kind.value,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            else:
                audience_id = row.id
                if row.kind != kind.value:
                    raise kind_changed(destination, key, name, SyncKind(row.kind))
                if row.audience_name != name:
                    conn.execute(
                        sync_audiences.update()
                        .where(sync_audiences.c.id == audience_id)
                        .values(audience_name=name)
                    )
        return AudienceRef(int(audience_id), destination, key, name, kind)

    def find_audience(
        self, destination: str, key: str, *, by_name: bool = False
    ) -> AudienceRef | None:
        """The audience with trait key ``key`` (or, ``by_name``, that display name too)."""
        matches = sync_audiences.c.audience_key == key
        if by_name:
            matches = matches | (sync_audiences.c.audience_name == key)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sync_audiences)
                .where(sync_audiences.c.destination == destination, matches)
                .order_by((sync_audiences.c.audience_key != key), sync_audiences.c.id)
            ).first()
        if row is None:
            return None
        return _ref(row)

    def members(self, audience_id: int) -> pd.Index:
        """The user ids the destination was last confirmed to hold as members."""
        import pandas as pd

        from audience_sync.state import bulk

        ids = bulk.read_members_arrow(self.engine.url, audience_id)
        if ids is None:
            with self.engine.connect() as conn:
                ids = bulk.read_members(conn, audience_id)
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index

    def values(self, audience_id: int) -> tuple[pd.Index, pa.Array]:
        """A computed trait's users with a confirmed value, and those values (canonical JSON)."""
        import pandas as pd

        from audience_sync.state import bulk

        with self.engine.connect() as conn:
            table = bulk.read_values(conn, audience_id)
        ids = table.column("user_id").combine_chunks()
        index: pd.Index = pd.Index(pd.array(ids, dtype="string[pyarrow]"), name="user_id")
        return index, table.column("value").combine_chunks()

    def with_members(self, destination: str) -> list[AudienceRef]:
        """The destination's audiences that have at least one member in the state."""
        if not sa.inspect(self.engine).has_table("sync_audiences"):
            return []
        member = sa.exists().where(sync_members.c.audience_id == sync_audiences.c.id)
        query = (
            sa.select(sync_audiences)
            .where(sync_audiences.c.destination == destination, member)
            .order_by(sync_audiences.c.id)
        )
        with self.engine.connect() as conn:
            return [_ref(r) for r in conn.execute(query)]

    def member_count(self, audience_id: int) -> int:
        """How many members the state holds for the audience (counted by the database)."""
        query = sa.select(sa.func.count()).where(sync_members.c.audience_id == audience_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def retire_done(self, audience_id: int) -> bool:
        """Whether the audience holds no member and no retry row: nothing left to retire."""
        with self.engine.connect() as conn:
            left = conn.execute(
                sa.select(sync_members.c.user_id)
                .where(sync_members.c.audience_id == audience_id)
                .union_all(
                    sa.select(sync_pending.c.user_id).where(
                        sync_pending.c.audience_id == audience_id
                    )
                )
                .limit(1)
            ).first()
        return left is None

    def drop_audience_state(self, audience_id: int) -> None:
        """Forget a retired audience's members and retry queue (its history stays)."""
        with self.engine.begin() as conn:
            conn.execute(sync_members.delete().where(sync_members.c.audience_id == audience_id))
            conn.execute(sync_pending.delete().where(sync_pending.c.audience_id == audience_id))

    def holds_nothing(self, destination: str) -> bool:
        """Whether the state holds no member and no delivered change for ``destination``."""
        if not sa.inspect(self.engine).has_table("sync_audiences"):
            return True
        audiences = sa.select(sync_audiences.c.id).where(
            sync_audiences.c.destination == destination
        )
        with self.engine.connect() as conn:
            member = conn.execute(
                sa.select(sync_members.c.user_id)
                .where(sync_members.c.audience_id.in_(audiences))
                .limit(1)
            ).first()
            delivered = conn.execute(
                sa.select(sync_runs.c.id)
                .where(sync_runs.c.destination == destination, sync_runs.c.delivered > 0)
                .limit(1)
            ).first()
        return member is None and delivered is None


def kind_changed(destination: str, key: str, name: str, was: SyncKind) -> ConfigError:
    """The error for a key the state holds as the other kind (audience or computed trait)."""
    what = "a computed trait" if was is SyncKind.TRAIT else "an audience"
    return ConfigError(
        f"trait key {key!r} ({name!r}) was synced to {destination!r} as {what}; the state of "
        f"one kind cannot serve the other. Retire it first (`audience-sync retire {key}`, with "
        "it removed from the config) or give this one another `key`"
    )


def _ref(row: sa.Row[Any]) -> AudienceRef:
    return AudienceRef(
        row.id, row.destination, row.audience_key, row.audience_name, SyncKind(row.kind)
    )
