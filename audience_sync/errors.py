"""The one exception tree of audience-sync.

Per-user delivery problems are *values* (see ``model.Outcome``); these exceptions are for
problems that stop a whole run or a whole audience. Each class carries the CLI exit code it
maps to, so the CLI needs no table of its own::

    AudienceSyncError                 exit 1  unexpected failure
    ├── NotFound                      exit 2  the run or audience named on the command line
    │                                         does not exist
    ├── ConfigError                   exit 3  bad config file, key or environment value
    ├── SnapshotError                 exit 4  a snapshot is missing, unreadable or malformed
    ├── SafeguardError                exit 4  a snapshot looks broken (empty, wipes an audience)
    ├── DestinationError              exit 6  the destination refused the whole run
    │   ├── CredentialsError                  missing or rejected API credentials
    │   └── QuotaExhausted                    daily request budget spent (run ends partial)
    ├── StateError                    exit 6  the state database is unusable or not migrated
    ├── StateMissing                  exit 9  the state looks lost: moved, or empty for a
    │                                         destination that was synced before
    └── AlreadyRunning                exit 7  another process holds the audience's run lock
"""

from __future__ import annotations

import math

__all__ = [
    "AlreadyRunning",
    "AudienceSyncError",
    "ConfigError",
    "CredentialsError",
    "DestinationError",
    "NotFound",
    "QuotaExhausted",
    "SafeguardError",
    "SnapshotError",
    "StateError",
    "StateMissing",
]


class AudienceSyncError(Exception):
    """Root of every error audience-sync raises on purpose."""

    exit_code = 1


class NotFound(AudienceSyncError):
    """What the command line names (a run id, an audience) is not in the state database."""

    exit_code = 2


class ConfigError(AudienceSyncError):
    """The configuration is invalid; nothing was sent."""

    exit_code = 3


class SnapshotError(AudienceSyncError):
    """A snapshot cannot be used; the audience was not synced and its state is untouched."""

    exit_code = 4


class SafeguardError(AudienceSyncError):
    """A snapshot was refused by a safeguard (e.g. it would wipe the audience)."""

    exit_code = 4


class DestinationError(AudienceSyncError):
    """The destination refused the run as a whole (not one user)."""

    exit_code = 6


class CredentialsError(DestinationError):
    """Credentials are missing or were rejected; state is untouched."""


class QuotaExhausted(DestinationError):
    """The destination's request budget is spent; remaining users stay pending.

    ``used`` and ``budget`` are today's request count and limit, when known;
    ``requests_per_user`` is what a user cost so far, so ``describe`` can say how many days the
    pending users need at this budget.
    """

    def __init__(
        self,
        message: str,
        *,
        used: int | None = None,
        budget: int | None = None,
        requests_per_user: float | None = None,
    ) -> None:
        super().__init__(message)
        self.used = used
        self.budget = budget
        self.requests_per_user = requests_per_user

    def describe(self, pending_users: int) -> str:
        """The message with the pending users and the days they need at this budget."""
        text = f"{self}; {pending_users:,} users pending"
        if self.budget and pending_users:
            per_user = self.requests_per_user or 1.0
            days = max(1, math.ceil(pending_users * per_user / self.budget))
            text += f", about {days} more day{'s' if days != 1 else ''} at this budget"
        return text + " (the next run carries on where this one stopped)"


class StateError(AudienceSyncError):
    """The state database cannot be used."""

    exit_code = 6


class StateMissing(AudienceSyncError):
    """The state the destination was synced from is not where the config points: the
    database moved, or it holds nothing for a destination that shows earlier syncs. Nothing
    was sent (a run from an empty state would re-send every member)."""

    exit_code = 9


class AlreadyRunning(AudienceSyncError):
    """Another process is syncing the same (destination, audience)."""

    exit_code = 7
