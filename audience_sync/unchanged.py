"""An unchanged snapshot: when a run can skip reading the state and diffing.

A run of an audience whose snapshot file has the fingerprint (``sources/fingerprint.py``) that
the state database stored for it (``state/fingerprints.py``) would plan nothing: the fingerprint
is stored only when a run left the state exactly equal to that snapshot (succeeded with nothing
failed, skipped, pending, rejected or held, no retry row left), and any run of the audience
deletes it as it starts. So such a run is recorded as succeeded with no change, without
reading the state's members. Not for ``--full`` (which re-sends everyone) nor a SQL query
source (its result would have to be read anyway); the safeguards still apply (a snapshot too
old is refused as a diffing run would refuse it).
"""

from __future__ import annotations

import pandas as pd

from audience_sync.config import AudienceConfig, SafeguardConfig
from audience_sync.diff import Plan
from audience_sync.model import RunMode, Snapshot
from audience_sync.safeguards import limits_for
from audience_sync.sources.fingerprint import SourceFingerprint, fingerprint, unchanged_since
from audience_sync.state.fingerprints import Confirmed

__all__ = ["confirmed_fact", "fingerprint", "matching", "skipped_plan"]

_NONE = pd.Index([], dtype="string[pyarrow]", name="user_id")


def matching(
    stored: Confirmed | None,
    audience: AudienceConfig,
    now: SourceFingerprint | None,
    mode: RunMode,
    safeguards: SafeguardConfig,
) -> Confirmed | None:
    """``stored``, the fact that the state equals a snapshot (read before the run's row is
    written, which deletes it), if that snapshot is the one fingerprinted ``now``."""
    if now is None or mode is not RunMode.INCREMENTAL:
        return None
    if stored is None or stored.fingerprint != now.digest:
        return None
    if (
        stored.snapshot_at is None
        and stored.mtime != now.mtime
        and limits_for(audience, safeguards).max_snapshot_age is not None
    ):
        # The snapshot's time was its mtime, or a `snapshot_at` column equal to it: with the
        # file rewritten, which one cannot be told without reading it; the age check needs it.
        return None
    return stored


def skipped_plan(
    audience: AudienceConfig, stored: Confirmed, now: SourceFingerprint
) -> tuple[Snapshot, Plan]:
    """The snapshot and (empty) plan a diffing run would have made, for the safeguards and
    the run's counters: nobody enters or exits, every member is unchanged."""
    snapshot = Snapshot(
        source=str(audience.source),
        members=pd.DataFrame(index=_NONE),
        rows=stored.snapshot_rows,
        taken_at=stored.snapshot_at or now.mtime,
    )
    return snapshot, Plan(entered=_NONE, exited=_NONE, resend=_NONE, unchanged=stored.members)


def confirmed_fact(
    audience: AudienceConfig,
    now: SourceFingerprint | None,
    run_id: int,
    snapshot: Snapshot,
    the_plan: Plan,
) -> Confirmed | None:
    """What to store if the run ends with the state equal to ``snapshot``; None when the
    snapshot cannot be fingerprinted, changed while read, or holds rejected or held rows."""
    if now is None or snapshot.rejected_count or snapshot.held or the_plan.exits_held:
        return None
    if not unchanged_since(audience, now):
        return None
    taken_at = snapshot.taken_at
    return Confirmed(
        now.digest,
        run_id,
        snapshot.rows,
        len(the_plan.entered) + the_plan.unchanged,
        None if taken_at is None or taken_at == now.mtime else taken_at,
        now.mtime,
    )
