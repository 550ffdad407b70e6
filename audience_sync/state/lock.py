"""The run lock: one run per (destination, audience) at a time, across processes and hosts.

A lease row in ``sync_locks`` (holder, expiry) that the running process renews. A process that
dies stops renewing; once the lease expires (at once, when the holder was a process of this host
that no longer exists) the next run takes it over and marks the dead run ``interrupted``. The
same code works on SQLite (write-locked transaction) and PostgreSQL (``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.errors import AlreadyRunning, StateError
from audience_sync.state.audiences import AudienceRef
from audience_sync.state.database import as_utc
from audience_sync.state.schema import sync_locks

__all__ = ["DEFAULT_LEASE", "Lease", "RunLock", "holder_is_dead"]

DEFAULT_LEASE = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lock. ``taken_over_run`` is the run of an expired holder this lease replaced."""

    audience: AudienceRef
    holder: str
    taken_over_run: int | None


def holder_is_dead(holder: str) -> bool:
    """Whether ``host:pid`` names a process of this host that no longer exists.

    A run killed with SIGKILL cannot release its lease; on the same host its lock is taken over
    at once instead of after the lease expires. Other hosts' holders are never judged here.
    """
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


class RunLock:
    """Acquire, renew and release leases in the state database."""

    def __init__(
        self, engine: sa.Engine, *, ttl: timedelta = DEFAULT_LEASE, clock: Clock = utc_now
    ):
        self.engine = engine
        self.ttl = ttl
        self.clock = clock

    def acquire(self, audience: AudienceRef, holder: str) -> Lease:
        """Take the audience's lock or raise ``AlreadyRunning`` naming who has it since when."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(sync_locks)
                .where(sync_locks.c.audience_id == audience.id)
                .with_for_update()
            ).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            sync_locks.insert().values(
                                audience_id=audience.id,
                                holder=holder,
                                acquired_at=now,
                                expires_at=now + self.ttl,
                            )
                        )
                except sa.exc.IntegrityError:
                    raise AlreadyRunning(
                        f"audience {audience.name!r} on {audience.destination}: another process "
                        "took the run lock at the same moment; try again"
                    ) from None
                return Lease(audience, holder, None)
            expires = as_utc(row.expires_at)
            assert expires is not None
            if expires > now and row.holder != holder and not holder_is_dead(row.holder):
                since = as_utc(row.acquired_at)
                raise AlreadyRunning(
                    f"audience {audience.name!r} on {audience.destination} is already running "
                    f"since {since:%Y-%m-%d %H:%M:%S} UTC (run {row.run_id}, held by "
                    f"{row.holder}, lease until {expires:%H:%M:%S} UTC)"
                )
            conn.execute(
                sync_locks.update()
                .where(sync_locks.c.audience_id == audience.id)
                .values(holder=holder, run_id=None, acquired_at=now, expires_at=now + self.ttl)
            )
            return Lease(audience, holder, row.run_id if row.holder != holder else None)

    def attach_run(self, lease: Lease, run_id: int) -> None:
        """Record which run holds the lease (shown to a process that finds it taken)."""
        with self.engine.begin() as conn:
            conn.execute(
                sync_locks.update()
                .where(
                    sync_locks.c.audience_id == lease.audience.id,
                    sync_locks.c.holder == lease.holder,
                )
                .values(run_id=run_id)
            )

    def renew(self, leases: Sequence[Lease], conn: sa.Connection | None = None) -> None:
        """Push the leases' expiry forward; a lease that was taken over stops the run."""
        if not leases:
            return
        if conn is None:
            with self.engine.begin() as own:
                self.renew(leases, own)
            return
        expires = self.clock() + self.ttl
        for lease in leases:
            updated = conn.execute(
                sync_locks.update()
                .where(
                    sync_locks.c.audience_id == lease.audience.id,
                    sync_locks.c.holder == lease.holder,
                )
                .values(expires_at=expires)
            ).rowcount
            if updated != 1:
                raise StateError(
                    f"lost the run lock of audience {lease.audience.name!r}: its lease expired "
                    "and another process took it over; stopping without further changes"
                )

    def release(self, leases: Sequence[Lease]) -> None:
        with self.engine.begin() as conn:
            for lease in leases:
                conn.execute(
                    sync_locks.delete().where(
                        sync_locks.c.audience_id == lease.audience.id,
                        sync_locks.c.holder == lease.holder,
                    )
                )

    def holders(self) -> dict[int, tuple[str, datetime | None, datetime | None]]:
        """Audience id -> (holder, acquired_at, expires_at) for every lock row."""
        with self.engine.connect() as conn:
            return {
                r.audience_id: (r.holder, as_utc(r.acquired_at), as_utc(r.expires_at))
                for r in conn.execute(sa.select(sync_locks))
            }
