"""The daily request budget: requests counted per destination per UTC day in the state database.

For a destination whose API allows so many requests a day (Crisp; ``request_budget`` on its
settings). Before each request the client ``spend``s one; the budget reserves them from the
database in small blocks (one transaction per block, not per request) and refuses, with
``QuotaExhausted``, before the day's count would pass the limit. Reservations are shared safely
by concurrent runs (the row is locked while a block is taken). A block left unused is given back
on ``release``; a killed process leaves at most one block counted but unused, which errs on the
safe side. ``requests_used`` and ``requests_by_day`` read the counts back (``history``, the
metrics, the quota page).

The ``destination_requests`` table is declared here, in its own ``metadata``; the Alembic
migrations create it with the state's tables.
"""

from __future__ import annotations

import asyncio
from datetime import date

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.errors import QuotaExhausted

__all__ = [
    "RequestBudget",
    "destination_requests",
    "metadata",
    "requests_by_day",
    "requests_used",
]

metadata = sa.MetaData()

# Requests a destination made (or reserved) per UTC day, against its daily request budget.
destination_requests = sa.Table(
    "destination_requests",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


class RequestBudget:
    """``limit`` requests per UTC day for ``destination``."""

    def __init__(
        self,
        engine: sa.Engine,
        destination: str,
        limit: int,
        *,
        clock: Clock = utc_now,
        block: int = 10,
    ) -> None:
        self.engine = engine
        self.destination = destination
        self.limit = limit
        self.clock = clock
        self.block = block
        self.spent = 0
        """Requests this process made (all days)."""
        self._day: date | None = None
        self._reserved = 0
        self._lock = asyncio.Lock()

    def today(self) -> date:
        return self.clock().date()

    async def spend(self) -> None:
        """Count one request, or raise ``QuotaExhausted`` if today's budget is spent."""
        async with self._lock:
            if self._day != self.today():
                self._reserved = 0  # a new UTC day: yesterday's leftovers do not carry over
                self._day = self.today()
            if self._reserved == 0:
                self._reserved = await asyncio.to_thread(self._reserve, self._day)
            self._reserved -= 1
            self.spent += 1

    def _reserve(self, day: date) -> int:
        with self.engine.begin() as conn:
            used = self._locked_row(conn, day)
            take = min(self.block, self.limit - used)
            if take <= 0:
                raise QuotaExhausted(
                    f"quota: {used:,} of {self.limit:,} requests used today (UTC) by "
                    f"{self.destination}; stopped before passing daily_request_budget",
                    used=used,
                    budget=self.limit,
                )
            conn.execute(
                destination_requests.update()
                .where(self._key(day))
                .values(used=used + take, updated_at=self.clock())
            )
        return take

    def _key(self, day: date) -> sa.ColumnElement[bool]:
        return sa.and_(
            destination_requests.c.destination == self.destination,
            destination_requests.c.day == day,
        )

    def _locked_row(self, conn: sa.Connection, day: date) -> int:
        query = sa.select(destination_requests.c.used).where(self._key(day)).with_for_update()
        used = conn.execute(query).scalar()
        if used is None:
            try:
                with conn.begin_nested():
                    conn.execute(
                        destination_requests.insert().values(
                            destination=self.destination, day=day, used=0, updated_at=self.clock()
                        )
                    )
            except sa.exc.IntegrityError:
                pass  # another process created it first
            used = conn.execute(query).scalar()
        return int(used or 0)

    async def release(self) -> None:
        """Give back today's reserved but unused requests."""
        async with self._lock:
            if self._reserved and self._day == self.today():
                await asyncio.to_thread(self._give_back, self._day, self._reserved)
            self._reserved = 0

    def _give_back(self, day: date, count: int) -> None:
        with self.engine.begin() as conn:
            used = self._locked_row(conn, day)
            conn.execute(
                destination_requests.update()
                .where(self._key(day))
                .values(used=max(used - count, 0), updated_at=self.clock())
            )

    def used_today(self) -> int:
        """Requests counted today, not counting this process's unused reservation."""
        with self.engine.connect() as conn:
            used = conn.execute(
                sa.select(destination_requests.c.used).where(self._key(self.today()))
            ).scalar()
        unused = self._reserved if self._day == self.today() else 0
        return max(int(used or 0) - unused, 0)


def requests_used(engine: sa.Engine, day: date) -> dict[str, int]:
    """Requests each destination counted on ``day`` (UTC) against its daily budget."""
    if not sa.inspect(engine).has_table("destination_requests"):
        return {}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(destination_requests.c.destination, destination_requests.c.used).where(
                destination_requests.c.day == day
            )
        )
        return {r.destination: int(r.used) for r in rows}


def requests_by_day(engine: sa.Engine, since: date) -> list[tuple[str, date, int]]:
    """``(destination, UTC day, requests)`` for each day from ``since``, oldest first."""
    if not sa.inspect(engine).has_table("destination_requests"):
        return []
    r = destination_requests.c
    query = (
        sa.select(r.destination, r.day, r.used).where(r.day >= since).order_by(r.destination, r.day)
    )
    with engine.connect() as conn:
        return [(row.destination, row.day, int(row.used)) for row in conn.execute(query)]
