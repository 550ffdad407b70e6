"""The one exception tree of audience-sync.

Per-user delivery problems are *values* (see ``model.Outcome``); these exceptions are for
problems that stop a whole run or a whole audience. Each class carries the CLI exit code it
maps to, so the CLI needs no table of its own::

    AudienceSyncError                 exit 1  unexpected failure
    ├── ConfigError                   exit 3  bad config file, key or environment value
    ├── SnapshotError                 exit 4  a snapshot is missing, unreadable or malformed
    ├── SafeguardError                exit 4  a snapshot looks broken (empty, wipes an audience)
    ├── DestinationError              exit 6  the destination refused the whole run
    │   ├── CredentialsError                  missing or rejected API credentials
    │   └── QuotaExhausted                    daily request budget spent (run ends partial)
    ├── StateError                    exit 6  the state database is unusable or not migrated
    └── AlreadyRunning                exit 7  another process holds the audience's run lock
"""

from __future__ import annotations

__all__ = [
    "AlreadyRunning",
    "AudienceSyncError",
    "ConfigError",
    "CredentialsError",
    "DestinationError",
    "QuotaExhausted",
    "SafeguardError",
    "SnapshotError",
    "StateError",
]


class AudienceSyncError(Exception):
    """Root of every error audience-sync raises on purpose."""

    exit_code = 1


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
    """The destination's request budget is spent; remaining users stay pending."""


class StateError(AudienceSyncError):
    """The state database cannot be used."""

    exit_code = 6


class AlreadyRunning(AudienceSyncError):
    """Another process is syncing the same (destination, audience)."""

    exit_code = 7
