"""audience-sync: keep Crisp in step with audiences computed in a warehouse or exported as files.

The library API: ``load_config`` -> ``sync`` -> ``SyncResult``; ``trait_key`` names a trait;
``retire`` sets a dropped audience's trait to false; ``track`` sends Track (and Identify) calls
outside an audience sync.
The ``audience-sync`` command is a thin shell over these.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from audience_sync.config import AudienceConfig, Config, load_config
from audience_sync.destinations import IdentifyCall, TrackEvent
from audience_sync.errors import (
    AlreadyRunning,
    AudienceSyncError,
    ConfigError,
    CredentialsError,
    DestinationError,
    NotFound,
    QuotaExhausted,
    SafeguardError,
    SnapshotError,
    StateError,
    StateMissing,
)
from audience_sync.model import (
    Change,
    ChangeBatch,
    DeliveryStatus,
    Identity,
    Outcome,
    RunMode,
    RunStatus,
    Snapshot,
    Trigger,
    UserUpdate,
)
from audience_sync.naming import trait_key
from audience_sync.result import AudienceResult, SyncResult

if TYPE_CHECKING:
    from audience_sync.diff import Plan, plan
    from audience_sync.engine import retire, sync
    from audience_sync.sources import load_snapshot
    from audience_sync.track import CallFile, CallResult, read_calls, track

# The engine and the sources bring pandas, pyarrow and DuckDB (~1 s to import): they load on
# first use, so `audience-sync --help`, `status` and `history` start without them.
_LAZY = {
    "Plan": "audience_sync.diff",
    "plan": "audience_sync.diff",
    "retire": "audience_sync.engine",
    "sync": "audience_sync.engine",
    "load_snapshot": "audience_sync.sources",
    "CallFile": "audience_sync.track",
    "CallResult": "audience_sync.track",
    "read_calls": "audience_sync.track",
    "track": "audience_sync.track",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = importlib.import_module(module)
    # Bind every lazy name of that module at once (later lookups skip this function). This
    # also undoes the import system binding the submodule ``audience_sync.track`` over the
    # function ``track``, whichever of the module's names was asked for first.
    for other, home in _LAZY.items():
        if home == module:
            globals()[other] = getattr(loaded, other)
    return globals()[name]


__all__ = [
    "AlreadyRunning",
    "AudienceConfig",
    "AudienceResult",
    "AudienceSyncError",
    "CallFile",
    "CallResult",
    "Change",
    "ChangeBatch",
    "Config",
    "ConfigError",
    "CredentialsError",
    "DeliveryStatus",
    "DestinationError",
    "IdentifyCall",
    "Identity",
    "NotFound",
    "Outcome",
    "Plan",
    "QuotaExhausted",
    "RunMode",
    "RunStatus",
    "SafeguardError",
    "Snapshot",
    "SnapshotError",
    "StateError",
    "StateMissing",
    "SyncResult",
    "TrackEvent",
    "Trigger",
    "UserUpdate",
    "load_config",
    "load_snapshot",
    "plan",
    "read_calls",
    "retire",
    "sync",
    "track",
    "trait_key",
]
