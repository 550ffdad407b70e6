"""The public surface of ``audience_sync`` is deliberate: adding or removing a name is a
decision, so this list changes only together with the package's ``__all__``."""

from __future__ import annotations

import audience_sync

EXPORTED = {
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
}


def test_exported_members():
    assert set(audience_sync.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(audience_sync, name) is not None


def test_every_error_is_an_audience_sync_error_with_an_exit_code():
    errors = [
        getattr(audience_sync, n) for n in EXPORTED if n.endswith(("Error", "Exhausted", "Running"))
    ]
    for error in errors:
        assert issubclass(error, audience_sync.AudienceSyncError)
        assert error.exit_code in {1, 3, 4, 6, 7}


def test_lazy_names_are_the_functions_whatever_the_import_order():
    """``read_calls`` first imports ``audience_sync.track``, which Python binds on the package:
    ``track`` must still be the function, not that submodule."""
    import subprocess
    import sys

    code = (
        "from audience_sync import read_calls, track, CallFile\n"
        "import audience_sync\n"
        "assert callable(track) and track.__name__ == 'track', track\n"
        "assert audience_sync.track is track\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
