"""What the Crisp destination learned about the API it talks to, kept in ``crisp_facts``.

Two facts are learned from Crisp's answers and remembered across runs, so that no run pays
again to find out what an earlier one did:

- ``email_addressing``: whether an email addresses a profile in place of a people_id (unverified,
  CRISP.md). Learned from the first answer to a request addressed by email; remembered while
  the destination's settings stay the same.
- ``batch_refused``: Crisp refused ``PATCH /batch/data`` (403/404/405). Remembered for a day
  (a token's scopes may change) or until the settings change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.destinations.crisp.tables import crisp_facts

__all__ = ["BATCH_REFUSED", "EMAIL_ADDRESSING", "Facts", "fingerprint"]

EMAIL_ADDRESSING = "email_addressing"
BATCH_REFUSED = "batch_refused"
#: How long a refused batch route is believed (the token's scopes may change meanwhile).
BATCH_REFUSAL_TTL = timedelta(days=1)


def fingerprint(settings_json: str) -> str:
    """The fingerprint of the destination settings a fact was learned under."""
    return hashlib.md5(settings_json.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Fact:
    value: bool
    detail: str | None
    learned_at: datetime


class Facts:
    """The ``crisp_facts`` rows of one destination, for one settings fingerprint."""

    def __init__(
        self, engine: sa.Engine, destination: str, config: str, clock: Clock = utc_now
    ) -> None:
        self.engine = engine
        self.destination = destination
        self.config = config
        self.clock = clock

    def load(self) -> dict[str, Fact]:
        """The facts still valid: learned under the same settings (and, for a refused batch
        route, within a day)."""
        if not sa.inspect(self.engine).has_table("crisp_facts"):
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(crisp_facts).where(crisp_facts.c.destination == self.destination)
            ).all()
        now = self.clock()
        found = {}
        for r in rows:
            learned = (
                r.learned_at if r.learned_at.tzinfo else r.learned_at.replace(tzinfo=now.tzinfo)
            )
            if r.config != self.config:
                continue
            if r.fact == BATCH_REFUSED and now - learned >= BATCH_REFUSAL_TTL:
                continue
            found[r.fact] = Fact(bool(r.value), r.detail, learned)
        return found

    def remember(self, fact: str, value: bool, detail: str | None = None) -> None:
        values = {
            "destination": self.destination,
            "fact": fact,
            "value": value,
            "detail": detail,
            "config": self.config,
            "learned_at": self.clock(),
        }
        key = sa.and_(crisp_facts.c.destination == self.destination, crisp_facts.c.fact == fact)
        try:
            with self.engine.begin() as conn:
                conn.execute(crisp_facts.delete().where(key))
                conn.execute(crisp_facts.insert().values(**values))
        except sa.exc.IntegrityError:
            pass  # another process recorded the same fact at the same moment
