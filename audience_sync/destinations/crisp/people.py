"""Who each user is in Crisp: ``user_id`` -> ``people_id`` (or the email that addresses the
profile), kept in the state database so a steady-state update needs no lookup.

A mapping is saved as soon as Crisp confirms it (right after a profile is created or resolved),
before the data update that follows, so a run killed in between does not create the profile
twice or look it up again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from audience_sync.clock import Clock, utc_now
from audience_sync.destinations.crisp.tables import crisp_people

__all__ = ["PeopleMap", "Person"]

_CHUNK = 900


@dataclass(frozen=True, slots=True)
class Person:
    """A user's Crisp profile as far as audience-sync knows it.

    ``people_id`` is Crisp's id; when only the email is known (a profile made elsewhere, found
    through the email), ``email`` addresses it. ``profile_hash`` fingerprints the profile card
    audience-sync last sent (or found), so identity changes are sent once.
    """

    people_id: str | None
    email: str | None
    profile_hash: str | None = None

    @property
    def address(self) -> str | None:
        """What goes in the ``{people_id}`` path segment."""
        return self.people_id or self.email

    def with_hash(self, profile_hash: str | None) -> Person:
        return replace(self, profile_hash=profile_hash)


class PeopleMap:
    """The ``crisp_people`` rows of one destination."""

    def __init__(self, engine: sa.Engine, destination: str, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.destination = destination
        self.clock = clock

    def lookup(self, user_ids: Iterable[str]) -> dict[str, Person]:
        ids = list(dict.fromkeys(user_ids))
        found: dict[str, Person] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), _CHUNK):
                rows = conn.execute(
                    sa.select(crisp_people).where(
                        crisp_people.c.destination == self.destination,
                        crisp_people.c.user_id.in_(ids[i : i + _CHUNK]),
                    )
                )
                for r in rows:
                    found[r.user_id] = Person(r.people_id, r.email, r.profile_hash)
        return found

    def save_now(self, user_id: str, person: Person) -> None:
        values = {
            "destination": self.destination,
            "user_id": user_id,
            "people_id": person.people_id,
            "email": person.email,
            "profile_hash": person.profile_hash,
            "updated_at": self.clock(),
        }
        changed = {k: values[k] for k in ("people_id", "email", "profile_hash", "updated_at")}
        with self.engine.begin() as conn:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(crisp_people)
                conn.execute(
                    insert.values(**values).on_conflict_do_update(
                        index_elements=["destination", "user_id"], set_=changed
                    )
                )
                return
            updated = conn.execute(
                crisp_people.update().where(self._key(user_id)).values(**changed)
            ).rowcount
            if not updated:
                conn.execute(crisp_people.insert().values(**values))

    def forget_now(self, user_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(crisp_people.delete().where(self._key(user_id)))

    async def save(self, user_id: str, person: Person) -> None:
        await asyncio.to_thread(self.save_now, user_id, person)

    async def forget(self, user_id: str) -> None:
        await asyncio.to_thread(self.forget_now, user_id)

    def _key(self, user_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(
            crisp_people.c.destination == self.destination, crisp_people.c.user_id == user_id
        )

    def owner_of(self, email: str, other_than: str) -> str | None:
        """A user_id other than ``other_than`` whose profile has ``email`` (any case)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(crisp_people.c.user_id)
                .where(
                    crisp_people.c.destination == self.destination,
                    sa.func.lower(crisp_people.c.email) == email.lower(),
                    crisp_people.c.user_id != other_than,
                )
                .limit(1)
            ).scalar()
        return None if found is None else str(found)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(crisp_people)
                    .where(crisp_people.c.destination == self.destination)
                ).scalar_one()
            )
