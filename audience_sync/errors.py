"""The one exception tree of audience-sync, and ``ExitCode``, the one table of exit codes.

Per-user delivery problems are *values* (see ``model.Outcome``); these exceptions are for
problems that stop a whole run or a whole audience. Each class carries the ``ExitCode`` it
maps to, so the CLI needs no table of its own::

    AudienceSyncError                 FAILURE          unexpected failure
    ├── NotFound                      USAGE            the run or audience named on the command
    │                                                  line does not exist
    ├── ConfigError                   CONFIG           bad config file, key or environment value
    ├── SnapshotError                 SNAPSHOT         a snapshot is missing, unreadable or
    │                                                  malformed
    ├── SafeguardError                SNAPSHOT         a snapshot looks broken (empty, wipes an
    │                                                  audience)
    ├── DestinationError              UNAVAILABLE      the destination refused the whole run
    │   ├── CredentialsError                           missing or rejected API credentials
    │   └── QuotaExhausted                             daily request budget spent (run ends
    │                                                  partial)
    ├── StateError                    UNAVAILABLE      the state database is unusable or not
    │                                                  migrated
    ├── StateMissing                  STATE_MISSING    the state looks lost: moved, or empty for
    │                                                  a destination that was synced before
    └── AlreadyRunning                ALREADY_RUNNING  another process holds the audience's run
                                                       lock
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import ClassVar

__all__ = [
    "SEVERITY",
    "AlreadyRunning",
    "AudienceSyncError",
    "ConfigError",
    "CredentialsError",
    "DestinationError",
    "ExitCode",
    "NotFound",
    "QuotaExhausted",
    "SafeguardError",
    "SnapshotError",
    "StateError",
    "StateMissing",
    "most_severe",
]


class ExitCode(enum.IntEnum):
    """Every exit code of the ``audience-sync`` command (README's *Exit codes* table lists the
    same; ``tests/cli/test_docs.py`` compares them)."""

    OK = 0
    FAILURE = 1
    """An unexpected failure (a bug)."""
    USAGE = 2
    """Wrong command-line usage (click's own code), or what it names does not exist."""
    CONFIG = 3
    SNAPSHOT = 4
    """A snapshot is unusable or was refused by a safeguard, or some of its rows were rejected."""
    PARTIAL = 5
    """Some users failed, were skipped or are still pending (``track``: calls not delivered)."""
    UNAVAILABLE = 6
    """The destination refused the run, or the state database is unusable."""
    ALREADY_RUNNING = 7
    UNHEALTHY = 8
    """``status`` only: an audience's last run failed or is overdue."""
    STATE_MISSING = 9
    INTERRUPTED = 130
    """Stopped by SIGINT (128 + 2): Ctrl-C, or a second SIGINT to the service."""
    TERMINATED = 143
    """Stopped at once by a second SIGTERM (128 + 15) to the service."""

    @classmethod
    def killed_by(cls, signum: int) -> ExitCode:
        """The shell's code for a process stopped by signal ``signum``: 128 + its number."""
        return cls(128 + signum)


#: When the audiences of one run end differently, the latest of these codes wins.
SEVERITY = (
    ExitCode.OK,
    ExitCode.PARTIAL,
    ExitCode.SNAPSHOT,
    ExitCode.FAILURE,
    ExitCode.UNAVAILABLE,
    ExitCode.STATE_MISSING,
    ExitCode.ALREADY_RUNNING,
    ExitCode.CONFIG,
)


def most_severe(codes: Iterable[ExitCode]) -> ExitCode:
    """The code of a run whose audiences ended with ``codes`` (``OK`` when there are none)."""
    return max(codes, key=SEVERITY.index, default=ExitCode.OK)


class AudienceSyncError(Exception):
    """Root of every error audience-sync raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE


class NotFound(AudienceSyncError):
    """What the command line names (a run id, an audience) is not in the state database."""

    exit_code = ExitCode.USAGE


class ConfigError(AudienceSyncError):
    """The configuration is invalid; nothing was sent."""

    exit_code = ExitCode.CONFIG


class SnapshotError(AudienceSyncError):
    """A snapshot cannot be used; the audience was not synced and its state is untouched."""

    exit_code = ExitCode.SNAPSHOT


class SafeguardError(AudienceSyncError):
    """A snapshot was refused by a safeguard (e.g. it would wipe the audience)."""

    exit_code = ExitCode.SNAPSHOT


class DestinationError(AudienceSyncError):
    """The destination refused the run as a whole (not one user)."""

    exit_code = ExitCode.UNAVAILABLE


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

    exit_code = ExitCode.UNAVAILABLE


class StateMissing(AudienceSyncError):
    """The state the destination was synced from is not where the config points: the
    database moved, or it holds nothing for a destination that shows earlier syncs. Nothing
    was sent (a run from an empty state would re-send every member)."""

    exit_code = ExitCode.STATE_MISSING


class AlreadyRunning(AudienceSyncError):
    """Another process is syncing the same (destination, audience)."""

    exit_code = ExitCode.ALREADY_RUNNING
