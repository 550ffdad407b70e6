"""State: the last synced members, the retry queue, run history and run locks, in SQL."""

from __future__ import annotations

from audience_sync.state.audiences import AudienceRef
from audience_sync.state.database import connect, schema_is_current, upgrade
from audience_sync.state.lock import Lease, RunLock
from audience_sync.state.store import Applied, StateStore

__all__ = [
    "Applied",
    "AudienceRef",
    "Lease",
    "RunLock",
    "StateStore",
    "connect",
    "schema_is_current",
    "upgrade",
]
