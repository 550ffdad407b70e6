"""audience-sync: keep Crisp in step with audiences computed in a warehouse or exported as files.

The library API, and all of it (``tests/test_public_api.py`` pins it to README's *Using it from
Python*): ``load_config`` -> ``sync`` -> ``SyncResult``; ``retire`` sets a dropped audience's
trait to false; ``track`` sends Track (and Identify) calls outside an audience sync;
``trait_key`` names a trait; the errors, each with its ``ExitCode``; and ``Destination`` with the
values it takes and returns, for a destination of your own (``sync(..., destination=...)``).
The ``audience-sync`` command is a thin shell over these. Everything else (plans, snapshots,
change batches, the state) is internal and may change between versions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from audience_sync.config import AudienceConfig, Config, load_config
from audience_sync.destinations import Destination, DestinationSettings, IdentifyCall, TrackEvent
from audience_sync.errors import (
    AlreadyRunning,
    AudienceSyncError,
    ConfigError,
    CredentialsError,
    DestinationError,
    ExitCode,
    NotFound,
    QuotaExhausted,
    SafeguardError,
    SnapshotError,
    StateError,
    StateMissing,
)
from audience_sync.model import (
    Change,
    DeliveryStatus,
    Identity,
    Outcome,
    RunMode,
    RunStatus,
    Trigger,
    UserUpdate,
)
from audience_sync.naming import trait_key
from audience_sync.result import AudienceResult, SyncResult

if TYPE_CHECKING:
    from audience_sync.engine import sync
    from audience_sync.retirement import retire
    from audience_sync.track import CallFile, CallResult, read_calls, track

# The engine (and the sources it reads) bring pandas, pyarrow and DuckDB (~1 s to import): they
# load on first use, so `audience-sync --help`, `status` and `history` start without them.
_LAZY = {
    "retire": "audience_sync.retirement",
    "sync": "audience_sync.engine",
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
    "Config",
    "ConfigError",
    "CredentialsError",
    "DeliveryStatus",
    "Destination",
    "DestinationError",
    "DestinationSettings",
    "ExitCode",
    "IdentifyCall",
    "Identity",
    "NotFound",
    "Outcome",
    "QuotaExhausted",
    "RunMode",
    "RunStatus",
    "SafeguardError",
    "SnapshotError",
    "StateError",
    "StateMissing",
    "SyncResult",
    "TrackEvent",
    "Trigger",
    "UserUpdate",
    "load_config",
    "read_calls",
    "retire",
    "sync",
    "track",
    "trait_key",
]
